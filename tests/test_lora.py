"""LoRA mode: adapters on one frozen base (models/lora.py) and their gradient checkpointing
(models/lora_checkpoint.py); IDA between adapters is in tests/test_ida_lora.py."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn

from senseflow.families.toy.folder import shipped_teacher_path
from senseflow.method.ida_lora import (
    check_ida_lora_compatible,
    ida_lora_update_,
)
from senseflow.models.lora import (
    DEFAULT_TARGET_MODULES,
    LoraRole,
    LoraSettings,
    adapter_names,
    adapter_state_dict,
    attach_lora,
    base_fingerprint,
    load_adapter_state_dict,
    lora_layers,
    use_adapter,
)
from senseflow.models.lora_checkpoint import enable_lora_gradient_checkpointing

# ----------------------------------------------------------------------------------- helpers


def toy_base() -> SD3Transformer2DModel:
    """The shipped toy teacher's transformer (a small SD3Transformer2DModel), float32."""
    torch.manual_seed(0)
    return SD3Transformer2DModel.from_pretrained(shipped_teacher_path(), subfolder="transformer")


def toy_inputs(batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(3)
    return {
        "hidden_states": torch.randn(batch, 3, 32, 32, generator=g),
        "encoder_hidden_states": torch.randn(batch, 5, 64, generator=g),
        "pooled_projections": torch.randn(batch, 64, generator=g),
        "timestep": torch.tensor([700.0, 150.0][:batch]),
        "return_dict": False,
    }


def call(net: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return net(**inputs)[0]


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to float32 rounding. Not ``torch.equal``: on the CPU the same linear layer on the same
    values can differ in the last bits between two forward passes (the BLAS kernel depends on where
    buffers lie); measured here up to 3e-6 on outputs of size ~4. A perturbed adapter moves the
    output by orders of magnitude more (checked where it matters)."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def perturb_(params, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def roles(base):
    return LoraRole(base, "generator"), LoraRole(base, "fake_score"), LoraRole(base, None)


def layer_states(base):
    return [(tuple(layer.active_adapters), layer.disable_adapters) for layer in lora_layers(base)]


@pytest.fixture(scope="module")
def toy_teacher_out():
    return call(toy_base(), toy_inputs())


# ----------------------------------------------------------------------------------- settings


def test_settings_validate_their_fields():
    assert LoraSettings(rank=8, alpha=4).scaling == 0.5
    assert LoraSettings(target_modules=["to_q"]).target_modules == ("to_q",)
    for bad in (
        {"rank": 0},
        {"alpha": 0},
        {"init": "pissa"},
        {"init": "orthogonal", "rank": 3},
        {"dropout": 1.0},
        {"target_modules": "to_q"},
        {"target_modules": ()},
    ):
        with pytest.raises(ValueError):
            LoraSettings(**bad)
    config = LoraSettings(rank=4, alpha=2, init="gaussian").peft_config()
    assert (config.r, config.lora_alpha, config.init_lora_weights) == (4, 2, "gaussian")


# ----------------------------------------------------------------------------------- attach and views


@pytest.mark.parametrize("init", ["default", "gaussian", "orthogonal"])
def test_every_view_is_the_teacher_at_the_start(init, toy_teacher_out):
    base = toy_base()
    before = base_fingerprint(base)
    adapted = attach_lora(base, LoraSettings(rank=4, alpha=8, init=init))
    assert len(adapted) == 31  # 4 joint blocks x 8 projections, the last one without to_add_out
    assert base_fingerprint(base) == before
    gen_state, fake_state = adapter_state_dict(base, "generator"), adapter_state_dict(base, "fake_score")
    assert gen_state.keys() == fake_state.keys()
    assert all(torch.equal(gen_state[k], fake_state[k]) for k in gen_state)
    assert any(v.abs().sum() > 0 for k, v in gen_state.items() if "lora_A" in k)
    inputs = toy_inputs()
    for view in roles(base):
        assert_same(call(view, inputs), toy_teacher_out)


def test_same_seed_same_adapters_and_global_rng_untouched():
    a, b = toy_base(), toy_base()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    attach_lora(a, LoraSettings(rank=4, seed=7))
    assert torch.equal(torch.rand(3), expected)
    attach_lora(b, LoraSettings(rank=4, seed=7))
    sa, sb = adapter_state_dict(a, "generator"), adapter_state_dict(b, "generator")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_parameters_of_a_view_are_its_adapter_and_stay_trainable():
    base = toy_base()
    attach_lora(base, LoraSettings(rank=4))
    gen, fake, teacher = roles(base)
    g_names = [n for n, _ in gen.named_parameters()]
    f_names = [n for n, _ in fake.named_parameters()]
    assert g_names and all(".generator." in n for n in g_names)
    assert len(f_names) == len(g_names) and all(".fake_score." in n for n in f_names)
    assert list(teacher.parameters()) == []
    trainable = {id(p) for p in base.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in gen.parameters()} | {id(p) for p in fake.parameters()}
    assert not {id(p) for p in gen.parameters()} & {id(p) for p in fake.parameters()}
    assert list(gen.children()) == [] and gen.base is base
    assert gen.config.num_layers == base.config.num_layers  # attributes are read from the base
    inputs = toy_inputs()
    state = layer_states(base)
    for view in (gen, fake, teacher, gen):
        view(**inputs)
        assert all(p.requires_grad for p in gen.parameters())
        assert all(p.requires_grad for p in fake.parameters())
        assert not any(p.requires_grad for n, p in base.named_parameters() if "lora_" not in n)
        assert layer_states(base) == state  # the base's own state is restored after every call


def test_only_the_perturbed_adapter_changes_its_view(toy_teacher_out):
    base = toy_base()
    before = base_fingerprint(base)
    attach_lora(base, LoraSettings(rank=4))
    gen, fake, teacher = roles(base)
    perturb_(gen.parameters(), seed=1)
    inputs = toy_inputs()
    assert (call(gen, inputs) - toy_teacher_out).abs().max() > 1e-2
    assert_same(call(fake, inputs), toy_teacher_out)
    assert_same(call(teacher, inputs), toy_teacher_out)
    assert_same(call(base, inputs), toy_teacher_out)  # outside a view: adapters disabled

    # a real training step through each view: only that adapter moves, the base never does
    for view in (gen, fake):
        opt = torch.optim.AdamW(view.parameters(), lr=1e-2)
        other = fake if view is gen else gen
        other_before = [p.detach().clone() for p in other.parameters()]
        view(**inputs)[0].square().mean().backward()
        assert all(p.grad is None for p in other.parameters())
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert all(torch.equal(p, q) for p, q in zip(other.parameters(), other_before, strict=True))
    assert_same(call(teacher, inputs), toy_teacher_out)
    assert base_fingerprint(base) == before


def test_use_adapter_nests_and_restores():
    base = toy_base()
    attach_lora(base, LoraSettings(rank=4))
    outer = layer_states(base)
    with use_adapter(base, "generator"):
        assert layer_states(base)[0] == (("generator",), False)
        with use_adapter(base, None):
            assert layer_states(base)[0][1] is True
        assert layer_states(base)[0] == (("generator",), False)
    assert layer_states(base) == outer
    with pytest.raises(ValueError, match=r"no LoRA adapter named 'student'.*fake_score, generator"):
        LoraRole(base, "student")


def test_attach_errors_are_clear():
    base = toy_base()
    listed = r"match no module of SD3Transformer2DModel.*named: .*proj_out.*to_out\.0, to_q"
    with pytest.raises(ValueError, match=listed):
        attach_lora(base, LoraSettings(target_modules=("q_proj", "v_proj")))
    with pytest.raises(ValueError, match="distinct"):
        attach_lora(base, LoraSettings(), names=("a", "a"))
    attach_lora(base, LoraSettings(rank=2))
    with pytest.raises(ValueError, match="already has adapters"):
        attach_lora(base, LoraSettings(rank=2), names=("generator",))
    with pytest.raises(ValueError, match="no LoRA layers"):
        LoraRole(toy_base(), "generator")


def test_adapters_can_be_stored_in_float32_on_a_bf16_base():
    base = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 9)).to(torch.bfloat16)
    before = base_fingerprint(base)
    attach_lora(base, LoraSettings(rank=2, target_modules=("0", "2")), adapter_dtype=torch.float32)
    gen = LoraRole(base, "generator")
    assert {p.dtype for p in gen.parameters()} == {torch.float32}
    assert {p.dtype for n, p in base.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    perturb_(gen.parameters(), seed=0)
    out = gen(torch.randn(3, 12, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in gen.parameters())
    assert base_fingerprint(base) == before


# ----------------------------------------------------------------------------------- saving


def test_adapter_state_round_trip_through_safetensors(tmp_path):
    base = toy_base()
    attach_lora(base, LoraSettings(rank=4))
    gen, fake, _ = roles(base)
    perturb_(gen.parameters(), seed=2)
    state = adapter_state_dict(base, "generator")
    assert all(".generator." not in k and ("lora_A" in k or "lora_B" in k) for k in state)
    assert len(state) == len(list(gen.parameters()))
    save_file(state, tmp_path / "generator.safetensors")
    load_adapter_state_dict(base, "fake_score", load_file(tmp_path / "generator.safetensors"))
    inputs = toy_inputs()
    assert_same(call(fake, inputs), call(gen, inputs))
    assert all(p.requires_grad for p in fake.parameters())
    # a fresh base loads it as well
    other = toy_base()
    attach_lora(other, LoraSettings(rank=4))
    load_adapter_state_dict(other, "generator", state)
    assert_same(call(LoraRole(other, "generator"), inputs), call(gen, inputs))
    with pytest.raises(ValueError, match=r"missing.*unexpected"):
        load_adapter_state_dict(base, "fake_score", {**dict(list(state.items())[1:]), "x.lora_A.weight": 0})
    key = next(iter(state))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_adapter_state_dict(base, "fake_score", {**state, key: torch.zeros(1, 1)})


def test_view_state_dict_holds_the_adapter_only():
    base = toy_base()
    attach_lora(base, LoraSettings(rank=4))
    gen, fake, teacher = roles(base)
    perturb_(gen.parameters(), seed=4)
    sd = gen.state_dict()
    assert list(sd) == [n for n, _ in gen.named_parameters()]
    assert teacher.state_dict() == {}
    renamed = {k.replace(".generator.", ".fake_score."): v for k, v in sd.items()}
    fake.load_state_dict(renamed)
    inputs = toy_inputs()
    assert_same(call(fake, inputs), call(gen, inputs))
    with pytest.raises(RuntimeError, match="Missing key"):
        fake.load_state_dict(dict(list(renamed.items())[1:]))


# ----------------------------------------------------------------------------------- checkpointing


def _generator_grads(checkpointing: str) -> dict[str, torch.Tensor]:
    """Gradients of a loss through the generator view; the fake score runs (and stays active) between
    the generator's forward and its backward."""
    base = toy_base()
    attach_lora(base, LoraSettings(rank=4))
    perturb_([p for n, p in base.named_parameters() if "lora_" in n], seed=5, scale=0.1)
    if checkpointing == "lora":
        enable_lora_gradient_checkpointing(base)
    elif checkpointing == "plain":
        base.enable_gradient_checkpointing()
    gen, fake, _ = roles(base)
    inputs = toy_inputs()
    out = gen(**inputs)[0]
    with torch.no_grad():
        fake(**inputs)
    with use_adapter(base, "fake_score"):
        out.square().mean().backward()
    assert all(p.grad is None for p in fake.parameters())
    return {n: p.grad.clone() for n, p in gen.named_parameters()}


def test_checkpoint_recompute_uses_the_forward_adapter():
    reference = _generator_grads("none")
    checkpointed = _generator_grads("lora")
    for name, grad in reference.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    # the test is sensitive: diffusers' own checkpointing recomputes with the fake's adapter
    plain = _generator_grads("plain")
    assert max((plain[n] - g).abs().max().item() for n, g in reference.items()) > 1e-3


def _tiny_inputs(family: str, net: nn.Module) -> dict:
    cfg = net.config
    g = torch.Generator().manual_seed(0)
    if family == "flux":
        tokens, text = 16, 6
        inputs = {
            "hidden_states": torch.randn(2, tokens, cfg.in_channels, generator=g),
            "encoder_hidden_states": torch.randn(2, text, cfg.joint_attention_dim, generator=g),
            "pooled_projections": torch.randn(2, cfg.pooled_projection_dim, generator=g),
            "timestep": torch.tensor([0.5, 0.2]),
            "img_ids": torch.randn(tokens, 3, generator=g),
            "txt_ids": torch.zeros(text, 3),
            "return_dict": False,
        }
        if cfg.guidance_embeds:
            inputs["guidance"] = torch.tensor([3.0, 3.0])
        return inputs
    text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return {
        "sample": torch.randn(2, cfg.in_channels, 16, 16, generator=g),
        "timestep": torch.tensor([500, 100]),
        "encoder_hidden_states": torch.randn(2, 7, cfg.cross_attention_dim, generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(2, text_dim, generator=g),
            "time_ids": torch.randn(2, 6, generator=g),
        },
        "return_dict": False,
    }


@pytest.mark.parametrize(
    ("family", "cls", "subfolder"),
    [("flux", FluxTransformer2DModel, "transformer"), ("sdxl", UNet2DConditionModel, "unet")],
)
def test_checkpoint_recompute_on_flux_and_the_unet(tiny_folder, family, cls, subfolder):
    """FLUX's double and single blocks and the UNet's resnets and attentions checkpoint through the
    same diffusers hook: the recompute uses the generator's adapter there too."""

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        net = cls.from_pretrained(tiny_folder(family, "a"), subfolder=subfolder)
        attach_lora(net, LoraSettings(rank=2))
        perturb_([p for n, p in net.named_parameters() if "lora_" in n], seed=0, scale=0.1)
        if checkpointing:
            enable_lora_gradient_checkpointing(net)
        gen, fake = LoraRole(net, "generator"), LoraRole(net, "fake_score")
        inputs = _tiny_inputs(family, net)
        out = gen(**inputs)[0]
        with torch.no_grad():
            fake(**inputs)
        with use_adapter(net, "fake_score"):
            out.square().mean().backward()
        return {n: p.grad.clone() for n, p in gen.named_parameters()}

    reference, checkpointed = grads(False), grads(True)
    for name, grad in reference.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-6, atol=1e-7, msg=name)


# ----------------------------------------------------------------------------------- real families


def _attention_projections(net: nn.Module) -> set[str]:
    """Every attention module's q/k/v/out projections (and the context stream's, where present)."""
    found = set()
    for name, module in net.named_modules():
        if not isinstance(getattr(module, "to_q", None), nn.Linear):
            continue
        for attr in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            if isinstance(getattr(module, attr, None), nn.Module):
                found.add(f"{name}.{attr}")
        if isinstance(getattr(module, "to_out", None), nn.ModuleList):
            found.add(f"{name}.to_out.0")
    return found


@pytest.mark.parametrize(
    ("family", "cls", "subfolder"),
    [
        ("sd3", SD3Transformer2DModel, "transformer"),
        ("flux", FluxTransformer2DModel, "transformer"),
        ("sdxl", UNet2DConditionModel, "unet"),
    ],
)
def test_default_targets_are_the_attention_projections_of_each_family(tiny_folder, family, cls, subfolder):
    net = cls.from_pretrained(tiny_folder(family, "a"), subfolder=subfolder)
    before = base_fingerprint(net)
    expected = _attention_projections(net)
    adapted = attach_lora(net, LoraSettings(rank=2, target_modules=DEFAULT_TARGET_MODULES))
    assert expected and set(adapted) == expected
    assert adapter_names(net) == ["fake_score", "generator"]
    assert base_fingerprint(net) == before
    if family == "flux":  # single-stream blocks: q/k/v only (their output is proj_out)
        assert any(n.startswith("single_transformer_blocks.") and n.endswith("to_q") for n in adapted)
        assert any(n.endswith("add_q_proj") for n in adapted)
    if family == "sdxl":  # self- and cross-attention
        assert any(n.endswith("attn1.to_q") for n in adapted)
        assert any(n.endswith("attn2.to_k") for n in adapted)
    check_ida_lora_compatible(net)
    assert ida_lora_update_(net, 0.97, "products").modules == len(adapted)
