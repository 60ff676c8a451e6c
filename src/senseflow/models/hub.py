"""Pretrained folders named by a local path or a hub id, never downloaded behind the user's back."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from senseflow.config.common import looks_like_local_path


def resolve_pretrained(
    name: str,
    field: str,
    *,
    revision: str | None = None,
    allow_download: bool = False,
    patterns: list[str] | None = None,
    allow_field: str | None = "model.allow_download",
) -> Path:
    """A local folder as given, or a hub id from the local hub cache (fetched only with
    ``allow_download``, and then only the files matching ``patterns``). Every failure is one error
    naming ``field`` and what to do."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if looks_like_local_path(name) or path.exists():
        raise FileNotFoundError(f"{field}: {name!r} is not a folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                name, revision=revision, local_files_only=not allow_download, allow_patterns=patterns
            )
        )
    except HFValidationError:
        raise FileNotFoundError(
            f"{field}: {name!r} is not an existing folder (resolved to {path.resolve()}) nor a hub id of "
            "the form org/name"
        ) from None
    except LocalEntryNotFoundError:
        allow = f" or set {allow_field}: true" if allow_field else ""
        raise FileNotFoundError(
            f"{field}: {name!r} is neither a local folder nor in the hub cache; download it first "
            f"(huggingface-cli download {name}){allow}"
        ) from None


def safetensors_fingerprint(path: Path) -> str:
    """A cheap identity of a safetensors file: its header (every tensor's name, dtype, shape and
    offsets), its size and its first and last MiB. Hashing a 10 GB text encoder whole at every start
    would cost minutes; a retrained or converted file changes the header or the sampled bytes."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        digest.update(f.read(header_len))
        digest.update(str(size).encode())
        chunk = 1 << 20
        digest.update(f.read(chunk))
        f.seek(max(0, size - chunk))
        digest.update(f.read(chunk))
    return digest.hexdigest()


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, remembered for the process by (path, size, mtime)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]
