"""FLUX.1 transformer and LoRA in the original (Black Forest Labs) key layout, for single-file export.

diffusers' ``FluxTransformer2DModel`` keeps separate q / k / v projections and names its modules after
diffusers' building blocks; the checkpoints Black Forest Labs publish, which ComfyUI loads and diffusers'
``FluxTransformer2DModel.from_single_file`` converts back, fuse them and use other names:

* double (joint) block ``i``: ``double_blocks.i.{img,txt}_attn.qkv`` (q, k, v stacked along the output
  rows), ``{img,txt}_attn.proj``, ``{img,txt}_attn.norm.{query,key}_norm.scale``, ``{img,txt}_mlp.{0,2}``,
  ``{img,txt}_mod.lin``;
* single block ``i``: ``single_blocks.i.linear1`` (q, k, v and the MLP's input projection stacked),
  ``linear2``, ``norm.{query,key}_norm.scale``, ``modulation.lin``;
* embedders: ``img_in``, ``txt_in``, ``time_in``, ``vector_in`` and ``guidance_in`` (only in a
  guidance-distilled model such as FLUX.1-dev; a student without a guidance embedding has none), each
  ``in_layer`` / ``out_layer``;
* ``final_layer.linear`` and ``final_layer.adaLN_modulation.1``, whose output halves are (shift, scale)
  where diffusers' ``norm_out.linear`` has (scale, shift).

:func:`flux_original_state_dict` converts a transformer's state dict; :func:`flux_kohya_lora_state_dict`
converts a peft LoRA of the diffusers transformer into the kohya / sd-scripts layout of these modules
(``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``, ``.lora_up.weight``, ``.alpha``). Separate
LoRAs on the parts of a fused layer become one LoRA of the summed rank whose down matrix stacks the
parts' down matrices and whose up matrix is block-diagonal, which is exactly the sum of the parts'
deltas; its alpha equals its rank (scale 1), and the adapter's own ``lora_alpha / r`` is multiplied
into the up matrix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

from senseflow.families.single_file_keys import KeyMover, swap_halves

__all__ = ["KeyMover", "flux_kohya_lora_state_dict", "flux_original_state_dict"]

# Width of the single blocks' MLP relative to the model width (fixed in FluxTransformer2DModel).
MLP_RATIO = 4

# diffusers embedder (under ``time_text_embed.``) -> original name
_EMBEDDERS = {
    "timestep_embedder": "time_in",
    "text_embedder": "vector_in",
    "guidance_embedder": "guidance_in",
}
_EMBEDDER_LAYERS = {"linear_1": "in_layer", "linear_2": "out_layer"}

# Modules of a double block that map one-to-one: diffusers -> original (relative to the block).
_DOUBLE_PLAIN = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
_DOUBLE_NORMS = {
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
}
# Fused layers: original name -> the diffusers modules stacked in it, in order.
_DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE_PLAIN = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
_SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_TOP_PLAIN = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear"}
_FINAL_MODULATION = ("norm_out.linear", "final_layer.adaLN_modulation.1")


def _block_indices(keys: list[str], prefix: str) -> set[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return {int(m.group(1)) for k in keys if (m := pattern.match(k))}


def _check_count(keys: list[str], prefix: str, expected: int, name: str) -> None:
    found = _block_indices(keys, prefix)
    if found != set(range(expected)):
        raise ValueError(
            f"config {name}={expected} but the state dict has {prefix}* blocks {sorted(found) or 'none'}"
        )


def flux_original_state_dict(
    transformer: Mapping[str, Tensor], config: Mapping, prefix: str = ""
) -> dict[str, Tensor]:
    """The state dict of a diffusers ``FluxTransformer2DModel`` in the Black Forest Labs layout.

    ``transformer``: the model's ``state_dict()``; ``config``: its config (``num_layers``,
    ``num_single_layers`` are read and checked against the keys). ``guidance_in`` is written when the
    state dict has a guidance embedder. ``prefix`` is put before every key (ComfyUI also reads
    ``"model.diffusion_model."``). Raises ``ValueError`` when a tensor has no place in the layout or an
    expected one is missing; every input tensor lands in the output, unchanged except for the fusing
    of q / k / v (/ MLP input) and the half swap of the final modulation.
    """
    keys = list(transformer)
    num_double = int(config["num_layers"])
    num_single = int(config["num_single_layers"])
    _check_count(keys, "transformer_blocks.", num_double, "num_layers")
    _check_count(keys, "single_transformer_blocks.", num_single, "num_single_layers")

    conv = KeyMover(transformer)
    for embedder, original in _EMBEDDERS.items():
        if embedder == "guidance_embedder" and not any(
            k.startswith(f"time_text_embed.{embedder}.") for k in keys
        ):
            continue
        for layer, original_layer in _EMBEDDER_LAYERS.items():
            conv.module(f"time_text_embed.{embedder}.{layer}", f"{original}.{original_layer}")
    conv.modules("", "", _TOP_PLAIN)
    conv.module(*_FINAL_MODULATION, swap=True)

    for i in range(num_double):
        src, dst = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        conv.modules(src, dst, _DOUBLE_PLAIN)
        conv.norms(src, dst, _DOUBLE_NORMS)
        conv.fused_layers(src, dst, _DOUBLE_FUSED)
    for i in range(num_single):
        src, dst = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        conv.modules(src, dst, _SINGLE_PLAIN)
        conv.norms(src, dst, _SINGLE_NORMS)
        conv.fused_layers(src, dst, _SINGLE_FUSED)

    out = conv.finish("FLUX transformer")
    return {prefix + k: v for k, v in out.items()} if prefix else out


# --------------------------------------------------------------------------------------------- LoRA

_LORA_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}
# (diffusers block pattern, original block name, plain layers, fused layers) per kind of block
_LORA_BLOCKS = (
    (r"transformer_blocks\.(\d+)\.(.+)", "double_blocks", _DOUBLE_PLAIN, _DOUBLE_FUSED),
    (r"single_transformer_blocks\.(\d+)\.(.+)", "single_blocks", _SINGLE_PLAIN, _SINGLE_FUSED),
)


def _lora_target(module: str) -> tuple[str, int, int, bool] | None:
    """Where a diffusers module's LoRA goes: (original module, part index, number of parts, swap)."""
    for pattern, original, plain, fused_layers in _LORA_BLOCKS:
        if m := re.fullmatch(pattern, module):
            block, rest = f"{original}.{m.group(1)}.", m.group(2)
            if rest in plain:
                return block + plain[rest], 0, 1, False
            for fused, parts in fused_layers.items():
                if rest in parts:
                    return block + fused, parts.index(rest), len(parts), False
            return None
    if m := re.fullmatch(r"time_text_embed\.(\w+)\.(linear_[12])", module):
        if m.group(1) in _EMBEDDERS:
            return f"{_EMBEDDERS[m.group(1)]}.{_EMBEDDER_LAYERS[m.group(2)]}", 0, 1, False
        return None
    if module in _TOP_PLAIN:
        return _TOP_PLAIN[module], 0, 1, False
    if module == _FINAL_MODULATION[0]:
        return _FINAL_MODULATION[1], 0, 1, True
    return None


def _part_rows(original: str, index: int, width: int, present_rows: int | None) -> int:
    """Output rows of part ``index`` of a fused layer whose input width is ``width``."""
    if original.endswith("linear1") and index == 3:  # the single block's MLP input projection
        return present_rows if present_rows is not None else MLP_RATIO * width
    return width


def flux_kohya_lora_state_dict(peft_lora: Mapping[str, Tensor], *, scale: float = 1.0) -> dict[str, Tensor]:
    """A peft LoRA of a diffusers ``FluxTransformer2DModel`` in the kohya layout ComfyUI loads.

    ``peft_lora``: keys ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` as
    ``peft.get_peft_model_state_dict`` returns them (no ``transformer.`` prefix). ``scale``: the
    adapter's ``lora_alpha / r`` (the factor peft applies to B·A); it is multiplied into the up
    matrices, and every written ``alpha`` equals its LoRA's rank.

    The LoRAs of the parts of a fused layer (q, k, v of ``img_attn.qkv`` / ``txt_attn.qkv``; q, k, v
    and ``proj_mlp`` of ``linear1``) become one LoRA whose rank is the sum of theirs; a part with no LoRA
    contributes zero rows (when all present parts share one rank it gets a zero block of that rank, so
    the up matrix stays block-diagonal with equal blocks, the form loaders split back exactly). The final
    modulation's up rows are swapped to the original (shift, scale) order. Raises ``ValueError`` for a
    key that is not a LoRA matrix of a module of the layout (bias LoRAs, DoRA magnitudes, embeddings,
    unknown modules) or for inconsistent shapes.

    ComfyUI applies every LoRA written here. diffusers' ``FluxPipeline.load_lora_weights`` (0.42)
    converts them all back but then applies only the blocks' ones: it names the embedders' and the
    final layer's without the ``transformer.`` prefix its loader filters on.
    """
    factors: dict[str, dict[str, Tensor]] = {}
    unknown: list[str] = []
    for key, value in peft_lora.items():
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            unknown.append(key)
            continue
        factors.setdefault(key[: -len(suffix)], {})[_LORA_SUFFIXES[suffix]] = value
    # original module -> {part index: (A, B)}, number of parts, swap
    grouped: dict[str, dict[int, tuple[str, dict[str, Tensor]]]] = {}
    layout: dict[str, tuple[int, bool]] = {}
    for module, ab in factors.items():
        target = _lora_target(module)
        if target is None:
            unknown.extend(f"{module}.lora_{x}.weight" for x in sorted(ab))
            continue
        original, index, count, swap = target
        grouped.setdefault(original, {})[index] = (module, ab)
        layout[original] = (count, swap)
    if unknown:
        raise ValueError("LoRA tensors with no place in the FLUX kohya layout: " + ", ".join(sorted(unknown)))

    out: dict[str, Tensor] = {}
    for original in sorted(grouped):
        parts = {index: _factors(*named) for index, named in grouped[original].items()}
        count, swap = layout[original]
        if count == 1:
            down, up = parts[0]
        else:
            down, up = _fuse(original, parts, count)
        if scale != 1.0:
            up = up * scale
        if swap:
            up = swap_halves(up)
        name = "lora_unet_" + original.replace(".", "_")
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]), dtype=torch.float32)
    return out


def _factors(module: str, ab: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """A module's LoRA (A, B), checked to be the two factors of a linear layer's delta."""
    if set(ab) != {"A", "B"}:
        raise ValueError(f"LoRA of {module!r} lacks its lora_{'B' if 'A' in ab else 'A'}.weight")
    down, up = ab["A"], ab["B"]
    if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
        raise ValueError(
            f"LoRA of {module!r}: A {tuple(down.shape)} and B {tuple(up.shape)} are not the factors "
            "of a linear layer's delta"
        )
    return down, up


def _fuse(original: str, parts: dict[int, tuple[Tensor, Tensor]], count: int) -> tuple[Tensor, Tensor]:
    """One LoRA equal to the parts' LoRAs on a layer stacking ``count`` outputs (missing parts: zero)."""
    widths = {down.shape[1] for down, _ in parts.values()}
    if len(widths) != 1:
        raise ValueError(f"LoRAs fused into {original!r} have different input widths {sorted(widths)}")
    width = widths.pop()
    ranks = {down.shape[0] for down, _ in parts.values()}
    pad_rank = ranks.pop() if len(ranks) == 1 else 0
    ref_down, _ = next(iter(parts.values()))
    dtype, device = ref_down.dtype, ref_down.device
    downs: list[Tensor] = []
    ups: list[Tensor] = []
    for index in range(count):
        if index in parts:
            down, up = parts[index]
            expected = _part_rows(original, index, width, up.shape[0])
            if up.shape[0] != expected:
                raise ValueError(
                    f"LoRA part {index} of {original!r} has {up.shape[0]} output rows, expected {expected}"
                )
        else:
            rows = _part_rows(original, index, width, None)
            down = torch.zeros(pad_rank, width, dtype=dtype, device=device)
            up = torch.zeros(rows, pad_rank, dtype=dtype, device=device)
        downs.append(down)
        ups.append(up)
    return torch.cat(downs, dim=0), torch.block_diag(*ups)
