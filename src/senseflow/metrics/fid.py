"""FID-T and Patch FID-T over image folders: clean-fid's "clean" protocol, re-implemented.

Pipeline for one image (decoded as ``Image.open(p).convert("RGB")``, uint8 HxWx3):

1. **Preset transform** on the uint8 image (clean-fid's ``custom_image_tranform``, applied to both
   sets), see :data:`PRESETS`:

   * ``clean299``: none (direct 1024 -> 299 resize; FID-T);
   * ``dmd2_whole``: centre square crop of side min(W, H), then PIL ``resize((512, 512), LANCZOS)``;
   * ``center299_patch``: the centre 299x299 crop of the full-resolution image (Patch FID-T); images
     smaller than 299 on either side are rejected (DMD2 would silently pass them through).

2. **Resizer** :func:`clean_resize`: each channel becomes a float32 PIL mode-"F" image, is resized to
   299x299 with ``BICUBIC`` (antialiased), and the channels are stacked back to 299x299x3 float32,
   never re-quantised. Values are clipped to [0, 255] afterwards, as clean-fid 0.1.35 does
   (``np.asarray(img).clip(0, 255)`` per channel; an older revision of its repository did not clip).
   For a 299x299 input the resize is an identity (asserted by the tests) and is applied anyway.

3. **Extractor** (:class:`InceptionExtractor`): float32 [N, 3, 299, 299] in [0, 255] -> [N, 2048]
   pool features, the network seeing ``(x - 128) / 128``. Built from an explicit file in one of the
   container formats of :data:`EXTRACTOR_FORMATS`; its sha256 and format go into the result.

4. **Statistics**: float64 mean and unbiased covariance streamed batch by batch
   (:class:`~senseflow.metrics.frechet.FeatureStats`), so 5K images at 1024 px never sit in memory
   (only their 2048-d float32 features, 40 MB per set and preset, which are kept for the cache).
   The distance is :func:`~senseflow.metrics.frechet.fid_from_stats` (scipy ``sqrtm`` with the
   ``eps = 1e-6`` diagonal fallback).

One pass over a folder computes every requested preset (decode once, one transform per preset).
Decoding and resizing run in ``num_workers`` DataLoader processes; the extractor runs in the caller.

**Feature cache** (:func:`extract_folder`, ``cache_dir=``): one ``.npz`` per (image set, preset,
extractor) holding the per-image features, the file list and the streamed statistics. The key hashes
``set_id`` (the caller's identity of the image set: prompt-file sha256, model / checkpoint sha256, seed
scheme, resolution, quantisation), the folder's file names and sizes, the preset, the extractor's
format and sha256, this module's protocol version and the Pillow version. A file whose key or file
list differs is ignored and rewritten.

Known differences from clean-fid: the mean is accumulated in float64 (clean-fid takes ``np.mean`` of
float32 features, ~1e-7 relative); the sqrtm fallback also triggers when the root is inaccurate, not
only when it is non-finite (same result whenever N > 2048).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
from torch.utils.data import DataLoader, Dataset

from senseflow.metrics.fid_extractors import EXTRACTOR_FORMATS as EXTRACTOR_FORMATS
from senseflow.metrics.fid_extractors import FEATURE_DIM as FEATURE_DIM
from senseflow.metrics.fid_extractors import InceptionExtractor as InceptionExtractor
from senseflow.metrics.fid_extractors import _jit_load as _jit_load
from senseflow.metrics.fid_extractors import _scale as _scale
from senseflow.metrics.fid_extractors import extractor_from_weights as extractor_from_weights
from senseflow.metrics.fid_extractors import load_extractor as load_extractor
from senseflow.metrics.fid_preprocess import INCEPTION_SIZE as INCEPTION_SIZE
from senseflow.metrics.fid_preprocess import PRESETS as PRESETS
from senseflow.metrics.fid_preprocess import Preset as Preset
from senseflow.metrics.fid_preprocess import _center299_patch as _center299_patch
from senseflow.metrics.fid_preprocess import _dmd2_whole as _dmd2_whole
from senseflow.metrics.fid_preprocess import _identity as _identity
from senseflow.metrics.fid_preprocess import clean_resize as clean_resize
from senseflow.metrics.fid_preprocess import get_preset as get_preset
from senseflow.metrics.fid_preprocess import preprocess as preprocess
from senseflow.metrics.frechet import FeatureStats, fid_from_stats
from senseflow.metrics.image_io import center_crop as center_crop
from senseflow.metrics.image_io import center_crop_square as center_crop_square
from senseflow.metrics.image_io import list_images, load_rgb
from senseflow.metrics.weights import WeightsMismatchError as WeightsMismatchError
from senseflow.metrics.weights import resolve as resolve
from senseflow.metrics.weights import sha256_file as sha256_file

logger = logging.getLogger(__name__)

SQRTM_EPS = 1e-6
RESIZER = "pil_bicubic_float32_per_channel_clip0_255"
CACHE_SCHEMA = "senseflow.fid.features/1"

# --- folders, streaming and the cache ----------------------------------------------------------------


class _FolderImages(Dataset):
    """Decodes image ``i`` and returns its network input for every preset."""

    def __init__(self, files: Sequence[Path], presets: Sequence[str]) -> None:
        self.files = list(files)
        self.presets = list(presets)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        path = self.files[i]
        image = load_rgb(path)
        try:
            return {name: preprocess(image, name) for name in self.presets}
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e


def _collate(items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {
        name: torch.from_numpy(np.stack([it[name] for it in items])).permute(0, 3, 1, 2).contiguous()
        for name in items[0]
    }


@dataclass
class FeatureSet:
    """Features of one image folder under one preset."""

    preset: str
    files: list[str]  # POSIX paths relative to the folder, in feature order
    features: np.ndarray  # [N, 2048] float32
    stats: FeatureStats  # float64 streamed statistics
    from_cache: bool = False
    cache_path: Path | None = None

    @property
    def n(self) -> int:
        return self.stats.n


def _fingerprint(folder: Path, files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(folder).as_posix()}\t{p.stat().st_size}\n".encode())
    return h.hexdigest()


def cache_key(
    fingerprint: str, preset: str, extractor: InceptionExtractor, set_id: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The fields that identify a cached feature set (hashed into the file name)."""
    if not extractor.sha256:
        raise ValueError("the feature cache needs an extractor with a sha256 (load it from a file)")
    get_preset(preset)
    return {
        "schema": CACHE_SCHEMA,
        "image_set": dict(set_id) if set_id else None,
        "files": fingerprint,
        "preset": preset,
        "resizer": RESIZER,
        "extractor_format": extractor.format,
        "extractor_sha256": extractor.sha256,
        "feature_dim": extractor.dim,
        "pillow": PIL.__version__,
    }


def _key_digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def _cache_path(cache_dir: Path, preset: str, digest: str) -> Path:
    return cache_dir / f"fid-{preset}-{digest[:24]}.npz"


def _load_cached(
    path: Path, key: Mapping[str, Any], files: list[str], preset: str, dim: int
) -> FeatureSet | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            cached_files = [str(f) for f in data["files"]]
            features = np.array(data["features"], dtype=np.float32)
            stats = FeatureStats.load(io.BytesIO(data["stats"].tobytes()))
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
        logger.warning("ignoring unreadable FID feature cache %s: %s", path, e)
        return None
    if meta != json.loads(json.dumps(key, sort_keys=True, default=str)) or cached_files != files:
        logger.warning("ignoring FID feature cache %s: its key or file list differs", path)
        return None
    if features.shape != (len(files), dim) or stats.n != len(files):
        logger.warning("ignoring FID feature cache %s: inconsistent shapes", path)
        return None
    return FeatureSet(preset, cached_files, features, stats, from_cache=True, cache_path=path)


def _save_cached(path: Path, key: Mapping[str, Any], fs: FeatureSet) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fs.stats.save(buf)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                meta=np.array(json.dumps(key, sort_keys=True, default=str)),
                files=np.array(fs.files, dtype=str),
                features=fs.features,
                stats=np.frombuffer(buf.getvalue(), dtype=np.uint8),
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def extract_folder(
    folder: str | PathLike,
    extractor: InceptionExtractor,
    presets: Sequence[str] = ("clean299",),
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    cache_dir: str | PathLike | None = None,
    set_id: Mapping[str, Any] | None = None,
    recursive: bool = True,
    progress: bool = False,
) -> dict[str, FeatureSet]:
    """Features of every image in ``folder`` for each preset, in one streaming pass.

    Presets found in ``cache_dir`` (see the module doc) are loaded, the others computed and then
    written there. ``set_id`` should carry the image set's identity fields (prompt-file sha256, model
    / checkpoint sha256, seed scheme, resolution, quantisation); without it the key rests on file names
    and sizes only.
    """
    folder = Path(folder)
    presets = list(dict.fromkeys(presets))
    for name in presets:
        get_preset(name)
    paths = list_images(folder, recursive=recursive)
    if not paths:
        raise ValueError(f"no images in {folder}")
    files = [p.relative_to(folder).as_posix() for p in paths]

    out: dict[str, FeatureSet] = {}
    keys: dict[str, dict[str, Any]] = {}
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        fingerprint = _fingerprint(folder, paths)
        for name in presets:
            keys[name] = cache_key(fingerprint, name, extractor, set_id)
            path = _cache_path(cache, name, _key_digest(keys[name]))
            hit = _load_cached(path, keys[name], files, name, extractor.dim)
            if hit is not None:
                out[name] = hit
    todo = [name for name in presets if name not in out]
    if todo:
        feats = {name: np.empty((len(paths), extractor.dim), dtype=np.float32) for name in todo}
        stats = {name: FeatureStats(extractor.dim) for name in todo}
        loader = DataLoader(
            _FolderImages(paths, todo),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=_collate,
        )
        if progress:
            from tqdm.auto import tqdm

            loader = tqdm(loader, desc=f"FID features {folder.name}", unit="batch")
        start = 0
        for batch in loader:
            size = next(iter(batch.values())).shape[0]
            for name in todo:
                f = extractor.features(batch[name])
                feats[name][start : start + size] = f
                stats[name].update(f)
            start += size
        for name in todo:
            fs = FeatureSet(name, files, feats[name], stats[name])
            if cache is not None:
                fs.cache_path = _cache_path(cache, name, _key_digest(keys[name]))
                _save_cached(fs.cache_path, keys[name], fs)
            out[name] = fs
    return {name: out[name] for name in presets}


# --- FID ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FidResult:
    """An FID value with the protocol fields of the result record (spec §12)."""

    value: float
    n: tuple[int, int]
    preset: str
    extractor_format: str
    extractor_sha256: str | None
    sqrtm_eps: float
    crop: str | None
    patches_per_image: int | None
    pre_resize: str | None
    resizer: str
    pillow: str
    from_cache: tuple[bool, bool]

    def record(self) -> dict[str, Any]:
        """The ``metrics.fid_t`` / ``metrics.patch_fid_t`` entry (fields not applicable are None)."""
        return {
            "value": self.value,
            "n": list(self.n),
            "preset": self.preset,
            "extractor_format": self.extractor_format,
            "extractor_sha256": self.extractor_sha256,
            "stats": "float64",
            "sqrtm_eps": self.sqrtm_eps,
            "crop": self.crop,
            "patches_per_image": self.patches_per_image,
            "pre_resize": self.pre_resize,
            "resizer": self.resizer,
            "pillow": self.pillow,
        }


def fid_between(
    a: FeatureSet, b: FeatureSet, extractor: InceptionExtractor, eps: float = SQRTM_EPS
) -> FidResult:
    """FID between two feature sets of the same preset."""
    if a.preset != b.preset:
        raise ValueError(f"feature sets of different presets: {a.preset!r} vs {b.preset!r}")
    preset = get_preset(a.preset)
    return FidResult(
        value=fid_from_stats(a.stats, b.stats, eps=eps),
        n=(a.n, b.n),
        preset=preset.name,
        extractor_format=extractor.format,
        extractor_sha256=extractor.sha256,
        sqrtm_eps=eps,
        crop=preset.crop,
        patches_per_image=preset.patches_per_image,
        pre_resize=preset.pre_resize,
        resizer=RESIZER,
        pillow=PIL.__version__,
        from_cache=(a.from_cache, b.from_cache),
    )


def _as_extractor(extractor: InceptionExtractor | str | PathLike) -> InceptionExtractor:
    if isinstance(extractor, InceptionExtractor):
        return extractor
    return load_extractor(extractor)


def fid_from_dirs(
    dir_a: str | PathLike,
    dir_b: str | PathLike,
    extractor: InceptionExtractor | str | PathLike,
    presets: Sequence[str] = ("clean299", "center299_patch"),
    *,
    cache_dir: str | PathLike | None = None,
    set_id_a: Mapping[str, Any] | None = None,
    set_id_b: Mapping[str, Any] | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    eps: float = SQRTM_EPS,
    progress: bool = False,
) -> dict[str, FidResult]:
    """FID between two image folders for each preset (one pass over each folder).

    ``extractor`` is an :class:`InceptionExtractor` or a path to a weights file (format detected).
    """
    ext = _as_extractor(extractor)
    kw = dict(batch_size=batch_size, num_workers=num_workers, cache_dir=cache_dir, progress=progress)
    feats_a = extract_folder(dir_a, ext, presets, set_id=set_id_a, **kw)
    same = Path(dir_a).resolve() == Path(dir_b).resolve() and set_id_a == set_id_b
    feats_b = feats_a if same else extract_folder(dir_b, ext, presets, set_id=set_id_b, **kw)
    return {name: fid_between(feats_a[name], feats_b[name], ext, eps=eps) for name in feats_a}


def compute_fid(
    dir_a: str | PathLike,
    dir_b: str | PathLike,
    preset: str = "clean299",
    extractor: InceptionExtractor | str | PathLike | None = None,
    **kwargs: Any,
) -> FidResult:
    """FID between two image folders under one preset; ``kwargs`` as :func:`fid_from_dirs`."""
    if extractor is None:
        raise ValueError("an Inception extractor (or the path of its weights file) is required")
    return fid_from_dirs(dir_a, dir_b, extractor, (preset,), **kwargs)[preset]
