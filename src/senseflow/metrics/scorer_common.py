"""Shared pieces of the image–text scorers (CLIP score, HPSv2, PickScore, ImageReward).

The implementation lives in :mod:`senseflow.metrics.scoring`, split by responsibility; this module
re-exports its public names so that ``from senseflow.metrics.scorer_common import ...`` keeps
working.
"""

from senseflow.metrics.scoring.base import PairScorer, dtype_name, resolve_device, resolve_dtype
from senseflow.metrics.scoring.checkpoints import (
    WEIGHT_FILE_SUFFIXES,
    KeyRule,
    LoadReport,
    MissingWeightsError,
    PathType,
    ScorerLoadError,
    Transform,
    apply_key_rules,
    load_converted,
    load_state_dict_file,
    sha256_file,
    sha256_weights,
)
from senseflow.metrics.scoring.clip_model import (
    OPEN_CLIP_ARCHS,
    LoadedClip,
    is_open_clip_state_dict,
    load_clip_model,
    open_clip_to_clip_state_dict,
)
from senseflow.metrics.scoring.embeddings import (
    check_text_pooling,
    clip_image_embeds,
    clip_text_embeds,
    embedding_from_output,
    l2_normalise,
)
from senseflow.metrics.scoring.images import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImagesInput,
    as_rgb_images,
    center_crop_offsets,
    normalise_chw,
    pil_center_crop,
    pil_clip_transform,
    pil_resize_shorter,
    resized_shorter_side,
    tensor_center_crop,
    tensor_resize_shorter,
    to_float_tensor,
)
from senseflow.metrics.scoring.tokenizer import (
    CLIP_CONTEXT_LENGTH,
    CLIP_EOT_TOKEN,
    CLIP_SOT_TOKEN,
    build_clip_bpe_files,
    bytes_to_unicode,
    clip_token_ids,
    load_clip_tokenizer,
)

__all__ = [
    "CLIP_CONTEXT_LENGTH",
    "CLIP_EOT_TOKEN",
    "CLIP_SOT_TOKEN",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "OPEN_CLIP_ARCHS",
    "WEIGHT_FILE_SUFFIXES",
    "ImagesInput",
    "KeyRule",
    "LoadReport",
    "LoadedClip",
    "MissingWeightsError",
    "PairScorer",
    "PathType",
    "ScorerLoadError",
    "Transform",
    "apply_key_rules",
    "as_rgb_images",
    "build_clip_bpe_files",
    "bytes_to_unicode",
    "center_crop_offsets",
    "check_text_pooling",
    "clip_image_embeds",
    "clip_text_embeds",
    "clip_token_ids",
    "dtype_name",
    "embedding_from_output",
    "is_open_clip_state_dict",
    "l2_normalise",
    "load_clip_model",
    "load_clip_tokenizer",
    "load_converted",
    "load_state_dict_file",
    "normalise_chw",
    "open_clip_to_clip_state_dict",
    "pil_center_crop",
    "pil_clip_transform",
    "pil_resize_shorter",
    "resized_shorter_side",
    "resolve_device",
    "resolve_dtype",
    "sha256_file",
    "sha256_weights",
    "tensor_center_crop",
    "tensor_resize_shorter",
    "to_float_tensor",
]
