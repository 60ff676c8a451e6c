"""Key maps from diffusers' SDXL ``UNet2DConditionModel`` and ``AutoencoderKL`` to the original (LDM / SGM)
layout of the Stability checkpoints, built from the models' configs.

Both networks are renamed module by module: a table maps each diffusers module prefix (for example
``down_blocks.1.attentions.0``) to its original prefix (``input_blocks.4.1``) and a *kind* that says how
the rest of the key is renamed (a resnet's ``norm1`` is ``in_layers.0``, a VAE attention's ``to_q`` is
``q``). The tables are built from the configs (block types, layers per block, transformer depth per
block), so a network with fewer or more blocks is mapped as well as the full-size one; a key whose
module is not in the table, or whose rest the kind does not know, raises ``ValueError``.

Original UNet layout: ``input_blocks.0`` is ``conv_in``; each down block then holds ``layers_per_block``
input blocks (``.0`` the resnet, ``.1`` the spatial transformer of a cross-attention block) and, but for
the last one, one more input block whose ``.0.op`` is the downsampler. ``middle_block`` is (resnet,
transformer, resnet). Each up block holds ``layers_per_block + 1`` output blocks (``.0`` resnet, ``.1``
transformer if any); the last output block of every up block but the last also holds the upsampler, at
``.1.conv`` (no transformer) or ``.2.conv``. Original VAE layout: ``encoder.down.<i>.block.<j>``,
``encoder.down.<i>.downsample``, ``<coder>.mid.block_1`` / ``attn_1`` / ``block_2``, and
``decoder.up.<k>`` numbered from the lowest resolution upwards reversed, i.e. diffusers' up block ``i`` is
``decoder.up.<n - 1 - i>``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor

__all__ = [
    "rename_modules",
    "sdxl_unet_modules",
    "sdxl_unet_state_dict",
    "sdxl_vae_modules",
    "sdxl_vae_state_dict",
]

# How the part of a key after its module prefix is renamed, by module kind. Each returns the new rest
# and the tensor (possibly reshaped), or None when the rest is not a parameter of that kind.
Renamer = Callable[[str, Tensor, Any], "tuple[str, Tensor] | None"]

_PARAM = re.compile(r"(weight|bias)")
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_TRANSFORMER_OUTER = re.compile(r"(norm|proj_in|proj_out)\.(weight|bias)")
_TRANSFORMER_BLOCK = re.compile(
    r"transformer_blocks\.(\d+)\.(norm[123]|attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))\.(weight|bias)"
)


def _plain(rest: str, tensor: Tensor, _: Any) -> tuple[str, Tensor] | None:
    return (rest, tensor) if _PARAM.fullmatch(rest) else None


def _submodule(names: Mapping[str, str]) -> Renamer:
    """A module whose direct children are renamed by ``names`` (resnets)."""

    def rename(rest: str, tensor: Tensor, _: Any) -> tuple[str, Tensor] | None:
        child, _, param = rest.rpartition(".")
        if child not in names or not _PARAM.fullmatch(param):
            return None
        return f"{names[child]}.{param}", tensor

    return rename


def _transformer(rest: str, tensor: Tensor, depth: int) -> tuple[str, Tensor] | None:
    """A ``Transformer2DModel`` of ``depth`` blocks; the original ``SpatialTransformer`` names it alike."""
    if _TRANSFORMER_OUTER.fullmatch(rest):
        return rest, tensor
    block = _TRANSFORMER_BLOCK.fullmatch(rest)
    return (rest, tensor) if block and int(block.group(1)) < depth else None


def _vae_attention(rest: str, tensor: Tensor, _: Any) -> tuple[str, Tensor] | None:
    """The VAE mid-block attention: its linear projections are 1x1 convolutions in the original layout."""
    child, _, param = rest.rpartition(".")
    if child not in _VAE_ATTENTION or not _PARAM.fullmatch(param):
        return None
    if param == "weight" and child != "group_norm":
        if tensor.dim() != 2:
            raise ValueError(
                f"VAE attention weight {rest!r} has shape {tuple(tensor.shape)}, expected a matrix"
            )
        tensor = tensor[:, :, None, None]
    return f"{_VAE_ATTENTION[child]}.{param}", tensor


# A module table: diffusers prefix -> (original prefix, renamer, argument of the renamer).
Modules = dict[str, tuple[str, Renamer, Any]]


def rename_modules(state: Mapping[str, Tensor], modules: Modules, what: str) -> dict[str, Tensor]:
    """Rename every key of ``state`` through the module table ``modules``; ``ValueError`` for a key that
    no entry maps and for an entry that no key uses (weights and config disagree). Checks that the
    renaming is one to one (nothing dropped, nothing merged)."""
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for key, tensor in state.items():
        parts = key.split(".")
        for cut in range(1, len(parts)):
            entry = modules.get(".".join(parts[:cut]))
            if entry is not None:
                used.add(".".join(parts[:cut]))
                break
        else:
            raise ValueError(f"{what}: no module of the original layout for {key!r}")
        prefix, renamer, arg = entry
        renamed = renamer(".".join(parts[cut:]), tensor, arg)
        if renamed is None:
            raise ValueError(f"{what}: cannot map parameter {key!r} (module {prefix!r})")
        new_key = f"{prefix}.{renamed[0]}"
        if new_key in out:
            raise ValueError(f"{what}: {key!r} maps to {new_key!r}, already taken")
        out[new_key] = renamed[1].contiguous()
    if missing := sorted(set(modules) - used):
        raise ValueError(f"{what}: the config has modules that the weights lack, e.g. {missing[:3]}")
    assert len(out) == len(state), f"{what}: {len(state)} tensors in, {len(out)} out"
    return out


def _per_block(value: int | Sequence[int], count: int, name: str) -> list[int]:
    values = [value] * count if isinstance(value, int) else list(value)
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries for {count} blocks")
    return values


def sdxl_unet_modules(config: Mapping[str, Any]) -> Modules:
    """The module table of an SDXL-layout ``UNet2DConditionModel`` of ``config`` (its ``config.json``)."""
    down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
    count = len(down_types)
    if len(up_types) != count:
        raise ValueError(f"{count} down blocks but {len(up_types)} up blocks")
    known = {"DownBlock2D", "CrossAttnDownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"}
    if unknown := sorted(set(down_types + up_types) - known):
        raise ValueError(f"UNet block types {unknown} have no original (LDM) layout here")
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"UNet mid block {config['mid_block_type']!r} has no original (LDM) layout here")
    layers = _per_block(config["layers_per_block"], count, "layers_per_block")
    depth = _per_block(config.get("transformer_layers_per_block", 1), count, "transformer_layers_per_block")
    up_depth = config.get("reverse_transformer_layers_per_block") or depth[::-1]
    depth, up_depth = ([max(d) if isinstance(d, Sequence) else d for d in ds] for ds in (depth, up_depth))
    resnet = _submodule(_UNET_RESNET)
    modules: Modules = {}

    def add(name: str, original: str, renamer: Renamer = _plain, arg: Any = None) -> None:
        modules[name] = (original, renamer, arg)

    add("conv_in", "input_blocks.0.0")
    add("time_embedding.linear_1", "time_embed.0")
    add("time_embedding.linear_2", "time_embed.2")
    if config.get("addition_embed_type") != "text_time" or config.get("class_embed_type") is not None:
        raise ValueError("an SDXL UNet has addition_embed_type 'text_time' and no class embedding")
    add("add_embedding.linear_1", "label_emb.0.0")
    add("add_embedding.linear_2", "label_emb.0.2")
    add("conv_norm_out", "out.0")
    add("conv_out", "out.2")
    add("mid_block.resnets.0", "middle_block.0", resnet)
    add("mid_block.attentions.0", "middle_block.1", _transformer, depth[-1])
    add("mid_block.resnets.1", "middle_block.2", resnet)
    index = 1
    for b, kind in enumerate(down_types):
        for j in range(layers[b]):
            add(f"down_blocks.{b}.resnets.{j}", f"input_blocks.{index}.0", resnet)
            if kind.startswith("CrossAttn"):
                add(f"down_blocks.{b}.attentions.{j}", f"input_blocks.{index}.1", _transformer, depth[b])
            index += 1
        if b < count - 1:
            add(f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{index}.0.op")
            index += 1
    index = 0
    for b, kind in enumerate(up_types):
        attention = kind.startswith("CrossAttn")
        for j in range(layers[count - 1 - b] + 1):
            add(f"up_blocks.{b}.resnets.{j}", f"output_blocks.{index}.0", resnet)
            if attention:
                add(f"up_blocks.{b}.attentions.{j}", f"output_blocks.{index}.1", _transformer, up_depth[b])
            index += 1
        if b < count - 1:  # in the up block's last output block, after its resnet (and transformer)
            add(f"up_blocks.{b}.upsamplers.0.conv", f"output_blocks.{index - 1}.{2 if attention else 1}.conv")
    return modules


def sdxl_unet_state_dict(unet: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """A diffusers SDXL UNet state dict in the original layout (no ``model.diffusion_model.`` prefix)."""
    return rename_modules(unet, sdxl_unet_modules(config), "UNet")


def sdxl_vae_modules(config: Mapping[str, Any]) -> Modules:
    """The module table of an ``AutoencoderKL`` of ``config`` (its ``config.json``)."""
    down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
    count = len(down_types)
    if (
        {*down_types} != {"DownEncoderBlock2D"}
        or {*up_types} != {"UpDecoderBlock2D"}
        or len(up_types) != count
    ):
        raise ValueError(f"VAE blocks {down_types} / {up_types} have no original (LDM) layout here")
    layers = config["layers_per_block"]
    resnet = _submodule(_VAE_RESNET)
    modules: Modules = {}

    def add(name: str, original: str, renamer: Renamer = _plain) -> None:
        modules[name] = (original, renamer, None)

    for name in ("quant_conv", "post_quant_conv"):
        if config.get(f"use_{name}", True):
            add(name, name)
    for coder in ("encoder", "decoder"):
        add(f"{coder}.conv_in", f"{coder}.conv_in")
        add(f"{coder}.conv_out", f"{coder}.conv_out")
        add(f"{coder}.conv_norm_out", f"{coder}.norm_out")
        if config.get("mid_block_add_attention", True):
            add(f"{coder}.mid_block.attentions.0", f"{coder}.mid.attn_1", _vae_attention)
        for k in range(2):
            add(f"{coder}.mid_block.resnets.{k}", f"{coder}.mid.block_{k + 1}", resnet)
    for i in range(count):
        up = count - 1 - i  # the original numbers the decoder's levels from the full resolution
        for j in range(layers):
            add(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", resnet)
        for j in range(layers + 1):
            add(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{up}.block.{j}", resnet)
        if i < count - 1:
            add(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv")
            add(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{up}.upsample.conv")
    return modules


def sdxl_vae_state_dict(vae: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """A diffusers ``AutoencoderKL`` state dict in the original layout (no ``first_stage_model.`` prefix)."""
    return rename_modules(vae, sdxl_vae_modules(config), "VAE")
