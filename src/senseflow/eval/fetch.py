"""``senseflow eval fetch-weights``: the one opt-in download of metric weights into the weights root.

Only this command touches the network, and only for the names asked for. Hugging Face entries go
through ``huggingface_hub`` (``hf_hub_download`` for one file, ``snapshot_download`` with file patterns
for folders), direct URLs through ``urllib`` into a ``.partial`` file renamed when complete. Every
fetched entry is then checked exactly as a run would check it
(:func:`senseflow.metrics.weights.resolve`), and its sha256 printed so the manifest can record it.
"""

from __future__ import annotations

import shutil
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from senseflow.metrics.weights import MANIFEST, ResolvedWeights, WeightEntry, get_entry, resolve

__all__ = ["fetch", "fetchable"]


def fetchable(entry: WeightEntry) -> bool:
    return entry.url is not None or entry.hf_repo is not None


def _download_url(url: str, target: Path) -> None:
    partial = target.with_name(target.name + ".partial")
    with urllib.request.urlopen(url) as response, open(partial, "wb") as f:
        shutil.copyfileobj(response, f, length=1 << 20)
    partial.replace(target)


def _download_hf(entry: WeightEntry, target: Path) -> None:
    from huggingface_hub import hf_hub_download, list_repo_files, snapshot_download

    assert entry.hf_repo is not None
    if entry.is_dir:
        patterns = list(entry.hf_files)
        if "*.safetensors" in patterns and not any(
            f.endswith(".safetensors") for f in list_repo_files(entry.hf_repo)
        ):
            patterns.append("pytorch_model*.bin")  # older repositories: pickled weights only
        snapshot_download(entry.hf_repo, local_dir=str(target), allow_patterns=patterns or None)
        return
    if len(entry.hf_files) != 1 or Path(entry.hf_files[0]).name != target.name:
        raise ValueError(
            f"manifest entry {entry.name!r}: a file entry needs exactly one file named {target.name}"
        )
    hf_hub_download(entry.hf_repo, entry.hf_files[0], local_dir=str(target.parent))


def fetch(names: Sequence[str], root: str | Path, force: bool = False) -> list[ResolvedWeights]:
    """Download ``names`` (logical names; ``all`` for every fetchable entry) into ``root`` and verify them."""
    root = Path(root).expanduser()
    wanted = [n for n in MANIFEST if fetchable(MANIFEST[n])] if list(names) == ["all"] else list(names)
    entries = [get_entry(n) for n in wanted]
    manual = [e.name for e in entries if not fetchable(e)]
    if manual:
        raise ValueError(
            f"{', '.join(manual)} cannot be fetched automatically; get them by hand: "
            + "; ".join(f"{e.name}: {e.upstream}" for e in entries if e.name in manual)
        )
    out = []
    for entry in entries:
        target = root / entry.relpath
        present = target.is_dir() if entry.is_dir else target.is_file()
        if present and not force:
            print(f"{entry.name}: already at {target}")
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            source = entry.url or f"huggingface.co/{entry.hf_repo}"
            print(f"{entry.name}: downloading from {source} to {target}", flush=True)
            if entry.url is not None:
                _download_url(entry.url, target)
            else:
                _download_hf(entry, target)
        resolved = resolve(entry.name, root=root)
        state = "verified" if resolved.verified else "unverified (no manifest hash)"
        print(f"{entry.name}: {state}" + (f", sha256 {resolved.sha256}" if resolved.sha256 else ""))
        out.append(resolved)
    return out
