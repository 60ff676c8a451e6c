"""Distribution metrics: Fréchet distance between Gaussian fits of feature sets (the core of FID)."""

from senseflow.metrics.fid import (
    PRESETS,
    FidResult,
    InceptionExtractor,
    clean_resize,
    compute_fid,
    extract_folder,
    fid_from_dirs,
    load_extractor,
    preprocess,
)
from senseflow.metrics.frechet import FeatureStats, fid_from_features, fid_from_stats, frechet_distance
from senseflow.metrics.image_io import (
    DEFAULT_QUANTISATION,
    center_crop,
    list_images,
    load_rgb,
    quantise,
    save_png,
)
from senseflow.metrics.weights import (
    MANIFEST,
    WeightsMismatchError,
    WeightsNotFoundError,
    resolve,
    sha256_file,
)

__all__ = [
    "DEFAULT_QUANTISATION",
    "MANIFEST",
    "PRESETS",
    "FeatureStats",
    "FidResult",
    "InceptionExtractor",
    "WeightsMismatchError",
    "WeightsNotFoundError",
    "center_crop",
    "clean_resize",
    "compute_fid",
    "extract_folder",
    "fid_from_dirs",
    "fid_from_features",
    "fid_from_stats",
    "frechet_distance",
    "list_images",
    "load_extractor",
    "load_rgb",
    "preprocess",
    "quantise",
    "resolve",
    "save_png",
    "sha256_file",
]
