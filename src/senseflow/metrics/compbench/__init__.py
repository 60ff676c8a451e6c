"""T2I-CompBench evaluators re-implemented from the protocol (no upstream code).

* :mod:`.layout`: image index (``idx = prompt_line * 10 + k``), official file names and question ids.
* :mod:`.sidecar`: precomputed spaCy analysis (noun chunks, spatial objects, adjective-free prompts).
* :mod:`.blip_vqa`: colour / shape / texture (BLIP-VQA yes-probability product).
* :mod:`.clip_score`: non-spatial (CLIP ViT-B/32 cosine; complex "action" on adjective-free text).
* :mod:`.spatial`: 2D spatial rules over detections; pluggable detector, detection files.
* :mod:`.three_in_one`: complex category merge.
* :mod:`.official`: export for, and results of, the official scripts run externally.
* :mod:`.report`: the result-record block and a markdown table like the paper's Table 2.

The model modules (``blip_vqa``, ``clip_score``: torch, PIL) are imported on first use of one of their
names; transformers is imported only when a model is loaded.
"""

import importlib
from typing import Any

from senseflow.metrics.compbench.layout import (
    CompBenchIndex,
    IndexEntry,
    build_index,
    check_official_names,
    official_filename,
    parse_official_filename,
    read_index,
    sort_official_names,
    write_index,
)
from senseflow.metrics.compbench.official import (
    export_official_layout,
    find_official_result,
    official_category_scores,
    read_official_scores,
)
from senseflow.metrics.compbench.report import compbench_block, markdown_table, per_category, table_row
from senseflow.metrics.compbench.results import (
    CATEGORIES,
    CategoryScores,
    ImageScore,
    mean_score,
    read_image_scores,
    write_image_scores,
)
from senseflow.metrics.compbench.sidecar import (
    PromptAnalysis,
    Sidecar,
    SidecarEntry,
    Token,
    build_sidecar,
    load_sidecar,
    write_sidecar,
)
from senseflow.metrics.compbench.spatial import (
    Detection,
    Detector,
    determine_position,
    find_locality,
    position_details,
    read_detections_jsonl,
    run_detector,
    score_spatial,
    spatial_image_score,
    write_detections_jsonl,
)
from senseflow.metrics.compbench.three_in_one import SubsetLines, merge_three_in_one, normalise_line

__all__ = [
    "CATEGORIES",
    "BlipVqaOptions",
    "BlipVqaScorer",
    "CategoryScores",
    "ClipScorer",
    "CompBenchIndex",
    "Detection",
    "Detector",
    "ImageScore",
    "IndexEntry",
    "PromptAnalysis",
    "PromptTooLong",
    "Sidecar",
    "SidecarEntry",
    "SubsetLines",
    "Token",
    "build_index",
    "build_questions",
    "build_sidecar",
    "check_official_names",
    "combine_phrase_probs",
    "compbench_block",
    "determine_position",
    "export_official_layout",
    "find_bert_vocab",
    "find_locality",
    "find_official_result",
    "load_bert_tokenizer",
    "load_blip_vqa",
    "load_clip_b32",
    "load_sidecar",
    "markdown_table",
    "mean_score",
    "merge_three_in_one",
    "normalise_line",
    "official_category_scores",
    "official_filename",
    "parse_official_filename",
    "per_category",
    "position_details",
    "pre_question",
    "preprocess_clip_image",
    "preprocess_vqa_image",
    "read_detections_jsonl",
    "read_image_scores",
    "read_index",
    "read_official_scores",
    "run_detector",
    "score_attribute",
    "score_clip",
    "score_spatial",
    "sort_official_names",
    "spatial_image_score",
    "table_row",
    "write_detections_jsonl",
    "write_fallback_vocab",
    "write_image_scores",
    "write_index",
    "write_sidecar",
]

_LAZY = {
    "blip_vqa": (
        "BlipVqaOptions",
        "BlipVqaScorer",
        "build_questions",
        "combine_phrase_probs",
        "find_bert_vocab",
        "load_bert_tokenizer",
        "load_blip_vqa",
        "pre_question",
        "preprocess_vqa_image",
        "score_attribute",
        "write_fallback_vocab",
    ),
    "clip_score": ("ClipScorer", "PromptTooLong", "load_clip_b32", "preprocess_clip_image", "score_clip"),
}
_LAZY_NAMES = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
