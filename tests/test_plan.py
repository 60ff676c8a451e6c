"""``senseflow plan``: exact weight, gradient and optimiser bytes against materialised networks, FSDP2
shards against ``fully_shard``, activations against CPU measurements, config-only folders, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.distributed as dist

from senseflow.cli import main
from senseflow.config import load_config
from senseflow.devices import to_dtype
from senseflow.families.tiny_vfm import write_tiny_clip, write_tiny_dinov2
from senseflow.models import build_adapter
from senseflow.models.build import build_empty, build_networks
from senseflow.train import plan_counts as pc
from senseflow.train import plan_trace as pt
from senseflow.train.plan import analyse, format_plan, plan_for
from tests.family_helpers import RESOLUTION, family_cfg, write_image_dataset

# (family, teacher dtype, trained dtype): float32 and bf16 storage, classes' fp32-kept modules included
CASES = [("sdxl", "fp32", "fp32"), ("sd3", "bf16", "bf16"), ("flux", "bf16", "fp32")]
# Activation estimate against the CPU allocator: the largest relative error allowed for passes with
# gradients (measured: -13 % to +3 % on the tiny folders at 64 and 128 px, docs/scale.md).
ACTIVATION_TOLERANCE = 0.15
# Passes without gradients keep little, so the CPU kernels' own buffers weigh more (measured: -31 % to +2 %).
NO_GRAD_TOLERANCE = 0.35
# One iteration of the trainer against the plan's turns (same counter; measured: -17 % to +5 %).
ITERATION_TOLERANCE = 0.25


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def module_bytes(net) -> int:
    return nbytes(net.parameters()) + nbytes(net.buffers())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_image_dataset(tmp_path_factory.mktemp("plan_data"))


def recipe(tiny_folder, data, tmp_path, family, teacher="fp32", param="fp32", *extra):
    return family_cfg(
        family,
        tiny_folder(family, "a"),
        data,
        tmp_path / "run",
        f"precision.teacher_dtype={teacher}",
        f"precision.param_dtype={param}",
        *extra,
    )


@pytest.mark.parametrize(("family", "teacher", "param"), CASES)
def test_weights_gradients_and_optimiser_states_are_exact(
    tiny_folder, data, tmp_path, family, teacher, param
):
    cfg = recipe(tiny_folder, data, tmp_path, family, teacher, param)
    terms = plan_for(analyse(cfg, activations=False)).strategy("none").terms
    adapter = build_adapter(cfg, text_cache=False)
    nets = build_networks(adapter, to_dtype(teacher), to_dtype(param))
    for role in ("teacher", "generator", "fake_score"):
        assert terms[role] == module_bytes(getattr(nets, role)), role
    grads = states = 0
    for role in ("generator", "fake_score"):
        net = getattr(nets, role)
        x = torch.randn(2, *adapter.sample_shape(RESOLUTION))
        level = adapter.param.anchor_levels(adapter.anchors)[:1].expand(2)
        cond = adapter.encode_text(["a red cat", "a dog"])
        adapter.forward(net, x, level, cond).square().mean().backward()
        for p in net.parameters():  # parameters the loss does not reach get zero gradients
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads += nbytes(p.grad for p in net.parameters())
        optimiser = torch.optim.AdamW(net.parameters())
        optimiser.step()
        states += nbytes(t for s in optimiser.state.values() for t in s.values())
    assert terms["gradients"] == grads
    assert terms["optimiser"] == states
    text = sum(module_bytes(m) for m in adapter.text.values() if isinstance(m, torch.nn.Module))
    assert terms["text_encoders"] == text
    assert terms["vae"] == module_bytes(adapter.vae)


@pytest.mark.parametrize(("family", "param"), [("flux", "fp32"), ("sdxl", "bf16")])
def test_lora_mode_is_counted_as_the_trainer_builds_it(tiny_folder, data, tmp_path, family, param):
    from senseflow.train.lora_mode import build_lora_roles

    cfg = recipe(
        tiny_folder, data, tmp_path, family, "bf16", param, "model.lora={rank: 4}", "method.gan.type=none"
    )
    lora = plan_for(analyse(cfg, activations=False)).strategy("lora")
    adapter = build_adapter(cfg, text_cache=False)
    roles = build_lora_roles(adapter, cfg, torch.bfloat16, to_dtype(param), torch.device("cpu"))
    base = roles["teacher"].base
    assert lora.terms["teacher"] == nbytes(
        p for n, p in base.named_parameters() if "lora_" not in n
    ) + nbytes(base.buffers())
    for role in ("generator", "fake_score"):
        assert lora.terms[role] == nbytes(roles[role].parameters()) > 0
    assert lora.terms["gradients"] == 2 * lora.terms["generator"]  # one rank: no DDP buckets
    states = 0
    for role in ("generator", "fake_score"):
        params = list(roles[role].parameters())
        for q in params:
            q.grad = torch.zeros_like(q)
        optimiser = torch.optim.AdamW(params)
        optimiser.step()
        states += nbytes(t for st in optimiser.state.values() for t in st.values())
    assert lora.terms["optimiser"] == states
    rank8 = plan_for(analyse(cfg, lora_rank=8, activations=False)).strategy("lora")
    assert rank8.terms["generator"] == 2 * lora.terms["generator"]  # A and B both grow with r


@pytest.mark.parametrize("ranks", [3, 4])
def test_fsdp_shards_are_those_fully_shard_makes(tiny_folder, data, tmp_path, ranks):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    cfg = recipe(tiny_folder, data, tmp_path, "sdxl", "bf16", "fp32")
    adapter = build_adapter(cfg, text_cache=False)
    nets = {role: build_empty(adapter, role, torch.float32) for role in ("teacher", "generator")}
    expected = {
        role: (pc.weight_bytes(net, ranks), pc.grad_bytes(net.parameters(), ranks))
        for role, net in nets.items()
    }
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=ranks)
    try:
        mesh = init_device_mesh("cpu", (ranks,))
        for role, net in nets.items():
            for unit in adapter.shard_units(net):
                fully_shard(unit, mesh=mesh)
            fully_shard(net, mesh=mesh)
            local = [p.to_local() for p in net.parameters()]  # rank 0's shards, the largest
            assert expected[role] == (nbytes(local) + nbytes(net.buffers()), nbytes(local)), role
    finally:
        dist.destroy_process_group()


def test_strategies_share_out_the_same_bytes(tiny_folder, data, tmp_path):
    cfg = recipe(tiny_folder, data, tmp_path, "flux", "bf16", "fp32", "optim.generator.name=adamw8bit")
    analysis = analyse(cfg, activations=False)
    p = plan_for(analysis, gpus=4, nodes=2)
    none, ddp, fsdp, off = (p.strategy(n) for n in ("none", "ddp", "fsdp", "fsdp_offload"))
    assert ddp.terms["gradients"] == 2 * none.terms["gradients"]  # DDP's buckets
    assert fsdp.shard == 8 and fsdp.terms["gathered"] > 0 and none.terms["gathered"] == 0
    for role in ("teacher", "generator", "fake_score"):
        assert fsdp.terms[role] == pc.weight_bytes(analysis.nets[role], 8)
        assert off.terms[role] == 0
    assert off.host == sum(
        fsdp.terms[k] for k in ("teacher", "generator", "fake_score", "gradients", "optimiser")
    )
    trained = pc.trained(analysis.nets["generator"])
    assert fsdp.terms["optimiser"] == pc.optimiser_bytes(trained, "adamw8bit", 8) + pc.optimiser_bytes(
        pc.trained(analysis.nets["fake_score"]), "adamw", 8
    )
    cached = plan_for(
        analyse(load_config(cfg.model_dump(), ["model.text_cache=somewhere"]), activations=False)
    )
    assert cached.strategy("none").terms["text_encoders"] == 0 < none.terms["text_encoders"]


def test_eight_bit_adamw_follows_the_bitsandbytes_layout():
    small, large = torch.empty(4095, device="meta"), torch.empty(64, 1000, device="meta")
    assert pc.optimiser_bytes([small], "adamw8bit") == pc.BNB_TABLES + 8 * 4095
    assert pc.optimiser_bytes([large], "adamw8bit") == pc.BNB_TABLES + 2 * 64000 + 8 * 250
    assert pc.optimiser_bytes([large.to(torch.bfloat16)], "adamw") == 4 * 64000 + 4


def test_hsdp_shards_within_the_replica_groups(tiny_folder, data, tmp_path):
    cfg = recipe(
        tiny_folder,
        data,
        tmp_path,
        "sdxl",
        "bf16",
        "fp32",
        "parallel.strategy=fsdp",
        "parallel.replicate_degree=2",
    )
    p = plan_for(analyse(cfg, activations=False), gpus=8, nodes=2)
    assert p.strategy("fsdp").shard == 8 and p.strategy("fsdp").label.startswith("HSDP 2x8")
    with pytest.raises(ValueError, match=r"parallel\.replicate_degree"):
        plan_for(analyse(cfg, activations=False), gpus=3)


def test_a_folder_of_configs_alone_plans_like_the_full_folder(tiny_folder, data, tmp_path):
    full = tiny_folder("flux", "a")
    bare = tmp_path / "configs_only"
    for path in full.rglob("*.json"):  # model_index.json and each component's config, no weights
        (bare / path.relative_to(full)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, bare / path.relative_to(full))
    assert not list(bare.rglob("*.safetensors"))
    a = plan_for(analyse(family_cfg("flux", full, data, tmp_path / "a"), activations=False))
    b = plan_for(analyse(family_cfg("flux", bare, data, tmp_path / "b")))
    for s, t in zip(a.strategies, b.strategies, strict=True):
        assert {**s.terms, "activations": 0} == {**t.terms, "activations": 0}
        assert t.terms["activations"] > 0


def _measured_peak(fn, train: bool) -> int:
    """The most bytes the CPU allocator holds during one pass (forward, and backward with ``train``)
    beyond what it held before, weight gradients left out, from the profiler's memory timeline."""
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
    s = np.array(sizes)  # per time: a column per category (parameter, optimiser state, input,
    held = s[:, 1:].sum(axis=1) - s[:, 6]  # temporary, activation, gradient, autograd, unknown)
    return int(held.max() - held[0])  # the first row: what existed before the pass


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_network_passes_match_a_cpu_measurement(tiny_folder, data, tmp_path, family, checkpointing):
    cfg = recipe(tiny_folder, data, tmp_path, family)
    adapter = build_adapter(cfg, text_cache=False)
    nets = build_networks(adapter)
    meta = build_empty(adapter, "generator", torch.float32).to(pt.META)
    if checkpointing:
        adapter.enable_gradient_checkpointing(nets.generator)
        adapter.enable_gradient_checkpointing(meta)
    x = torch.randn(2, *adapter.sample_shape(RESOLUTION))
    level = adapter.param.anchor_levels(adapter.anchors)[:1].expand(2)
    cond = adapter.encode_text(["a red cat", "a dog"])
    assert {k: tuple(v.shape[1:]) for k, v in cond.tensors.items()} == pt.conditioning_shapes(adapter)
    measured = _measured_peak(lambda: adapter.forward(nets.generator, x, level, cond), True)
    planned = pt.network_pass(adapter, meta, RESOLUTION, 2, True).peak
    assert abs(planned / measured - 1) <= ACTIVATION_TOLERANCE, (planned, measured)
    if not checkpointing:  # the teacher's guided pass without gradients (CFG: twice the batch)
        guided = adapter.guidance_kind == "embedding"
        n, scale = (2, torch.full((2,), 3.5)) if guided else (4, None)
        xs, levels, conds = (
            (x, level, cond) if guided else (torch.cat([x, x]), torch.cat([level, level]), cond.cat(cond))
        )
        measured = _measured_peak(lambda: adapter.forward(nets.teacher, xs, levels, conds, scale), False)
        teacher = build_empty(adapter, "teacher", torch.float32).to(pt.META)
        planned = pt.network_pass(adapter, teacher, RESOLUTION, n, False).peak
        assert abs(planned / measured - 1) <= NO_GRAD_TOLERANCE, (planned, measured)


def test_the_decoder_pass_matches_a_cpu_measurement(tiny_folder, data, tmp_path):
    adapter = build_adapter(recipe(tiny_folder, data, tmp_path, "sd3"), text_cache=False)
    shape = adapter.sample_shape(RESOLUTION)
    z = torch.randn(2, *shape, requires_grad=True)
    measured = _measured_peak(lambda: adapter.vae.decode(z, return_dict=False)[0], True)
    planned = pt.decode_pass(pc.vae(adapter), shape, 2, True).peak
    assert abs(planned / measured - 1) <= ACTIVATION_TOLERANCE, (planned, measured)


def test_the_vfm_discriminator_and_one_trainer_iteration(tiny_folder, data, tmp_path):
    from senseflow.models.vfm import build_vfm
    from senseflow.train.trainer import Distiller

    dino, clip = write_tiny_dinov2(tmp_path / "dino", layers=2), write_tiny_clip(tmp_path / "clip")
    vfm = ["method.gan.type=vfm", f"method.gan.backbone={dino}", f"method.gan.text_encoder={clip}"]
    # G's turn first (period_start), so the second measured iteration has every optimiser's state
    turns = ["method.gan.feature_blocks=[1]", "method.ttur_generator_turn=period_start"]
    cfg = recipe(tiny_folder, data, tmp_path, "sd3", "fp32", "fp32", *vfm, *turns)
    none = plan_for(analyse(cfg)).strategy("none")
    # counted: D's heads, its backbone and CLIP tower (no text cache), the heads' gradients and states
    disc = build_vfm(cfg.method.gan, None, None)
    disc.text._load()
    heads = list(disc.trainable_parameters())
    frozen = module_bytes(disc.backbone) + module_bytes(disc.text._model)
    states = pc.optimiser_bytes(heads, "adamw")
    assert none.terms["discriminator"] == module_bytes(disc) + frozen + nbytes(heads) + states
    # measured: D's pass with the gradient to its input, against the CPU allocator
    x = torch.rand(2, 3, RESOLUTION, RESOLUTION, requires_grad=True) * 2 - 1
    cond = disc.conditioning(["a", "b"], None, lambda: torch.rand(2, 3, RESOLUTION, RESOLUTION))
    measured = _measured_peak(lambda: disc(x, cond), True)
    meta, _, _ = pc.vfm_parts(cfg.method.gan, text_cached=False)
    meta.to(pt.META).eval()
    meta_cond = pt.Conditioning({k: torch.empty(v.shape, device=pt.META) for k, v in cond.tensors.items()})
    adapter = build_adapter(cfg, text_cache=False)
    shape = (3, RESOLUTION, RESOLUTION)
    planned = pt.discriminator_pass(meta, [meta, meta.backbone], shape, meta_cond, 1, True, adapter).peak
    assert abs(planned / measured - 1) <= ACTIVATION_TOLERANCE, (planned, measured)
    # the turns combined: the trainer's own iterations on the CPU, counted by the same timeline
    trainer = Distiller(cfg, progress=False)
    trainer.train_step()  # a generator turn (ttur 2): every optimiser has stepped, their states exist
    modules = [trainer.generator, trainer.fake_score, trainer.teacher, trainer.discriminator, disc.backbone]
    modules[-1] = trainer.discriminator.backbone
    for _ in range(2):  # the other turn, then a generator turn
        params = [t for m in modules for t in (*m.parameters(), *m.buffers())]
        grads = [p.grad for m in modules for p in m.parameters() if p.grad is not None]
        held = [t for o in trainer.optimizers.values() for st in o.state.values() for t in st.values()]
        with (
            torch.autograd.set_multithreading_enabled(False),
            pt.Timeline([*params, *grads, *held]) as timeline,
        ):
            logs = trainer.train_step()
        grads = {timeline.allocation(p.grad) for m in modules for p in m.parameters() if p.grad is not None}
        measured = timeline.peak(grads - {None})
        turns = none.turns
        planned = (
            turns["generator_turn"]
            if logs["generator_turn"]
            else max(turns["fake_turn"], turns["discriminator_turn"])
        )
        assert abs(planned / measured - 1) <= ITERATION_TOLERANCE, (logs["generator_turn"], planned, measured)


def test_the_command_prints_a_plan_and_json(tiny_folder, data, tmp_path, capsys):
    args = ["plan", "flux_dev", f"model.teacher={tiny_folder('flux', 'a')}", f"data.path={data}"]
    args += ["method.gan.type=dmd2_head", "model.max_sequence_length=8", "data.resolution=64"]
    assert main([*args, "--gpus", "2", "--json", "--batch", "3"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["batch"] == 3 and plan["gpus"] == 2 and plan["strategies"][0]["name"] == "none"
    for s in plan["strategies"]:
        assert s["total"] == sum(s["terms"].values()) and s["max_batch"] >= 3


def test_largest_batch_is_the_last_that_fits(tiny_folder, data, tmp_path):
    cfg = recipe(tiny_folder, data, tmp_path, "sd3")
    analysis = analyse(cfg)
    loose = plan_for(analysis).strategy("none")
    fixed = loose.total - loose.terms["activations"]
    memory = (fixed + analysis.activations.at(5)) / pc.GIB  # room for exactly five samples
    tight = plan_for(analysis, gpu_memory=memory, batch=6)
    assert tight.strategy("none").max_batch == 5 and not tight.strategy("none").fits
    table = format_plan(tight)
    assert "largest batch per GPU" in table and "one process" in table and "fits in" in table


def errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plan", "no_such_recipe.yaml"], "recipe file not found"),
        (["plan", "toy/distill", "--gpus", "0"], "--gpus: expected a positive whole number, got 0"),
        (["plan", "toy/distill", "--gpu-memory", "0"], "--gpu-memory"),
    ],
)
def test_bad_input_gives_one_clear_error(args, message, capsys):
    assert main(args) == 2
    err = errors(capsys)
    assert len(err) == 1 and message in err[0]


def test_a_folder_without_configs_names_the_missing_file(tiny_folder, data, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_folder("flux", "a") / "model_index.json", bare / "model_index.json")
    args = ["plan", "flux_dev", f"model.teacher={bare}", f"data.path={data}", "model.max_sequence_length=8"]
    assert main(args) == 2
    err = errors(capsys)
    assert len(err) == 1 and str(bare / "transformer" / "config.json") in err[0]
    (tmp_path / "empty").mkdir()
    assert main([*args[:2], f"model.teacher={tmp_path / 'empty'}", *args[3:]]) == 2
    assert "model_index.json" in capsys.readouterr().err
