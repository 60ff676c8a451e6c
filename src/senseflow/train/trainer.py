"""The one distillation loop for every teacher family (spec §2).

Per iteration: draw the anchor and the input (backward simulation or forward-noised data), run the
generator, and every ``ttur_ratio`` iterations update it with DMD + GAN + ISG and then apply IDA;
then update the fake score and the discriminator on the generator's (pre-update) output. Family
differences live in the adapter; hyperparameters come from the recipe; all randomness of an
iteration comes from ``draws.draw_step`` so that resume and world size change nothing.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from senseflow.config.loader import dump_config, save_resolved
from senseflow.config.schema import DistillConfig, OptimizerConfig
from senseflow.devices import autocast, reshard, resolve_device, set_tf32, to_dtype
from senseflow.method import (
    as_x0_fn,
    backward_simulate,
    check_ida_compatible,
    diffaug,
    dmd_loss,
    fake_score_loss,
    hinge_d_loss,
    hinge_g_loss,
    ida_update_,
    isg_loss,
    isg_targets,
    isg_x0_targets,
    nonsaturating_d_loss,
    nonsaturating_g_loss,
    segment_ends,
    time_weight,
)
from senseflow.models import build_adapter
from senseflow.models.adapter import Conditioning
from senseflow.models.discriminators import build_discriminator
from senseflow.train import checkpoint as ckpt
from senseflow.train.data import build_data
from senseflow.train.draws import DiscDraws, StepDraws, draw_step
from senseflow.train.health import NonFiniteGuard, collapse_alarm, image_stats, non_finite
from senseflow.train.logbook import Logbook
from senseflow.train.samples import save_sample_grid


def _optimizer(params, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise ImportError(
                "optim.*.name 'adamw8bit' needs bitsandbytes (pip install bitsandbytes)"
            ) from exc
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def _check_supported(cfg: DistillConfig) -> None:
    """Refuse settings this version would otherwise silently mistrain with."""
    p = cfg.precision
    unsupported = [
        f"precision.{name}=fp16"
        for name, value in (("param_dtype", p.param_dtype), ("autocast_dtype", p.autocast_dtype))
        if value == "fp16"
    ]
    if unsupported:
        raise ValueError(
            "not supported: " + ", ".join(unsupported) + " (float16 training needs loss scaling, which this "
            "trainer does not do; use bf16, as every official recipe does)"
        )


class Distiller:
    def __init__(self, cfg: DistillConfig, progress: bool = True):
        _check_supported(cfg)
        self.cfg = cfg
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.progress = progress and self.rank == 0
        self.run_dir = Path(cfg.output_dir)
        prec = cfg.precision
        self.device = resolve_device(cfg.parallel.device)
        self.autocast_dtype = to_dtype(prec.autocast_dtype, "precision.autocast_dtype")
        set_tf32(prec.tf32)
        self.adapter = build_adapter(cfg).to(self.device)
        self.param = self.adapter.param
        nets = self.adapter.build_networks(
            teacher_dtype=to_dtype(prec.teacher_dtype, "precision.teacher_dtype"),
            train_dtype=to_dtype(prec.param_dtype, "precision.param_dtype"),
        )
        for net in (nets.teacher, nets.generator, nets.fake_score):
            net.to(self.device)
            if cfg.parallel.gradient_checkpointing:
                self.adapter.enable_gradient_checkpointing(net)
        if cfg.method.ida.enabled:
            check_ida_compatible(nets.fake_score, nets.generator)
        self.teacher, self.generator, self.fake_score = nets.teacher, nets.generator, nets.fake_score
        torch.manual_seed(cfg.seed)  # new parameters (discriminator heads) start alike on every rank and run
        self.discriminator = build_discriminator(cfg.method.gan, self.adapter, self.fake_score)
        if self.discriminator is not None:
            self.discriminator.to(self.device)
        wrap = self.adapter.parallelize
        strategy = cfg.parallel.strategy
        # FSDP2 shards in place (the *_ddp names then hold the modules themselves); DDP wraps.
        self.teacher = wrap(self.teacher, strategy, "teacher")
        self.generator_ddp = wrap(self.generator, strategy, "generator")
        self.fake_ddp = wrap(self.fake_score, strategy, "fake_score")
        o = cfg.optim
        self.optimizers = {
            "generator": _optimizer(self.generator.parameters(), o.generator),
            "fake_score": _optimizer(self.fake_score.parameters(), o.fake),
        }
        clips = {"generator": o.generator.clip_grad, "fake_score": o.fake.clip_grad}
        if self.discriminator is not None:
            self.disc_ddp = wrap(self.discriminator, strategy, "discriminator")
            self.optimizers["discriminator"] = _optimizer(
                self.discriminator.trainable_parameters(), o.discriminator
            )
            clips["discriminator"] = o.discriminator.clip_grad
        self.clips = clips
        warm, start = o.warmup_steps, o.warmup_start_factor
        self.schedulers = {
            k: torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: start + (1 - start) * min(1.0, (s + 1) / warm) if warm else 1.0
            )
            for k, opt in self.optimizers.items()
        }
        self.anchor_levels = self.param.anchor_levels(self.adapter.anchors).to(self.device)
        # a_0 .. a_{K-1} and the end of the last segment (clean, or the grid's first entry)
        self.levels = segment_ends(self.anchor_levels, self.param, cfg.method.isg.last_segment_end)
        self.batch = cfg.data.batch_size
        self.data = build_data(cfg, global_batch=self.batch * self.world)
        self.guard = NonFiniteGuard(cfg.health.nan_patience)
        self.iteration = 0

    # ------------------------------------------------------------------ pieces of one iteration

    def _predict(self, net, x: Tensor, level: Tensor, cond: Conditioning) -> Tensor:
        """A network's raw output in float32, computed under the recipe's autocast."""
        with autocast(self.device, self.autocast_dtype):
            return self.adapter.forward(net, x, level, cond)

    def _guided(self, x: Tensor, level: Tensor, cond: Conditioning, guidance: Tensor) -> Tensor:
        with autocast(self.device, self.autocast_dtype):
            return self.adapter.guided_predict(self.teacher, x, level, cond, guidance)

    def _decode(self, x: Tensor) -> Tensor:
        with autocast(self.device, self.autocast_dtype):
            return self.adapter.decode(x).float()

    def _output_fn(self, net, cond: Conditioning):
        return lambda x, level: self._predict(net, x, level, cond)

    def _teacher_fn(self, cond: Conditioning, guidance: Tensor):
        return lambda x, level: self._guided(x, level, cond, guidance)

    def _input(
        self, x_real: Tensor, d: StepDraws, cond: Conditioning, rollout_steps: int | None = None
    ) -> Tensor:
        """G's input: backward simulation or forward-noised data per sample.

        ``rollout_steps``: generator calls of the simulation, from the *global* batch's draws so every
        rank makes the same calls (FSDP2 gathers weights in each); default: what ``d`` needs.
        """
        level_j = self.levels[d.anchor_index]
        noised = self.param.add_noise(x_real, d.input_noise, level_j)
        rollout_steps = d.rollout_steps() if rollout_steps is None else rollout_steps
        if rollout_steps == 0:
            return noised
        steps = iter(d.simulation_noise)
        simulated = backward_simulate(
            as_x0_fn(self._output_fn(self.generator, cond), self.param),
            d.input_noise,
            self.anchor_levels,
            torch.where(d.simulate, d.anchor_index, 0),
            self.param,
            generator=lambda like: next(steps).to(like),
            steps=rollout_steps,
        )
        return torch.where(d.simulate.view(-1, *[1] * (x_real.ndim - 1)), simulated, noised)

    def _gan_weights(self, level_j: Tensor) -> Tensor:
        return time_weight(self.cfg.method.gan.time_weight or "constant", level_j, self.param)

    def _discriminate(self, disc, x: Tensor, cond: Conditioning, draws: DiscDraws | None) -> Tensor:
        """D's logits on ``x`` (in D's input space) after DiffAugment, with D's noise if it is noised."""
        if draws is not None and draws.aug is not None:
            x = diffaug(x, draws.aug)
        with autocast(self.device, self.autocast_dtype):
            if self.discriminator.noised:
                if draws is None or draws.level is None:
                    raise ValueError("a noised discriminator needs its drawn levels and noise")
                return disc(x, cond, draws.level, draws.noise).float()
            return disc(x, cond).float()

    def _generator_losses(self, x_in, out_in, x0, d: StepDraws, cond) -> tuple[Tensor, dict]:
        m, p = self.cfg.method, self.param
        x_t = p.add_noise(x0, d.dmd_noise, d.dmd_level).detach()
        with torch.no_grad():
            x0_fake = p.x0_from_output(
                x_t, self._predict(self.fake_score, x_t, d.dmd_level, cond), d.dmd_level
            )
            real_out = self._guided(x_t, d.dmd_level, cond, d.dmd_guidance)
            x0_real = p.x0_from_output(x_t, real_out, d.dmd_level)
        dmd = dmd_loss(x0, x0_fake, x0_real)
        total, logs = (
            dmd.loss,
            {"loss_dmd": dmd.loss.item(), **{f"dmd_{k}": v.item() for k, v in dmd.stats.items()}},
        )
        level_j, level_next = self.levels[d.anchor_index], self.levels[d.anchor_index + 1]
        if self.discriminator is not None and m.gan.weight:
            # The unwrapped discriminator: its parameter gradients from this loss are discarded.
            x_d = self._decode(x0) if self.discriminator.input_space == "pixels" else x0
            logits = self._discriminate(self.discriminator, x_d, cond, d.disc_gen)
            g_loss = hinge_g_loss if m.gan.type != "dmd2_head" else nonsaturating_g_loss
            adv = g_loss(logits, self._gan_weights(level_j))
            total = total + m.gan.weight * adv
            logs["loss_adv"] = adv.item()
        if m.isg.weight > 0:
            teacher = self._teacher_fn(cond, d.isg_guidance)
            if self.param.kind == "ddpm" and m.isg.sdxl_mode == "official":
                t = isg_x0_targets(x_in, level_j, level_next, teacher, out_in, p)
            else:
                student = self._output_fn(self.generator, cond)
                level_mid = p.level_from_grid(d.isg_mid_grid)
                t = isg_targets(x_in, level_j, level_next, level_mid, teacher, student, out_in, p)
            isg = isg_loss(t.x_direct, t.x_target, m.isg.loss, m.isg.charbonnier_eps)
            total = total + m.isg.weight * isg
            logs["loss_isg"] = isg.item()
        return total, logs

    def _non_finite(self, losses: dict[str, Tensor]) -> list[str]:
        """Non-finite losses on this rank, or a marker when only another rank has one: every rank
        must skip the same updates, or their collectives would no longer pair up."""
        bad = non_finite(losses)
        if dist.is_initialized():
            flag = torch.tensor([float(bool(bad))], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and not bad:
                bad = ["another rank's " + "/".join(losses)]
        return bad

    def _step(self, name: str, loss: Tensor, module_params) -> None:
        opt = self.optimizers[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clips[name] is not None:
            torch.nn.utils.clip_grad_norm_(module_params, self.clips[name])
        opt.step()
        self.schedulers[name].step()

    def train_step(self) -> dict[str, float]:
        """One iteration (spec §2); returns its logged scalars."""
        cfg, p, n = self.cfg, self.param, self.iteration
        images, prompts = self.data.batch(n)
        lo, hi = self.rank * self.batch, (self.rank + 1) * self.batch
        images, prompts = images[lo:hi].to(self.device), prompts[lo:hi]
        with autocast(self.device, self.autocast_dtype), torch.no_grad():
            x_real = self.adapter.encode_images(images).float()
        everyone = draw_step(  # the global batch's draws; this rank takes its slice
            cfg.method,
            p,
            self.anchor_levels,
            tuple(x_real.shape[1:]),
            self.batch * self.world,
            self.batch,
            cfg.seed,
            n,
            disc_shape=self._disc_shape(images, x_real),
            disc_noised=self.discriminator is not None and self.discriminator.noised,
        )
        d = everyone.slice(lo, hi).to(self.device)
        cond = self.adapter.encode_prompts(prompts)
        x_in = self._input(x_real, d, cond, rollout_steps=everyone.rollout_steps())
        level_j = self.levels[d.anchor_index]
        generator_turn = n % cfg.method.ttur_ratio == 0
        with torch.set_grad_enabled(generator_turn):
            out_in = self._predict(
                self.generator_ddp if generator_turn else self.generator, x_in, level_j, cond
            )
            x0 = p.x0_from_output(x_in, out_in, level_j)
        logs: dict[str, float] = {"iteration": n, "generator_turn": float(generator_turn)}
        losses: dict[str, Tensor] = {}
        if generator_turn:
            total, more = self._generator_losses(x_in, out_in, x0, d, cond)
            logs.update(more)
            losses["generator"] = total
            if not self._non_finite({"generator": total}):
                self._step("generator", total, self.generator.parameters())
                if cfg.method.ida.enabled:
                    reshard(self.fake_score, self.generator)  # IDA pairs the local shards
                    ida_update_(
                        self.fake_score, self.generator, cfg.method.ida.lam, cfg.method.ida.update_dtype
                    )
        x0 = x0.detach()
        x_t = p.add_noise(x0, d.fake_noise, d.fake_level)
        fake = fake_score_loss(
            p, self._predict(self.fake_ddp, x_t, d.fake_level, cond), x0, d.fake_noise, d.fake_level
        )
        losses["fake_score"] = fake
        logs["loss_fake"] = fake.item()
        decoded = self._decode(x0)
        disc = self.discriminator
        fake_alone = disc is None or not disc.shares_fake_update
        if fake_alone and not self._non_finite({"fake": fake}):
            self._step("fake_score", fake, self.fake_score.parameters())
        if disc is not None:
            pixels = disc.input_space == "pixels"
            real_d, fake_d = (images, decoded) if pixels else (x_real, x0)
            if disc.shares_fake_update:  # D's loss also trains the fake score: one backward, two steps
                with disc.fake_in_graph():
                    d_loss, more = self._discriminator_loss(real_d, fake_d, cond, level_j, d)
                losses["discriminator"] = d_loss
                if not self._non_finite({"fake": fake, "d": d_loss}):
                    self._joint_step(("fake_score", "discriminator"), fake + d_loss)
            else:
                more = self._discriminator_step(real_d, fake_d, cond, level_j, losses, d)
            logs.update(more)
        logs.update(image_stats(decoded, cfg.health))
        self.guard.end_iteration(self._non_finite(losses), n)
        self.iteration += 1
        return logs

    def _disc_shape(self, images: Tensor, x_real: Tensor) -> tuple[int, ...] | None:
        """Shape of one discriminator input (decoded RGB or model space), for its draws."""
        if self.discriminator is None:
            return None
        return tuple((images if self.discriminator.input_space == "pixels" else x_real).shape[1:])

    def _discriminator_loss(
        self, real, fake, cond, level_j, d: StepDraws | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """D's loss on ``real`` and sg(``fake``), both in D's input space (RGB or model space)."""
        gan = self.cfg.method.gan
        draws = None if d is None or d.disc_real is None else d.disc_real.cat(d.disc_fake)
        # One forward over real and fake together: DDP pairs each forward with one backward.
        logits = self._discriminate(self.disc_ddp, torch.cat([real, fake]), cond.cat(cond), draws)
        real_logits, fake_logits = logits.chunk(2)
        d_loss = hinge_d_loss if gan.type != "dmd2_head" else nonsaturating_d_loss
        loss = gan.disc_weight * d_loss(real_logits, fake_logits, self._gan_weights(level_j))
        return loss, {
            "loss_disc": loss.item(),
            "disc_real_acc": (real_logits > 0).float().mean().item(),
            "disc_fake_acc": (fake_logits < 0).float().mean().item(),
        }

    def _discriminator_step(self, real, fake, cond, level_j, losses, d: StepDraws | None = None) -> dict:
        """D's loss and its own update, for a D that does not share the fake score's update."""
        loss, logs = self._discriminator_loss(real, fake, cond, level_j, d)
        losses["discriminator"] = loss
        if not self._non_finite({"d": loss}):
            self._step("discriminator", loss, self.discriminator.trainable_parameters())
        return logs

    def _joint_step(self, names: tuple[str, ...], loss: Tensor) -> None:
        """One backward of a loss shared by several networks, then each optimiser's clip and step."""
        for name in names:
            self.optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        for name in names:
            if self.clips[name] is not None:
                params = [p for group in self.optimizers[name].param_groups for p in group["params"]]
                torch.nn.utils.clip_grad_norm_(params, self.clips[name])
            self.optimizers[name].step()
            self.schedulers[name].step()

    # ------------------------------------------------------------------ state, checkpoints, loop

    def modules(self) -> dict[str, torch.nn.Module]:
        mods = {"generator": self.generator, "fake_score": self.fake_score}
        if self.discriminator is not None:
            mods["discriminator"] = self.discriminator
        return mods

    def training_state(self) -> dict:
        """Everything but the weights (a collective under FSDP2: every rank must call it)."""
        modules = self.modules()
        return {
            "iteration": self.iteration,
            "optimizers": {k: ckpt.gather_optimizer(modules[k], o) for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "guard": self.guard.state_dict(),
            "world_size": self.world,
        }

    def save(self) -> Path | None:
        """Gather whole weights and states on every rank; rank 0 writes them."""
        weights = {k: ckpt.gather_weights(m) for k, m in self.modules().items()}
        state = self.training_state()
        path = None
        if self.rank == 0:
            path = ckpt.save_checkpoint(
                self.run_dir / "checkpoints",
                self.iteration,
                weights,
                state,
                dump_config(self.cfg),
                self.cfg.checkpoint.keep_last,
            )
        if dist.is_initialized():
            dist.barrier()
        return path

    def resume(self, path: Path) -> None:
        modules = self.modules()
        state = ckpt.load_checkpoint(path, modules)
        for k, opt in self.optimizers.items():
            ckpt.load_optimizer(modules[k], opt, state["optimizers"][k])
        for k, sched in self.schedulers.items():
            sched.load_state_dict(state["schedulers"][k])
        self.guard.load_state_dict(state["guard"])
        self.iteration = state["iteration"]

    def _resume_target(self) -> Path | None:
        resume = self.cfg.checkpoint.resume
        if resume is None:
            return None
        if resume == "latest":
            return ckpt.latest_checkpoint(self.run_dir / "checkpoints")
        return Path(resume)

    def run(self) -> dict[str, float]:
        """Train to ``schedule.iterations``, logging, sampling and checkpointing on the way."""
        cfg = self.cfg
        target = self._resume_target()
        if target is not None:
            self.resume(target)
        if self.rank == 0:
            ckpt.clean_partial(self.run_dir / "checkpoints")
            save_resolved(cfg, self.run_dir / "config.yaml")
        log = Logbook(self.run_dir, cfg.logging.tensorboard) if self.rank == 0 else None
        total = cfg.schedule.iterations
        bar = tqdm(total=total, initial=self.iteration, desc="distill", disable=not self.progress)
        logs: dict[str, float] = {}
        start = time.perf_counter()
        while self.iteration < total:
            logs = self.train_step()
            n = self.iteration
            alarm = collapse_alarm(logs, cfg.health)
            if log is not None and (logs["iteration"] % cfg.logging.every == 0 or n == total or alarm):
                logs["seconds"] = round(time.perf_counter() - start, 3)
                logs["alarm"] = alarm
                log.write(logs, step=int(logs["iteration"]))
            if alarm and self.progress:
                tqdm.write(f"iteration {n}: {alarm}")
            if cfg.logging.sample_every and n % cfg.logging.sample_every == 0:  # every rank: FSDP2 gathers
                save_sample_grid(self, self.run_dir / "samples" / f"step-{n:08d}.png", write=self.rank == 0)
            if n % cfg.checkpoint.every == 0 or n == total:
                self.save()
            bar.update(1)
            bar.set_postfix(dmd=logs.get("loss_dmd"), fake=f"{logs['loss_fake']:.3f}", refresh=False)
        bar.close()
        if log is not None:
            log.close()
        return logs
