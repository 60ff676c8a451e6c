"""Training the shapes world's teacher: a small SD3 transformer trained with rectified flow.

The teacher is a real ``diffusers.SD3Transformer2DModel`` working in pixel space (the toy world's
"autoencoder" is the identity), trained with logit-normal timesteps as SD3 was, and with condition
dropout so classifier-free guidance works. The output folder has the layout of a diffusers
pipeline (``transformer/``, ``scheduler/``, ``text_encoder/``, ``tokenizer/``) plus the resolved
recipe and the training log, and is loaded through the same ``from_pretrained`` calls as a real
teacher.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from tqdm.auto import tqdm

from senseflow.core.flow import FlowSchedule, add_noise
from senseflow.core.timesteps import sample_logit_normal
from senseflow.families.toy.data import ShapesBatches
from senseflow.families.toy.recipe import TeacherTraining, ToyTeacherConfig
from senseflow.families.toy.render import IMAGE_SIZE
from senseflow.families.toy.text import PromptEncoder, TextEncoderSpec, save_text_encoder


def build_transformer(cfg: ToyTeacherConfig) -> SD3Transformer2DModel:
    a = cfg.arch
    hidden = a.num_attention_heads * a.attention_head_dim
    return SD3Transformer2DModel(
        sample_size=IMAGE_SIZE,
        patch_size=a.patch_size,
        in_channels=3,
        out_channels=3,
        num_layers=a.num_layers,
        attention_head_dim=a.attention_head_dim,
        num_attention_heads=a.num_attention_heads,
        joint_attention_dim=cfg.text.hidden_size,
        caption_projection_dim=hidden,
        pooled_projection_dim=cfg.text.hidden_size,
        pos_embed_max_size=IMAGE_SIZE // a.patch_size,
    )


def _lr_factor(step: int, t: TeacherTraining) -> float:
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train_teacher(cfg: ToyTeacherConfig, out_dir: Path, progress: bool = True) -> Path:
    """Train the toy teacher and write a pipeline-layout folder to ``out_dir``; returns it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t = cfg.train
    text_spec = TextEncoderSpec(
        hidden_size=cfg.text.hidden_size,
        intermediate_size=2 * cfg.text.hidden_size,
        num_layers=cfg.text.num_layers,
        num_heads=cfg.text.num_heads,
        max_length=cfg.text.max_length,
        projection_dim=cfg.text.hidden_size,
        seed=cfg.text.seed,
    )
    save_text_encoder(text_spec, out_dir)
    encoder = PromptEncoder(out_dir)
    schedule = FlowSchedule(shift=cfg.shift)
    FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=schedule.num_train_timesteps, shift=cfg.shift
    ).save_pretrained(out_dir / "scheduler")
    (out_dir / "recipe.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

    torch.manual_seed(cfg.seed)
    model = build_transformer(cfg).train()
    if t.init_from is not None:
        init = Path(t.init_from) / "transformer"
        if not init.is_dir():
            raise FileNotFoundError(f"train.init_from: {init} is not a transformer folder")
        model.load_state_dict(SD3Transformer2DModel.from_pretrained(init).state_dict(), strict=True)
    ema = build_transformer(cfg).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, t))
    data = ShapesBatches(
        "train", t.batch_size, seed=cfg.seed, single_object_fraction=t.single_object_fraction
    )
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    drop_rng = np.random.default_rng(cfg.seed + 2)

    log = (out_dir / "train_log.jsonl").open("w")
    start = time.perf_counter()
    bar = tqdm(range(t.steps), desc="teacher", disable=not progress)
    for step in bar:
        images, prompts = next(data)
        prompts = ["" if drop_rng.random() < t.cond_dropout else p for p in prompts]
        tokens, pooled = encoder(prompts)
        sigma = sample_logit_normal(len(prompts), t.timestep_mean, t.timestep_std, generator=gen)
        noise = torch.randn(images.shape, generator=gen)
        x_t = add_noise(images, noise, sigma)
        v = model(
            hidden_states=x_t,
            encoder_hidden_states=tokens,
            pooled_projections=pooled,
            timestep=schedule.model_timestep(sigma),
            return_dict=False,
        )[0]
        loss = torch.nn.functional.mse_loss(v, noise - images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        sched.step()
        decay = min(t.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        if step % t.log_every == 0 or step == t.steps - 1:
            rec = {
                "step": step,
                "loss": loss.item(),
                "grad_norm": grad_norm.item(),
                "lr": sched.get_last_lr()[0],
                "elapsed_s": round(time.perf_counter() - start, 2),
            }
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
        if t.save_every and (step + 1) % t.save_every == 0 and step + 1 < t.steps:
            _save_ema(ema, out_dir, cfg, steps_done=step + 1, seconds=time.perf_counter() - start)
    log.close()
    return _save_ema(ema, out_dir, cfg, steps_done=t.steps, seconds=time.perf_counter() - start)


def _save_ema(
    ema: SD3Transformer2DModel, out_dir: Path, cfg: ToyTeacherConfig, steps_done: int, seconds: float
) -> Path:
    """Write the EMA transformer and the summary; the transformer folder is replaced atomically."""
    t = cfg.train
    tmp, final, old = out_dir / "transformer.tmp", out_dir / "transformer", out_dir / "transformer.old"
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    ema.save_pretrained(tmp)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)
    summary = {"train_seconds": round(seconds, 1), "steps": steps_done}
    if t.init_from is not None:  # carry the history of the run it started from
        previous = json.loads((Path(t.init_from) / "train_summary.json").read_text())
        summary["history"] = [
            *previous.get("history", [previous]),
            {"steps": steps_done, "init_from": t.init_from, "train_seconds": round(seconds, 1)},
        ]
        summary["total_steps"] = sum(h["steps"] for h in summary["history"])
        if all("train_seconds" in h for h in summary["history"]):
            summary["total_train_seconds"] = round(sum(h["train_seconds"] for h in summary["history"]), 1)
    summary["parameters"] = sum(p.numel() for p in ema.parameters())
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return out_dir
