"""CLIP models (transformers ``CLIPModel``) from folders, HF-named files or open_clip files.

:func:`open_clip_to_clip_state_dict` converts an open_clip CLIP state dict into a
:class:`transformers.CLIPModel` config and state dict; :func:`load_clip_model` loads a
``from_pretrained`` folder, a transformers-named state-dict file or an open_clip state-dict file,
and raises :class:`~senseflow.metrics.scoring.checkpoints.MissingWeightsError` naming every missing
key; :func:`load_clip_with_tokenizer` loads a model together with its CLIP tokenizer.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from senseflow.metrics.scoring.checkpoints import (
    KeyRule,
    LoadReport,
    MissingWeightsError,
    PathType,
    ScorerLoadError,
    apply_key_rules,
    load_converted,
    load_state_dict_file,
)
from senseflow.metrics.scoring.tokenizer import load_clip_tokenizer

# Head counts and activation of open_clip architectures (not recoverable from tensor shapes).
OPEN_CLIP_ARCHS: dict[str, dict[str, Any]] = {
    "ViT-H-14": {"vision_heads": 16, "text_heads": 16, "hidden_act": "gelu"},
    "ViT-g-14": {"vision_heads": 16, "text_heads": 16, "hidden_act": "gelu"},
    "ViT-bigG-14": {"vision_heads": 16, "text_heads": 20, "hidden_act": "gelu"},
    "ViT-L-14": {"vision_heads": 16, "text_heads": 12, "hidden_act": "gelu"},
    "ViT-L-14-quickgelu": {"vision_heads": 16, "text_heads": 12, "hidden_act": "quick_gelu"},
    "ViT-B-32": {"vision_heads": 12, "text_heads": 8, "hidden_act": "gelu"},
    "ViT-B-32-quickgelu": {"vision_heads": 12, "text_heads": 8, "hidden_act": "quick_gelu"},
    "ViT-B-16": {"vision_heads": 12, "text_heads": 8, "hidden_act": "gelu"},
}

_OPEN_CLIP_BLOCK = (
    ("ln_1.weight", "layer_norm1.weight"),
    ("ln_1.bias", "layer_norm1.bias"),
    ("attn.out_proj.weight", "self_attn.out_proj.weight"),
    ("attn.out_proj.bias", "self_attn.out_proj.bias"),
    ("ln_2.weight", "layer_norm2.weight"),
    ("ln_2.bias", "layer_norm2.bias"),
    ("mlp.c_fc.weight", "mlp.fc1.weight"),
    ("mlp.c_fc.bias", "mlp.fc1.bias"),
    ("mlp.c_proj.weight", "mlp.fc2.weight"),
    ("mlp.c_proj.bias", "mlp.fc2.bias"),
)
# Buffers some open_clip / OpenAI exports carry; not parameters.
_OPEN_CLIP_IGNORABLE = re.compile(r"^(attn_mask|input_resolution|context_length|vocab_size|.*position_ids)$")


def is_open_clip_state_dict(state: Mapping[str, torch.Tensor]) -> bool:
    return "visual.conv1.weight" in state or "visual.class_embedding" in state


def _transpose(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous()


def _chunk(t: torch.Tensor, index: int) -> torch.Tensor:
    return t.chunk(3, dim=0)[index].contiguous()


def _count_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = [int(m.group(1)) for k in state if (m := pattern.match(k))]
    return max(indices) + 1 if indices else 0


def _block_rules(src_prefix: str, dst_prefix: str) -> list[KeyRule]:
    rules = [KeyRule(f"{src_prefix}.{s}", f"{dst_prefix}.{d}") for s, d in _OPEN_CLIP_BLOCK]
    for index, name in enumerate("qkv"):
        chunk = functools.partial(_chunk, index=index)
        rules.append(
            KeyRule(f"{src_prefix}.attn.in_proj_weight", f"{dst_prefix}.self_attn.{name}_proj.weight", chunk)
        )
        rules.append(
            KeyRule(f"{src_prefix}.attn.in_proj_bias", f"{dst_prefix}.self_attn.{name}_proj.bias", chunk)
        )
    return rules


def open_clip_to_clip_state_dict(
    state: Mapping[str, torch.Tensor],
    *,
    arch: str | None = None,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    hidden_act: str | None = None,
    source: str = "open_clip state dict",
    bos_token_id: int = 49406,
    eos_token_id: int = 49407,
) -> tuple[Any, dict[str, torch.Tensor], LoadReport]:
    """Convert an open_clip CLIP state dict to a :class:`transformers.CLIPConfig` + state dict.

    Sizes come from tensor shapes; head counts and the activation from ``arch`` (a key of
    :data:`OPEN_CLIP_ARCHS`) or the explicit arguments. The mapping: token/positional embeddings,
    resblocks (``in_proj`` split into q/k/v in that order), ``ln_final``, ``text_projection``
    (transposed, used as ``x @ P`` in open_clip), ``visual.conv1`` (no bias), ``class_embedding``,
    ``positional_embedding``, ``ln_pre``/``ln_post``, ``visual.proj`` (transposed), ``logit_scale``.
    The report's missing/unexpected keys use open_clip names.
    """
    from transformers import CLIPConfig

    preset = dict(OPEN_CLIP_ARCHS.get(arch, {})) if arch else {}
    if arch and not preset and None in (vision_heads, text_heads):
        raise ScorerLoadError(f"unknown open_clip architecture {arch!r}; known: {sorted(OPEN_CLIP_ARCHS)}")
    vision_heads = vision_heads or preset.get("vision_heads")
    text_heads = text_heads or preset.get("text_heads")
    hidden_act = hidden_act or preset.get("hidden_act", "gelu")
    if not vision_heads or not text_heads:
        raise ScorerLoadError("open_clip conversion needs arch=<name> or vision_heads= and text_heads=")
    required = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight")
    required += ("positional_embedding", "text_projection", "visual.transformer.resblocks.0.mlp.c_fc.weight")
    required += ("transformer.resblocks.0.mlp.c_fc.weight",)
    absent = [k for k in required if k not in state]
    if absent:
        raise MissingWeightsError(source, absent)

    conv = state["visual.conv1.weight"]
    vision_width, patch = conv.shape[0], conv.shape[-1]
    grid = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
    vocab_size, text_width = state["token_embedding.weight"].shape
    context = state["positional_embedding"].shape[0]
    embed_dim = state["text_projection"].shape[1]
    vision_layers = _count_blocks(state, "visual.transformer.resblocks.")
    text_layers = _count_blocks(state, "transformer.resblocks.")
    config = CLIPConfig(
        text_config={
            "vocab_size": int(vocab_size),
            "hidden_size": int(text_width),
            "intermediate_size": int(state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
            "num_hidden_layers": text_layers,
            "num_attention_heads": int(text_heads),
            "max_position_embeddings": int(context),
            "hidden_act": hidden_act,
            "layer_norm_eps": 1e-5,
            "projection_dim": int(embed_dim),
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
            "pad_token_id": 0,
        },
        vision_config={
            "hidden_size": int(vision_width),
            "intermediate_size": int(state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
            "num_hidden_layers": vision_layers,
            "num_attention_heads": int(vision_heads),
            "image_size": int(grid * patch),
            "patch_size": int(patch),
            "hidden_act": hidden_act,
            "layer_norm_eps": 1e-5,
            "projection_dim": int(embed_dim),
        },
        projection_dim=int(embed_dim),
    )
    rules = [
        KeyRule("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
        KeyRule("positional_embedding", "text_model.embeddings.position_embedding.weight"),
        KeyRule("ln_final.weight", "text_model.final_layer_norm.weight"),
        KeyRule("ln_final.bias", "text_model.final_layer_norm.bias"),
        KeyRule("text_projection", "text_projection.weight", _transpose),
        KeyRule("visual.class_embedding", "vision_model.embeddings.class_embedding"),
        KeyRule("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
        KeyRule("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
        KeyRule("visual.ln_pre.weight", "vision_model.pre_layrnorm.weight"),
        KeyRule("visual.ln_pre.bias", "vision_model.pre_layrnorm.bias"),
        KeyRule("visual.ln_post.weight", "vision_model.post_layernorm.weight"),
        KeyRule("visual.ln_post.bias", "vision_model.post_layernorm.bias"),
        KeyRule("visual.proj", "visual_projection.weight", _transpose),
        KeyRule("logit_scale", "logit_scale"),
    ]
    for i in range(text_layers):
        rules += _block_rules(f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}")
    for i in range(vision_layers):
        rules += _block_rules(f"visual.transformer.resblocks.{i}", f"vision_model.encoder.layers.{i}")
    converted, report = apply_key_rules(
        state,
        rules,
        source=source,
        source_format="open_clip",
        ignorable=lambda k: bool(_OPEN_CLIP_IGNORABLE.match(k)),
    )
    return config, converted, report


@dataclass
class LoadedClip:
    model: Any  # transformers.CLIPModel
    report: LoadReport
    source_format: str  # "from_pretrained" | "transformers_state_dict" | "open_clip"
    path: Path


def load_clip_model(
    path: PathType,
    *,
    arch: str | None = None,
    config: Any = None,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    hidden_act: str | None = None,
    bos_token_id: int = 49406,
    eos_token_id: int = 49407,
) -> LoadedClip:
    """A :class:`transformers.CLIPModel` (float32, eval mode, on CPU) from a local path.

    * a folder: ``CLIPModel.from_pretrained(folder, local_files_only=True)``;
    * a file with open_clip names (``visual.conv1.weight`` ...): converted with
      :func:`open_clip_to_clip_state_dict` (``arch`` or head counts required; the text model pools
      at the first ``eos_token_id``, the tokenizer's EOT, as open_clip's argmax does for CLIP BPE);
    * a file with transformers names: needs ``config`` (a ``CLIPConfig``, a dict or a
      ``config.json`` path) or a ``config.json`` beside the file.

    Missing or shape-mismatched keys raise :class:`ScorerLoadError`; unexpected keys are logged.
    """
    from transformers import CLIPConfig, CLIPModel

    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ScorerLoadError(f"{path}: not a from_pretrained folder (no config.json)")
        model, info = CLIPModel.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
        report = LoadReport(
            source=str(path),
            source_format="from_pretrained",
            missing=sorted(info.get("missing_keys", [])),
            unexpected=sorted(k for k in info.get("unexpected_keys", []) if not k.endswith("position_ids")),
            mismatched=[str(m) for m in info.get("mismatched_keys", [])],
        ).check()
        return LoadedClip(model.float().eval(), report, "from_pretrained", path)

    state = load_state_dict_file(path)
    if is_open_clip_state_dict(state):
        clip_config, converted, report = open_clip_to_clip_state_dict(
            state,
            arch=arch,
            vision_heads=vision_heads,
            text_heads=text_heads,
            hidden_act=hidden_act,
            source=str(path),
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
        )
        model = CLIPModel(clip_config)
        load_converted(model, converted, report)
        return LoadedClip(model.float().eval(), report, "open_clip", path)

    if config is None and (path.parent / "config.json").is_file():
        config = path.parent / "config.json"
    if config is None:
        raise ScorerLoadError(
            f"{path}: a transformers-named state dict needs config= (CLIPConfig or config.json)"
        )
    if isinstance(config, (str, PathLike)):
        config = json.loads(Path(config).read_text())
    if isinstance(config, Mapping):
        config = CLIPConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    model = CLIPModel(config)
    expected = model.state_dict()
    report = LoadReport(source=str(path), source_format="transformers_state_dict")
    report.unexpected = sorted(k for k in state if k not in expected and not k.endswith("position_ids"))
    report.missing = sorted(k for k in expected if k not in state)
    usable = {k: v for k, v in state.items() if k in expected}
    load_converted(model, usable, report)
    return LoadedClip(model.float().eval(), report, "transformers_state_dict", path)


def load_clip_with_tokenizer(
    path: PathType,
    tokenizer: Any = None,
    *,
    arch: str | None = None,
    **convert_kwargs: Any,
) -> tuple[LoadedClip, Any]:
    """A CLIP model from ``path`` and its tokenizer, the model's text pooling set by the tokenizer.

    ``tokenizer``: a tokenizer object, a tokenizer folder or ``bpe_simple_vocab_16e6.txt.gz``;
    ``None`` takes the tokenizer files of ``path`` when it is a folder (:func:`load_clip_tokenizer`).
    The tokenizer's BOS/EOS ids, ``arch`` and ``convert_kwargs`` (``config``,
    ``vision_heads``, ``text_heads``, ``hidden_act``) go to :func:`load_clip_model`.
    """
    fallback = Path(path) if Path(path).is_dir() else None
    tokenizer = load_clip_tokenizer(tokenizer, fallback_dir=fallback)
    loaded = load_clip_model(
        path,
        arch=arch,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **convert_kwargs,
    )
    return loaded, tokenizer
