"""SD3 / SD3.5 transformer and LoRA in the layouts single-file tools load.

The checkpoints Stability AI publishes (and ComfyUI loads, and diffusers'
``SD3Transformer2DModel.from_single_file`` converts back) keep the MM-DiT under
``model.diffusion_model.`` with the original module names and fused q / k / v:

* block ``i``: ``joint_blocks.i.x_block`` (image stream) and ``joint_blocks.i.context_block`` (text
  stream), each with ``attn.qkv``, ``attn.proj``, ``attn.ln_q`` / ``attn.ln_k`` (SD3.5's qk norm),
  ``mlp.fc1`` / ``mlp.fc2`` and ``adaLN_modulation.1``; SD3.5's dual-attention blocks add
  ``x_block.attn2`` (``qkv``, ``proj``, ``ln_q``, ``ln_k``). The last block's text stream is "pre-only":
  no ``attn.proj`` and no MLP, and its ``adaLN_modulation.1`` has two halves stored as (shift, scale)
  where diffusers' ``norm1_context.linear`` has (scale, shift);
* ``pos_embed``, ``x_embedder.proj``, ``t_embedder.mlp.{0,2}``, ``y_embedder.mlp.{0,2}``,
  ``context_embedder``; ``final_layer.linear`` and ``final_layer.adaLN_modulation.1`` (halves swapped
  as above).

:func:`sd3_original_state_dict` converts a transformer's state dict. For LoRAs there is no kohya
conversion here: diffusers' ``SD3LoraLoaderMixin`` converts no kohya / sd-scripts SD3 LoRA (it reads the
diffusers / peft layout only), and ComfyUI reads that layout as well, so
:func:`sd3_diffusers_lora_state_dict` writes ``transformer.<module>.lora_A.weight`` /
``.lora_B.weight``.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from senseflow.families.single_file_keys import KeyMover

__all__ = ["ORIGINAL_PREFIX", "sd3_diffusers_lora_state_dict", "sd3_original_state_dict"]

ORIGINAL_PREFIX = "model.diffusion_model."

_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
}
# diffusers module (relative to the block) -> original (relative to ``joint_blocks.i.``)
_BLOCK = {
    "norm1.linear": "x_block.adaLN_modulation.1",
    "attn.to_out.0": "x_block.attn.proj",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
}
_CONTEXT = {  # absent from the last ("pre-only") block
    "attn.to_add_out": "context_block.attn.proj",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}
_QK_NORM = {
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
}
_FUSED = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_DUAL = {"attn2.to_out.0": "x_block.attn2.proj"}
_DUAL_QK_NORM = {"attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k"}
_DUAL_FUSED = {"x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v")}


def _block_indices(keys: list[str]) -> set[int]:
    found = set()
    for key in keys:
        parts = key.split(".")
        if parts[0] == "transformer_blocks" and len(parts) > 1 and parts[1].isdigit():
            found.add(int(parts[1]))
    return found


def sd3_original_state_dict(
    transformer: Mapping[str, Tensor], config: Mapping, prefix: str = ORIGINAL_PREFIX
) -> dict[str, Tensor]:
    """The state dict of a diffusers ``SD3Transformer2DModel`` in Stability AI's layout.

    ``transformer``: the model's ``state_dict()``; ``config``: its config (``num_layers``,
    ``dual_attention_layers`` and ``qk_norm`` are read and checked against the keys). ``prefix`` is put
    before every key (the published checkpoints use ``"model.diffusion_model."``). Raises
    ``ValueError`` when a tensor has no place in the layout or an expected one is missing; every input
    tensor lands in the output, unchanged except for the fusing of q / k / v and the half swaps of the
    final modulation and of the last block's text-stream modulation.
    """
    keys = list(transformer)
    num_layers = int(config["num_layers"])
    found = _block_indices(keys)
    if found != set(range(num_layers)):
        raise ValueError(
            f"config num_layers={num_layers} but the state dict has transformer_blocks "
            f"{sorted(found) or 'none'}"
        )
    dual = {int(i) for i in config.get("dual_attention_layers") or ()}
    if bad := sorted(i for i in dual if not 0 <= i < num_layers):
        raise ValueError(f"dual_attention_layers {bad} outside the {num_layers} blocks")
    qk_norm = config.get("qk_norm") is not None

    conv = KeyMover(transformer)
    for src, dst in _TOP.items():
        conv.module(src, dst)
    conv.module("norm_out.linear", "final_layer.adaLN_modulation.1", swap=True)
    conv.rename("pos_embed.pos_embed", "pos_embed")  # the positional table, a buffer

    for i in range(num_layers):
        src, dst = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        last = i == num_layers - 1
        conv.modules(src, dst, _BLOCK)
        conv.module(src + "norm1_context.linear", dst + "context_block.adaLN_modulation.1", swap=last)
        if not last:
            conv.modules(src, dst, _CONTEXT)
        conv.fused_layers(src, dst, _FUSED)
        if qk_norm:
            conv.modules(src, dst, _QK_NORM)
        if i in dual:
            conv.modules(src, dst, _DUAL)
            conv.fused_layers(src, dst, _DUAL_FUSED)
            if qk_norm:
                conv.modules(src, dst, _DUAL_QK_NORM)

    out = conv.finish("SD3 transformer")
    return {prefix + k: v for k, v in out.items()} if prefix else out


def sd3_diffusers_lora_state_dict(
    peft_lora: Mapping[str, Tensor], *, scale: float = 1.0, prefix: str = "transformer."
) -> dict[str, Tensor]:
    """A peft LoRA of a diffusers ``SD3Transformer2DModel`` in the layout diffusers' SD3 pipeline and
    ComfyUI load: ``transformer.<module>.lora_A.weight`` / ``.lora_B.weight``.

    ``peft_lora``: the state dict ``peft.get_peft_model_state_dict`` returns (no prefix). ``scale``: the
    adapter's ``lora_alpha / r``, multiplied into the B matrices, since the layout carries no alpha
    (loaders apply a scale of 1). Raises ``ValueError`` for keys that are not LoRA A / B matrices.
    """
    bad = [k for k in peft_lora if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if bad:
        raise ValueError("not LoRA A / B matrices of linear layers: " + ", ".join(sorted(bad)))
    out: dict[str, Tensor] = {}
    for key, value in peft_lora.items():
        if key.endswith(".lora_B.weight") and scale != 1.0:
            value = value * scale
        out[prefix + key] = value.contiguous()
    return out
