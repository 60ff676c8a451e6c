"""How close `senseflow plan`'s activation passes come to the CPU allocator: each pass traced by the
planner against the profiler's memory timeline of the same pass on tiny folders of every family and
the VFM discriminator (docs/scale.md's error table; run by
``python benchmarks/published_folders.py --out DIR --accuracy``)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch


def _allocator_peak(fn, train: bool) -> int:
    """The most bytes the CPU allocator holds during one pass beyond what it held before, weight
    gradients left out (the profiler's memory timeline; as tests/test_plan.py measures)."""
    import numpy as np
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as p:
        with torch.set_grad_enabled(train):
            out = fn()
        if train:
            out.float().square().mean().backward()
        del out
    _, sizes = MemoryProfileTimeline(p._memory_profile())._coalesce_timeline(torch.device("cpu"))
    s = np.array(sizes)
    held = s[:, 1:].sum(axis=1) - s[:, 6]  # every category but gradients
    return int(held.max() - held[0])


def _first(fn, *args, **kwargs):
    return fn(*args, **kwargs)[0]


def _family_passes(
    root: Path, family: str, variant: str, side: int, data: Path
) -> list[tuple[str, int, int]]:
    """One tiny teacher's passes: (what, measured, planned)."""
    from senseflow.families.tiny import write_tiny_teacher
    from senseflow.models import build_adapter
    from senseflow.models.build import build_empty, build_networks
    from senseflow.train import plan_counts, plan_trace

    folder = write_tiny_teacher(root / f"{family}_{variant}", family, variant)
    adapter = build_adapter(_tiny_config(family, folder, side, data), text_cache=False)
    cond = adapter.encode_text(["a red cat", "a dog"])
    x = torch.randn(2, *adapter.sample_shape(side))
    level = adapter.param.anchor_levels(adapter.anchors)[:1].expand(2)
    out = []
    for checkpointing in (False, True):
        net = build_networks(adapter).generator
        planned_net = build_empty(adapter, "generator", torch.float32).to(plan_trace.META)
        if checkpointing:
            adapter.enable_gradient_checkpointing(net)
            adapter.enable_gradient_checkpointing(planned_net)
        measured = _allocator_peak(partial(adapter.forward, net, x, level, cond), True)
        planned = plan_trace.network_pass(adapter, planned_net, side, 2, True).peak
        out.append((f"generator, checkpointing {checkpointing}", measured, planned))
    guided = adapter.guidance_kind == "embedding"
    if guided:
        args = (x, level, cond, torch.full((2,), 3.5))
    else:
        args = (torch.cat([x, x]), torch.cat([level, level]), cond.cat(cond), None)
    measured = _allocator_peak(partial(adapter.forward, build_networks(adapter).teacher, *args), False)
    planned_net = build_empty(adapter, "teacher", torch.float32).to(plan_trace.META)
    planned = plan_trace.network_pass(adapter, planned_net, side, len(args[0]), False).peak
    out.append(("teacher without gradients", measured, planned))
    z = torch.randn(2, *adapter.sample_shape(side), requires_grad=True)
    measured = _allocator_peak(partial(_first, adapter.vae.decode, z, return_dict=False), True)
    planned = plan_trace.decode_pass(plan_counts.vae(adapter), tuple(z.shape[1:]), 2, True).peak
    out.append(("VAE decoder with gradients", measured, planned))
    return [(f"{side} px {family} {variant} {what}", m, p) for what, m, p in out]


def _vfm_passes(dino: Path, clip: Path, side: int) -> list[tuple[str, int, int]]:
    from senseflow.config.method import GANConfig
    from senseflow.models.vfm import build_vfm
    from senseflow.train import plan_counts, plan_trace

    out = []
    for checkpointing in (False, True):
        gan = GANConfig(
            type="vfm",
            weight=1.0,
            time_weight="alpha_sq",
            backbone=str(dino),
            text_encoder=str(clip),
            feature_blocks=[1, 3],
            backbone_checkpointing=checkpointing,
        )
        disc = build_vfm(gan, None, None)
        images = (torch.rand(2, 3, side, side) * 2 - 1).requires_grad_(True)
        cond = disc.conditioning(["a", "b"], None, partial(torch.rand, 2, 3, side, side))
        measured = _allocator_peak(partial(disc, images, cond), True)
        planned_disc, _, _ = plan_counts.vfm_parts(gan, text_cached=False)
        planned_disc.to(plan_trace.META).eval()
        meta = {k: torch.empty(v.shape, device=plan_trace.META) for k, v in cond.tensors.items()}
        modules = [planned_disc, planned_disc.backbone]
        shape = (3, side, side)
        planned = plan_trace.discriminator_pass(
            planned_disc, modules, shape, plan_trace.Conditioning(meta), 1, True, None
        ).peak
        out.append((f"{side} px VFM discriminator, checkpointing {checkpointing}", measured, planned))
    return out


def _iteration_checks(root: Path, family: str, variant: str, vfm: list[str]) -> list[tuple[str, int, int]]:
    """Two trainer iterations (the other turn, then a generator turn) counted with the planner's
    timeline, against the plan's turns."""
    from PIL import Image

    from senseflow.train import plan_trace
    from senseflow.train.plan import analyse, plan_for
    from senseflow.train.trainer import Distiller

    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        Image.new("RGB", (96, 80), (40 * i, 90, 160)).save(images / f"{i}.png")
    index = {
        "keys": list("0123"),
        "image_paths": [f"{i}.png" for i in range(4)],
        "prompts": ["a red cat"] * 4,
    }
    (images / "train.json").write_text(json.dumps(index))
    extra = [
        *vfm,
        "data.batch_size=2",
        "data.num_workers=0",
        "logging.every=1000",
        "logging.sample_every=null",
    ]
    extra += [
        "method.ttur_ratio=2",
        f"output_dir={root / 'run'}",
        "schedule.iterations=8",
        "optim.warmup_steps=0",
    ]
    cfg = _tiny_config(family, root / f"{family}_{variant}", 64, images / "train.json", *extra)
    turns = plan_for(analyse(cfg)).strategy("none").turns
    trainer = Distiller(cfg, progress=False)
    trainer.train_step()  # a generator turn: every optimiser has stepped, their states exist
    modules = [trainer.generator, trainer.fake_score, trainer.teacher, trainer.discriminator]
    modules.append(trainer.discriminator.backbone)
    out = []
    for _ in range(2):
        held = [t for m in modules for t in (*m.parameters(), *m.buffers())]
        held += [p.grad for m in modules for p in m.parameters() if p.grad is not None]
        held += [t for o in trainer.optimizers.values() for st in o.state.values() for t in st.values()]
        with torch.autograd.set_multithreading_enabled(False), plan_trace.Timeline(held) as timeline:
            logs = trainer.train_step()
        grads = {timeline.allocation(p.grad) for m in modules for p in m.parameters() if p.grad is not None}
        generator = bool(logs["generator_turn"])
        planned = (
            turns["generator_turn"] if generator else max(turns["fake_turn"], turns["discriminator_turn"])
        )
        what = f"trainer iteration {family} {variant}, generator turn {generator}"
        out.append((what, timeline.peak(grads - {None}), int(planned)))
    return out


def _tiny_config(family: str, folder: Path, side: int, data: Path, *extra: str):
    """The family's shipped recipe on a tiny folder: float32, one process on the CPU, plain AdamW."""
    from senseflow.config import load_config

    recipe = {"sdxl": "sdxl", "sd3": "sd35_large", "flux": "flux_dev"}[family]
    small = [
        f"model.teacher={folder}",
        f"data.path={data}",
        f"data.resolution={side}",
        "method.gan.type=none",
    ]
    small += ["precision.teacher_dtype=fp32", "precision.param_dtype=fp32", "precision.autocast_dtype=fp32"]
    small += ["parallel.strategy=none", "parallel.device=cpu", "parallel.gradient_checkpointing=false"]
    small += [f"optim.{n}.name=adamw" for n in ("generator", "fake", "discriminator")]
    small += [] if family == "sdxl" else ["model.max_sequence_length=8"]
    return load_config(recipe, [*small, *extra])


def accuracy_check(root: Path) -> None:
    """The planner's passes against the CPU allocator on the tiny random folders of the real
    classes (both variants of each family, 64 and 128 px, float32, batch 2), then trainer
    iterations with the VFM discriminator against the plan's turns (docs/scale.md's error table)."""
    from senseflow.families.tiny_vfm import write_tiny_clip, write_tiny_dinov2

    root.mkdir(parents=True, exist_ok=True)
    data = root / "train.json"
    data.write_text(json.dumps({"keys": ["0"], "image_paths": ["0.png"], "prompts": ["a red cat"]}))
    dino, clip = write_tiny_dinov2(root / "dino", layers=4), write_tiny_clip(root / "clip")
    rows = []
    for side in (64, 128):
        for family in ("sdxl", "sd3", "flux"):
            for variant in ("a", "b"):
                rows += _family_passes(root, family, variant, side, data)
        rows += _vfm_passes(dino, clip, side)
    vfm = ["method.gan.type=vfm", f"method.gan.backbone={dino}", f"method.gan.text_encoder={clip}"]
    vfm.append("method.gan.feature_blocks=[1,3]")
    for family, variant in (("sd3", "b"), ("flux", "b"), ("sdxl", "a")):
        rows += _iteration_checks(root, family, variant, vfm)
    for what, measured, planned in rows:
        print(f"{what}: measured {measured}, planned {planned}, {100 * (planned / measured - 1):+.1f} %")
    print("\n| passes | planned vs measured |\n|---|---|")
    groups = {
        "generator forward + backward": "generator, checkpointing",
        "VAE decoder with gradients": "VAE decoder",
        "VFM discriminator, gradient to its input": "VFM discriminator",
        "teacher without gradients": "teacher without",
        "trainer iteration, generator turn": "generator turn True",
        "trainer iteration, other turn": "generator turn False",
    }
    for label, key in groups.items():
        errors = [100 * (p / m - 1) for what, m, p in rows if key in what]
        print(f"| {label} | {min(errors):+.1f} % to {max(errors):+.1f} % |")
