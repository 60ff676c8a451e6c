"""Pretrained folders named by a local path or a hub id, never downloaded behind the user's back."""

from __future__ import annotations

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
