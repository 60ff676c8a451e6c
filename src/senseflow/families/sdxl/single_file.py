"""SDXL in the single-file layouts that ComfyUI, A1111 and diffusers' ``from_single_file`` read.

* :func:`sdxl_checkpoint_state_dict`: a diffusers SDXL pipeline's components as ONE state dict in the
  original Stability ("LDM" / "SGM") checkpoint layout: the UNet under ``model.diffusion_model.``, the
  VAE under ``first_stage_model.``, CLIP ViT-L under ``conditioner.embedders.0.transformer.`` (the
  transformers ``CLIPTextModel`` keys, ``text_model.`` included) and OpenCLIP ViT-bigG under
  ``conditioner.embedders.1.model.`` (OpenCLIP's own names: fused ``attn.in_proj_weight``, ``ln_1``,
  ``mlp.c_fc``, ``positional_embedding``, ``text_projection`` as a (hidden x projection) matrix, ...).
* :func:`sdxl_kohya_lora_state_dict`: a peft UNet LoRA as a kohya-ss LoRA (``lora_unet_<module>``
  with ``lora_down`` / ``lora_up`` / ``alpha``), the layout ComfyUI and diffusers' ``load_lora_weights``
  read for SDXL.

Every input tensor lands in the output exactly once (the three attention projections of an OpenCLIP
layer become one fused tensor); a key that cannot be mapped raises ``ValueError`` naming it. The only
tensor not written is a text encoder's ``position_ids`` buffer, and only when it holds the constant
``0, 1, 2, ...`` it is by definition (recent transformers versions no longer save it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from senseflow.families.sdxl.single_file_ldm import sdxl_unet_state_dict, sdxl_vae_state_dict

__all__ = [
    "CLIP_L_PREFIX",
    "OPEN_CLIP_PREFIX",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "sdxl_checkpoint_state_dict",
    "sdxl_kohya_lora_state_dict",
    "sdxl_open_clip_state_dict",
]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

_CLIP_KEY = re.compile(
    r"text_model\.(embeddings\.(token_embedding|position_embedding)\.weight|final_layer_norm\.(weight|bias)"
    r"|encoder\.layers\.\d+\.(layer_norm[12]|mlp\.fc[12]|self_attn\.(q_proj|k_proj|v_proj|out_proj))\.(weight|bias))"
)
_POSITION_IDS = "text_model.embeddings.position_ids"
_OPEN_CLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_LAYER_KEY = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def _with_text_model(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Keys of a transformers CLIP text model with the ``text_model.`` prefix, which transformers 5.6+
    leaves out for ``CLIPTextModel`` and the original checkpoints always have."""
    out = {}
    for key, tensor in state.items():
        out[key if key.startswith(("text_model.", "text_projection.")) else f"text_model.{key}"] = tensor
    if len(out) != len(state):
        raise ValueError("text encoder state dict holds keys both with and without the 'text_model.' prefix")
    return out


def _drop_position_ids(state: dict[str, Tensor], what: str) -> None:
    """Remove the ``position_ids`` buffer after checking that it holds ``0, 1, 2, ...``."""
    ids = state.pop(_POSITION_IDS, None)
    if ids is not None and not torch.equal(ids.flatten().long(), torch.arange(ids.numel())):
        raise ValueError(
            f"{what}: {_POSITION_IDS} is not 0, 1, 2, ...; cannot write it in the original layout"
        )


def _clip_l_state_dict(text_encoder: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CLIP ViT-L (``CLIPTextModel``): the original layout keeps the transformers keys."""
    state = _with_text_model(text_encoder)
    _drop_position_ids(state, "text_encoder")
    for key in state:
        if not _CLIP_KEY.fullmatch(key):
            raise ValueError(f"text_encoder: {key!r} is not a CLIPTextModel parameter of the SDXL layout")
    return state


def sdxl_open_clip_state_dict(
    text_encoder_2: Mapping[str, Tensor], config: Mapping[str, Any]
) -> dict[str, Tensor]:
    """A transformers ``CLIPTextModelWithProjection`` state dict in OpenCLIP's layout (no prefix).

    ``config``: the encoder's ``config.json`` (``num_hidden_layers``, ``hidden_size``). Per layer the q, k
    and v projections become one ``attn.in_proj_weight`` / ``in_proj_bias`` (q, k, v stacked on dim 0);
    ``text_projection.weight`` (projection x hidden, a ``Linear`` weight) becomes the matrix
    ``text_projection`` (hidden x projection) that OpenCLIP multiplies from the right.
    """
    state = _with_text_model(text_encoder_2)
    _drop_position_ids(state, "text_encoder_2")
    layers, hidden = int(config["num_hidden_layers"]), int(config["hidden_size"])
    out: dict[str, Tensor] = {}
    fused: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, tensor in state.items():
        layer = _LAYER_KEY.fullmatch(key)
        if key in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[key]] = tensor
        elif key == "text_projection.weight":
            out["text_projection"] = tensor.T.contiguous()
        elif layer and int(layer.group(1)) < layers and layer.group(2) in _OPEN_CLIP_LAYER:
            out[
                f"transformer.resblocks.{layer.group(1)}.{_OPEN_CLIP_LAYER[layer.group(2)]}.{layer.group(3)}"
            ] = tensor
        elif layer and int(layer.group(1)) < layers and layer.group(2) in _QKV:
            fused.setdefault((int(layer.group(1)), layer.group(3)), {})[layer.group(2)] = tensor
        else:
            raise ValueError(f"text_encoder_2: no OpenCLIP parameter for {key!r}")
    for (layer, param), parts in sorted(fused.items()):
        if len(parts) != 3:
            raise ValueError(f"text_encoder_2: layer {layer} has only {sorted(parts)} of q/k/v {param}")
        if any(parts[name].shape[0] != hidden for name in _QKV):
            raise ValueError(f"text_encoder_2: layer {layer} q/k/v {param} do not have {hidden} rows")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([parts[name] for name in _QKV])
    assert len(out) + 2 * len(fused) == len(state), "text_encoder_2: a tensor was lost or merged"
    return out


def _prefixed(out: dict[str, Tensor], prefix: str, state: Mapping[str, Tensor]) -> None:
    for key, tensor in state.items():
        if prefix + key in out:
            raise ValueError(f"{prefix + key!r} written twice")
        out[prefix + key] = tensor


def sdxl_checkpoint_state_dict(
    unet: Mapping[str, Tensor],
    unet_config: dict,
    vae: Mapping[str, Tensor] | None = None,
    vae_config: dict | None = None,
    text_encoder: Mapping[str, Tensor] | None = None,
    text_encoder_2: Mapping[str, Tensor] | None = None,
    text_encoder_2_config: dict | None = None,
) -> dict[str, Tensor]:
    """The SDXL components (diffusers / transformers state dicts) as one original-layout checkpoint.

    ``unet_config`` / ``vae_config`` / ``text_encoder_2_config``: the components' ``config.json`` dicts
    (a diffusers ``model.config`` as is, a transformers one as ``config.to_dict()``). A component that is
    None is left out; a config is required with its component. Tensors keep their dtype and device; save
    the result with ``safetensors.torch.save_file``.
    """
    out: dict[str, Tensor] = {}
    _prefixed(out, UNET_PREFIX, sdxl_unet_state_dict(unet, unet_config))
    if vae is not None:
        if vae_config is None:
            raise ValueError("vae_config is required with vae")
        _prefixed(out, VAE_PREFIX, sdxl_vae_state_dict(vae, vae_config))
    if text_encoder is not None:
        _prefixed(out, CLIP_L_PREFIX, _clip_l_state_dict(text_encoder))
    if text_encoder_2 is not None:
        if text_encoder_2_config is None:
            raise ValueError("text_encoder_2_config is required with text_encoder_2")
        _prefixed(out, OPEN_CLIP_PREFIX, sdxl_open_clip_state_dict(text_encoder_2, text_encoder_2_config))
    return out


# ------------------------------------------------------------------------------------------ LoRA

_PEFT_LORA_KEY = re.compile(r"(.+)\.lora_([AB])\.weight")
_UNET_TOP_MODULES = (
    "conv_in",
    "time_embedding",
    "add_embedding",
    "down_blocks",
    "mid_block",
    "up_blocks",
    "conv_norm_out",
    "conv_out",
)
# Modules whose kohya name is the original-layout one: diffusers' kohya parser reads the added-condition
# MLP only under that name (ComfyUI reads both spellings of every module).
_KOHYA_RENAMES = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def sdxl_kohya_lora_state_dict(
    peft_unet_lora: Mapping[str, Tensor], alpha: float | None = None
) -> dict[str, Tensor]:
    """A peft UNet LoRA (``get_peft_model_state_dict`` keys: ``<module>.lora_A.weight`` / ``.lora_B.weight``,
    no ``unet.`` prefix) in the kohya-ss layout: ``lora_unet_<module, dots as underscores>.lora_down.weight``
    (A), ``.lora_up.weight`` (B) and ``.alpha``, a 0-dim float32 tensor.

    Kohya scales B·A by alpha / rank. ``alpha``: the peft adapter's ``lora_alpha`` (then the scale is
    peft's ``lora_alpha / r``); None writes alpha = rank, i.e. scale 1, right for adapters with
    ``lora_alpha == r``. (An adapter trained with ``use_rslora`` scales by alpha / sqrt(r) instead: pass
    ``alpha = lora_alpha * sqrt(r)``.)
    """
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, tensor in peft_unet_lora.items():
        match = _PEFT_LORA_KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"{key!r} is not a peft LoRA weight (<module>.lora_A.weight / .lora_B.weight)")
        module, which = match.groups()
        if module.split(".")[0] not in _UNET_TOP_MODULES:
            raise ValueError(f"{key!r}: {module!r} is not a module path of the UNet")
        pairs.setdefault(module, {})[which] = tensor
    out: dict[str, Tensor] = {}
    for module, pair in sorted(pairs.items()):
        if len(pair) != 2:
            raise ValueError(f"LoRA of {module!r} has lora_{next(iter(pair))} only")
        down, up = pair["A"], pair["B"]
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise ValueError(f"LoRA of {module!r}: lora_A has rank {rank}, lora_B {up.shape[1]}")
        name = "lora_unet_" + _KOHYA_RENAMES.get(module, module).replace(".", "_")
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = torch.tensor(float(rank if alpha is None else alpha), dtype=torch.float32)
    assert 2 * len(out) == 3 * len(peft_unet_lora), "a LoRA tensor was lost"
    return out
