"""Single-file export of SDXL (families/sdxl/single_file*.py): the original (Stability) checkpoint layout and
the kohya LoRA layout, read back by diffusers' own loaders (``from_single_file``, ``load_lora_weights``).

Everything runs offline against the tiny teachers: ``from_single_file`` takes each component's config from
the local folder (``config=``, ``local_files_only=True``). One limit is diffusers', not the layout's: it
tells the two text encoders of a single file apart by their width (768 vs 1280 in the real SDXL), so when
both tiny encoders have the same width (variant "a") the pipeline loader reads CLIP-L's weights into
``text_encoder_2``. There ``text_encoder_2`` is built by diffusers' own converter for that component
(``create_diffusers_clip_model_from_ldm``) from the file's OpenCLIP tensors alone, and handed to
``StableDiffusionXLPipeline.from_single_file`` as a component.
"""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from senseflow.families.sdxl.single_file import (
    CLIP_L_PREFIX,
    OPEN_CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    sdxl_checkpoint_state_dict,
    sdxl_kohya_lora_state_dict,
    sdxl_open_clip_state_dict,
)
from senseflow.families.sdxl.single_file_ldm import sdxl_unet_state_dict, sdxl_vae_state_dict

VARIANTS = ("a", "b")
PREFIXES = (UNET_PREFIX, VAE_PREFIX, CLIP_L_PREFIX, OPEN_CLIP_PREFIX)
METADATA = {"format": "pt", "modelspec.architecture": "stable-diffusion-xl-v1-base"}


@pytest.fixture(autouse=True)
def _threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _components(folder) -> dict:
    return {
        "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
        "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae"),
        "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2"),
    }


def _checkpoint(models: dict) -> dict:
    return sdxl_checkpoint_state_dict(
        models["unet"].state_dict(),
        dict(models["unet"].config),
        models["vae"].state_dict(),
        dict(models["vae"].config),
        models["text_encoder"].state_dict(),
        models["text_encoder_2"].state_dict(),
        models["text_encoder_2"].config.to_dict(),
    )


def _assert_same(loaded, original, name: str) -> None:
    got, want = loaded.state_dict(), original.state_dict()
    assert set(got) == set(want), f"{name}: {sorted(set(got) ^ set(want))[:5]}"
    differing = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differing, f"{name}: {differing[:5]}"


@pytest.fixture(scope="module", params=VARIANTS)
def exported(request, tiny_folder, tmp_path_factory):
    """(folder, original components, converted dict, path of the written single file) per variant."""
    folder = tiny_folder("sdxl", request.param)
    models = _components(folder)
    converted = _checkpoint(models)
    path = tmp_path_factory.mktemp(f"sdxl_single_{request.param}") / "sdxl.safetensors"
    save_file(converted, str(path), metadata=METADATA)
    return folder, models, converted, path


# ----------------------------------------------------------------------------------- checkpoint


def test_checkpoint_holds_every_tensor_once(exported):
    _, models, converted, path = exported
    assert set(load_file(str(path))) == set(converted)
    by_prefix = {p: [k for k in converted if k.startswith(p)] for p in PREFIXES}
    assert sum(map(len, by_prefix.values())) == len(converted)
    layers = models["text_encoder_2"].config.num_hidden_layers
    assert len(by_prefix[UNET_PREFIX]) == len(models["unet"].state_dict())
    assert len(by_prefix[VAE_PREFIX]) == len(models["vae"].state_dict())
    assert len(by_prefix[CLIP_L_PREFIX]) == len(models["text_encoder"].state_dict())
    # q, k and v (weight and bias) of every layer fused into one in_proj tensor each
    assert len(by_prefix[OPEN_CLIP_PREFIX]) == len(models["text_encoder_2"].state_dict()) - 4 * layers
    storages = [t.untyped_storage().data_ptr() for t in converted.values()]
    assert len(set(storages)) == len(storages), "two keys share one tensor"
    # spot checks of the original names, counted from the configs
    config = models["unet"].config
    hidden = models["text_encoder_2"].config.hidden_size
    last_input = (len(config.block_out_channels) - 1) * (
        config.layers_per_block + 1
    ) + config.layers_per_block
    assert f"{UNET_PREFIX}input_blocks.{last_input}.0.in_layers.0.weight" in converted
    assert f"{UNET_PREFIX}input_blocks.{last_input + 1}.0.in_layers.0.weight" not in converted
    assert f"{UNET_PREFIX}label_emb.0.2.weight" in converted
    assert f"{UNET_PREFIX}middle_block.1.transformer_blocks.0.attn2.to_k.weight" in converted
    assert converted[f"{VAE_PREFIX}encoder.mid.attn_1.q.weight"].dim() == 4
    assert converted[f"{OPEN_CLIP_PREFIX}transformer.resblocks.0.attn.in_proj_weight"].shape == (
        3 * hidden,
        hidden,
    )
    projection = models["text_encoder_2"].text_projection.weight
    assert torch.equal(converted[f"{OPEN_CLIP_PREFIX}text_projection"], projection.T)
    assert f"{CLIP_L_PREFIX}text_model.embeddings.position_embedding.weight" in converted


def test_unet_and_vae_round_trip_through_from_single_file(exported):
    folder, models, _, path = exported
    unet = UNet2DConditionModel.from_single_file(
        str(path), config=str(folder), subfolder="unet", local_files_only=True
    )
    _assert_same(unet, models["unet"], "unet")
    vae = AutoencoderKL.from_single_file(
        str(path), config=str(folder), subfolder="vae", local_files_only=True
    )
    _assert_same(vae, models["vae"], "vae")


def test_pipeline_round_trips_through_from_single_file(exported):
    folder, models, converted, path = exported
    extra = {}
    if models["text_encoder"].config.hidden_size == models["text_encoder_2"].config.hidden_size:
        # diffusers cannot tell equally wide encoders apart in one file (module docstring): build
        # text_encoder_2 with its own converter from the OpenCLIP tensors only
        open_clip = {k: v for k, v in converted.items() if k.startswith(OPEN_CLIP_PREFIX)}
        extra["text_encoder_2"] = create_diffusers_clip_model_from_ldm(
            CLIPTextModelWithProjection,
            open_clip,
            config=str(folder),
            subfolder="text_encoder_2",
            local_files_only=True,
        )
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True, **extra
    )
    for name, original in models.items():
        _assert_same(getattr(pipe, name), original, name)


def test_components_left_out(exported):
    _, models, _, _ = exported
    only_unet = sdxl_checkpoint_state_dict(models["unet"].state_dict(), dict(models["unet"].config))
    assert only_unet and all(k.startswith(UNET_PREFIX) for k in only_unet)
    with pytest.raises(ValueError, match="vae_config"):
        sdxl_checkpoint_state_dict(
            models["unet"].state_dict(), dict(models["unet"].config), models["vae"].state_dict()
        )


def test_unmapped_keys_raise(tiny_folder):
    models = _components(tiny_folder("sdxl", "b"))
    unet, config = models["unet"].state_dict(), dict(models["unet"].config)
    for bad in (
        "down_blocks.0.resnets.0.extra.weight",
        "down_blocks.9.resnets.0.conv1.weight",
        "unet.conv_in.weight",
    ):
        with pytest.raises(ValueError, match=re.escape(bad)):
            sdxl_unet_state_dict({**unet, bad: torch.zeros(1)}, config)
    # a transformer block beyond the configured depth
    deep = "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q.weight"
    with pytest.raises(ValueError, match=re.escape(deep)):
        sdxl_unet_state_dict({**unet, deep: torch.zeros(1)}, config)
    # configs that disagree with the weights: shallower transformers, more resnets per block
    with pytest.raises(ValueError, match=r"transformer_blocks\.1"):
        sdxl_unet_state_dict(unet, {**config, "transformer_layers_per_block": [1, 1, 1]})
    with pytest.raises(ValueError, match="weights lack"):
        sdxl_unet_state_dict(unet, {**config, "layers_per_block": 2})
    with pytest.raises(ValueError, match="weights lack"):
        sdxl_vae_state_dict(models["vae"].state_dict(), {**dict(models["vae"].config), "layers_per_block": 2})
    with pytest.raises(ValueError, match="no original"):
        sdxl_vae_state_dict(
            models["vae"].state_dict(),
            {**dict(models["vae"].config), "down_block_types": ["DownBlock2D"] * 3},
        )
    te2, te2_config = models["text_encoder_2"].state_dict(), models["text_encoder_2"].config.to_dict()
    q = "text_model.encoder.layers.1.self_attn.q_proj.weight"
    with pytest.raises(ValueError, match="layer 1"):
        sdxl_open_clip_state_dict({k: v for k, v in te2.items() if k != q}, te2_config)
    with pytest.raises(ValueError, match="logit_scale"):
        sdxl_open_clip_state_dict({**te2, "logit_scale": torch.zeros(())}, te2_config)
    with pytest.raises(ValueError, match="text_projection"):  # CLIP-L has no projection in SDXL
        sdxl_checkpoint_state_dict(
            unet,
            config,
            text_encoder={**models["text_encoder"].state_dict(), "text_projection.weight": torch.zeros(2, 2)},
        )


def test_position_ids_buffer(exported):
    """Older transformers saved ``position_ids`` (0, 1, 2, ...): dropped when it is that constant."""
    _, models, converted, _ = exported
    unet, config = models["unet"].state_dict(), dict(models["unet"].config)
    clip = models["text_encoder"].state_dict()
    ids = torch.arange(models["text_encoder"].config.max_position_embeddings)[None]
    with_ids = {**clip, "text_model.embeddings.position_ids": ids}
    got = sdxl_checkpoint_state_dict(unet, config, text_encoder=with_ids)
    assert {k for k in got if k.startswith(CLIP_L_PREFIX)} == {
        k for k in converted if k.startswith(CLIP_L_PREFIX)
    }
    with pytest.raises(ValueError, match="position_ids"):
        sdxl_checkpoint_state_dict(
            unet, config, text_encoder={**with_ids, "text_model.embeddings.position_ids": ids + 1}
        )


# ----------------------------------------------------------------------------------------- LoRA


def _unet_inputs(config) -> tuple:
    g = torch.Generator().manual_seed(1)
    text = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return (
        torch.randn(2, config.in_channels, 8, 8, generator=g),
        torch.tensor([700, 150]),
        torch.randn(2, 5, config.cross_attention_dim, generator=g),
    ), {
        "added_cond_kwargs": {
            "text_embeds": torch.randn(2, text, generator=g),
            "time_ids": torch.randn(2, 6, generator=g),
        }
    }


def _every_layer(unet) -> list[str]:
    return [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("targets", ["attention", "every layer"])
def test_kohya_lora_loads_into_the_pipeline(tiny_folder, tmp_path, variant, targets):
    folder = tiny_folder("sdxl", variant)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    if targets == "attention":  # the brief's default: scale lora_alpha / r = 1, alpha written as the rank
        modules, lora_alpha, alpha = ["to_q", "to_k", "to_v", "to_out.0"], 4, None
    else:  # resnets, embeddings, samplers, conv in/out too; scale 2
        modules, lora_alpha, alpha = _every_layer(unet), 8, 8.0
    torch.manual_seed(0)
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=lora_alpha, target_modules=modules, init_lora_weights=False),
        adapter_name="student",
    )
    peft_state = get_peft_model_state_dict(unet, adapter_name="student")
    kohya = sdxl_kohya_lora_state_dict(peft_state, alpha=alpha)
    assert len(kohya) == 3 * len(peft_state) // 2
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert kohya[f"{name}.alpha"].dim() == 0 and kohya[f"{name}.alpha"].item() == lora_alpha
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert torch.equal(kohya[f"{name}.lora_down.weight"], peft_state[f"{module}.lora_A.weight"])
    assert torch.equal(kohya[f"{name}.lora_up.weight"], peft_state[f"{module}.lora_B.weight"])
    if targets != "attention":  # diffusers reads the added-condition MLP under its original name only
        assert "lora_unet_label_emb_0_0.lora_down.weight" in kohya
    save_file(kohya, str(tmp_path / "lora.safetensors"))

    args, kwargs = _unet_inputs(unet.config)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    with torch.no_grad():
        want = unet(*args, **kwargs).sample
        plain = pipe.unet(*args, **kwargs).sample
        pipe.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
        got = pipe.unet(*args, **kwargs).sample
    assert (got - want).norm() <= 1e-4 * want.norm()
    assert (plain - want).norm() > 1e-2 * want.norm(), (
        "the LoRA changes nothing: the test would pass vacuously"
    )


def test_kohya_lora_rejects_what_it_cannot_map():
    a, b = torch.zeros(4, 8), torch.zeros(8, 4)
    with pytest.raises(ValueError, match=r"unet\.conv_in"):
        sdxl_kohya_lora_state_dict({"unet.conv_in.lora_A.weight": a, "unet.conv_in.lora_B.weight": b})
    with pytest.raises(ValueError, match="lora_A only"):
        sdxl_kohya_lora_state_dict({"conv_in.lora_A.weight": a})
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        sdxl_kohya_lora_state_dict({"conv_in.lora_magnitude_vector": a})
    with pytest.raises(ValueError, match="rank"):
        sdxl_kohya_lora_state_dict({"conv_in.lora_A.weight": a, "conv_in.lora_B.weight": torch.zeros(8, 3)})
