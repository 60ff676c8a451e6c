"""Single-file export of the flow families: the original key layouts of FLUX.1 and SD3 / SD3.5, and
their LoRAs, read back by diffusers' own loaders (``from_single_file``, ``load_lora_weights``).

diffusers' FLUX converters fix FLUX.1's width: the single-file converter splits ``linear1`` at
3072 / 12288 rows and the kohya LoRA converter splits the ``linear1`` LoRA the same way. The tiny models
here are narrower, so for them the tests run diffusers' own function, recompiled from its installed
source with only that constant replaced by the tiny width (:func:`_at_width`); every other line of the
conversion is diffusers' as shipped.
"""

from __future__ import annotations

import inspect
import json
import textwrap

import pytest
import torch
from diffusers import (
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.loaders import lora_pipeline, single_file_model, single_file_utils
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from senseflow.families.flux.single_file import flux_kohya_lora_state_dict, flux_original_state_dict
from senseflow.families.sd3.single_file import sd3_diffusers_lora_state_dict, sd3_original_state_dict

VARIANTS = ("a", "b")
MODELS = {"flux": FluxTransformer2DModel, "sd3": SD3Transformer2DModel}
FLUX_WIDTH = 3072  # FLUX.1's model width, fixed in diffusers' FLUX converters


@pytest.fixture(autouse=True)
def _threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def _at_width(fn, old: str, new: str):
    """diffusers' function ``fn`` recompiled from its source with ``old`` replaced by ``new`` (or ``fn``
    itself when its source no longer holds ``old``)."""
    source = textwrap.dedent(inspect.getsource(fn))
    if source.count(old) != 1:
        return fn
    namespace = dict(fn.__globals__)
    exec(compile(source.replace(old, new), inspect.getsourcefile(fn), "exec"), namespace)
    return namespace[fn.__name__]


@pytest.fixture
def flux_width(monkeypatch):
    """``flux_width(inner)``: point diffusers' FLUX single-file and kohya LoRA converters at a model of
    width ``inner`` (single-block MLP 4 * inner) for the rest of the test."""

    def patch(inner: int) -> None:
        if inner == FLUX_WIDTH:
            return
        convert = _at_width(
            single_file_utils.convert_flux_transformer_checkpoint_to_diffusers,
            f"inner_dim = {FLUX_WIDTH}",
            f"inner_dim = {inner}",
        )
        mapping = single_file_model.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]
        monkeypatch.setitem(mapping, "checkpoint_mapping_fn", convert)
        w = FLUX_WIDTH
        kohya = _at_width(
            lora_pipeline._convert_kohya_flux_lora_to_diffusers,
            f"dims=[{w}, {w}, {w}, {4 * w}]",
            f"dims=[{inner}, {inner}, {inner}, {4 * inner}]",
        )
        monkeypatch.setattr(lora_pipeline, "_convert_kohya_flux_lora_to_diffusers", kohya)

    return patch


def _width(config) -> int:
    return config["num_attention_heads"] * config["attention_head_dim"]


def _convert(family: str, state: dict, config) -> dict:
    return (flux_original_state_dict if family == "flux" else sd3_original_state_dict)(state, dict(config))


def _assert_same(loaded: dict, original: dict) -> None:
    assert set(loaded) == set(original)
    differing = [k for k in original if not torch.equal(loaded[k], original[k])]
    assert not differing, differing


def _round_trip(family, model, tmp_path, config_folder, **kwargs) -> dict:
    original = model.state_dict()
    converted = _convert(family, original, model.config)
    path = tmp_path / f"{family}.safetensors"
    save_file(converted, str(path))
    assert set(load_file(str(path))) == set(converted)
    loaded = MODELS[family].from_single_file(
        str(path), config=str(config_folder), subfolder="transformer", **kwargs
    )
    _assert_same(loaded.state_dict(), original)
    return converted


# ------------------------------------------------------------------------------- transformer layout


@pytest.mark.parametrize("variant", VARIANTS)
def test_flux_transformer_round_trips_through_from_single_file(tiny_folder, tmp_path, flux_width, variant):
    folder = tiny_folder("flux", variant)
    model = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    flux_width(_width(model.config))
    converted = _round_trip("flux", model, tmp_path, folder)

    assert "double_blocks.0.img_attn.qkv.weight" in converted
    assert "single_blocks.0.linear1.weight" in converted
    assert "guidance_in.in_layer.weight" in converted
    assert single_file_utils.infer_diffusers_model_type(converted) == "flux-dev"
    # (scale, shift) in diffusers, (shift, scale) in the original layout
    scale, shift = model.state_dict()["norm_out.linear.weight"].chunk(2)
    assert torch.equal(converted["final_layer.adaLN_modulation.1.weight"], torch.cat([shift, scale]))


def test_flux_student_without_guidance_round_trips(tiny_folder, tmp_path, flux_width):
    teacher_folder = tiny_folder("flux", "b")
    teacher = FluxTransformer2DModel.from_pretrained(teacher_folder, subfolder="transformer")
    config = {k: v for k, v in teacher.config.items() if not k.startswith("_")}
    student = FluxTransformer2DModel.from_config({**config, "guidance_embeds": False})
    weights = {k: v for k, v in teacher.state_dict().items() if "guidance_embedder" not in k}
    student.load_state_dict(weights, strict=True)
    flux_width(_width(student.config))

    # diffusers builds the model from the config it is given and fills guidance_in only when the file has
    # it; without a config it picks FLUX.1-schnell's (no guidance) for a file without guidance_in.
    student_folder = tmp_path / "student"
    student.save_config(student_folder / "transformer")
    converted = _round_trip("flux", student, tmp_path, student_folder)
    assert not any(k.startswith("guidance_in.") for k in converted)
    assert single_file_utils.infer_diffusers_model_type(converted) == "flux-schnell"
    # the teacher's folder with guidance_embeds overridden reads the same file
    loaded = FluxTransformer2DModel.from_single_file(
        str(tmp_path / "flux.safetensors"),
        config=str(teacher_folder),
        subfolder="transformer",
        guidance_embeds=False,
    )
    _assert_same(loaded.state_dict(), student.state_dict())


@pytest.mark.parametrize("variant", VARIANTS)
def test_sd3_transformer_round_trips_through_from_single_file(tiny_folder, tmp_path, variant):
    folder = tiny_folder("sd3", variant)
    model = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer")
    converted = _round_trip("sd3", model, tmp_path, folder)

    p = "model.diffusion_model."
    last = model.config.num_layers - 1
    assert all(k.startswith(p) for k in converted)
    assert f"{p}joint_blocks.0.x_block.attn.qkv.weight" in converted
    assert f"{p}joint_blocks.{last}.context_block.adaLN_modulation.1.weight" in converted
    assert f"{p}joint_blocks.{last}.context_block.mlp.fc1.weight" not in converted
    assert f"{p}pos_embed" in converted
    if variant == "b":  # SD 3.5 Medium: dual attention in block 0, qk norm
        assert f"{p}joint_blocks.0.x_block.attn2.qkv.weight" in converted
        assert f"{p}joint_blocks.1.x_block.attn2.qkv.weight" not in converted
        assert f"{p}joint_blocks.0.context_block.attn.ln_q.weight" in converted
    else:
        assert not any(".attn2." in k or ".ln_q." in k for k in converted)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_unmapped_and_missing_tensors_are_refused(tiny_folder, family):
    folder = tiny_folder(family, "a")
    with open(folder / "transformer" / "config.json") as f:
        config = json.load(f)
    state = MODELS[family].from_pretrained(folder, subfolder="transformer").state_dict()

    with pytest.raises(ValueError, match=r"no place.*transformer_blocks\.0\.attn\.extra\.weight"):
        _convert(family, {**state, "transformer_blocks.0.attn.extra.weight": torch.zeros(1)}, config)
    with pytest.raises(ValueError, match=r"missing.*proj_out\.weight"):
        _convert(family, {k: v for k, v in state.items() if k != "proj_out.weight"}, config)
    with pytest.raises(ValueError, match="num_layers"):
        _convert(family, state, {**config, "num_layers": config["num_layers"] + 1})


# ------------------------------------------------------------------------------------------ LoRA

# Every block layer FLUX's kohya layout has (diffusers' pipeline loader applies the blocks' LoRAs only).
FLUX_BLOCK_LAYERS = (
    r".*transformer_blocks\.\d+\.(attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)"
    r"|ff(_context)?\.net\.(0\.proj|2)|norm1(_context)?\.linear|norm\.linear|proj_mlp|proj_out)"
)
# Parts of the fused layers only: img qkv without k, txt qkv with k only, linear1 without k.
FLUX_PARTIAL = ["to_q", "to_v", "add_k_proj", "proj_mlp"]
FLUX_LORA = {"a": (FLUX_BLOCK_LAYERS, 4.0), "b": (FLUX_PARTIAL, 8.0)}
SD3_LORA = {
    "a": (["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"], 4.0),
    "b": (["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "ff.net.0.proj", "ff_context.net.2"], 8.0),
}
RANK = 4


def _inputs(family: str, config) -> dict:
    g = torch.Generator().manual_seed(0)
    joint, pooled = config["joint_attention_dim"], config["pooled_projection_dim"]
    common = {
        "encoder_hidden_states": torch.randn(1, 5, joint, generator=g),
        "pooled_projections": torch.randn(1, pooled, generator=g),
        "return_dict": False,
    }
    if family == "sd3":
        latent = torch.randn(1, config["in_channels"], 8, 8, generator=g)
        return {"hidden_states": latent, "timestep": torch.tensor([500.0]), **common}
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    img_ids = torch.stack([torch.zeros(16), rows.flatten().float(), cols.flatten().float()], dim=1)
    inputs = {
        "hidden_states": torch.randn(1, 16, config["in_channels"], generator=g),
        "timestep": torch.tensor([0.5]),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(5, 3),
        **common,
    }
    if config["guidance_embeds"]:
        inputs["guidance"] = torch.tensor([3.5])
    return inputs


def _with_lora(family, folder, targets, alpha):
    model = MODELS[family].from_pretrained(folder, subfolder="transformer")
    torch.manual_seed(1)
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=alpha, target_modules=targets, init_lora_weights=False))
    return model, get_peft_model_state_dict(model)


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    return (a - b).norm().item() <= rel * b.norm().item()


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_lora_loads_into_the_stock_pipeline(tiny_folder, tmp_path, flux_width, family, variant):
    folder = tiny_folder(family, variant)
    targets, alpha = (FLUX_LORA if family == "flux" else SD3_LORA)[variant]
    reference, peft_lora = _with_lora(family, folder, targets, alpha)
    if family == "flux":
        flux_width(_width(reference.config))
        lora = flux_kohya_lora_state_dict(peft_lora, scale=alpha / RANK)
        assert all(k.startswith("lora_unet_") for k in lora)
        pipe = FluxPipeline.from_pretrained(folder)
    else:
        lora = sd3_diffusers_lora_state_dict(peft_lora, scale=alpha / RANK)
        pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    save_file(lora, str(tmp_path / "lora.safetensors"))

    inputs = _inputs(family, reference.config)
    with torch.no_grad():
        plain = pipe.transformer(**inputs)[0]
        pipe.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
        loaded = pipe.transformer(**inputs)[0]
        wanted = reference(**inputs)[0]
    assert _close(loaded, wanted, 1e-4)
    assert not _close(plain, wanted, 1e-2)


def _delta(state: dict, module: str) -> torch.Tensor | None:
    for key in (f"transformer.{module}", module):
        if f"{key}.lora_A.weight" in state:
            return state[f"{key}.lora_B.weight"].float() @ state[f"{key}.lora_A.weight"].float()
    return None


def test_flux_kohya_lora_of_every_layer_splits_back_exactly(tiny_folder, flux_width):
    """All linear layers, embedders and final layer included, checked against the deltas diffusers'
    kohya converter recovers. (Its output names the non-block layers without the ``transformer.``
    prefix, so ``FluxPipeline.load_lora_weights`` then ignores those; ComfyUI applies them.)"""
    folder = tiny_folder("flux", "b")
    model, peft_lora = _with_lora("flux", folder, "all-linear", 6.0)
    flux_width(_width(model.config))
    lora = flux_kohya_lora_state_dict(peft_lora, scale=6.0 / RANK)
    for name in ("guidance_in_in_layer", "img_in", "txt_in", "final_layer_adaLN_modulation_1"):
        assert f"lora_unet_{name}.lora_down.weight" in lora
    assert lora["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape[0] == 4 * RANK
    assert lora["lora_unet_single_blocks_0_linear1.alpha"].item() == 4 * RANK

    recovered = FluxPipeline.lora_state_dict(dict(lora))
    modules = {k.removesuffix(".lora_A.weight") for k in peft_lora if k.endswith(".lora_A.weight")}
    assert len(modules) > 30
    for module in sorted(modules):
        want = _delta(peft_lora, module) * (6.0 / RANK)
        got = _delta(recovered, module)
        assert got is not None, module
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), module


def test_flux_kohya_lora_refuses_what_it_cannot_place():
    a, b = torch.randn(2, 8), torch.randn(8, 2)
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        flux_kohya_lora_state_dict(
            {"transformer_blocks.0.attn.to_q.lora_A.weight": a, "x.lora_magnitude_vector": torch.ones(8)}
        )
    with pytest.raises(ValueError, match=r"transformer_blocks\.0\.attn\.norm_q"):
        flux_kohya_lora_state_dict(
            {
                "transformer_blocks.0.attn.norm_q.lora_A.weight": a,
                "transformer_blocks.0.attn.norm_q.lora_B.weight": b,
            }
        )
    with pytest.raises(ValueError, match="lacks its lora_B"):
        flux_kohya_lora_state_dict({"transformer_blocks.0.attn.to_q.lora_A.weight": a})
    with pytest.raises(ValueError, match="not LoRA A / B"):
        sd3_diffusers_lora_state_dict({"transformer_blocks.0.attn.to_q.lora_A.bias": torch.zeros(2)})
