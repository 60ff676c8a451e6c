"""Writing the offline text cache (layout and reading: :mod:`senseflow.models.text_cache`).

Shards are written under temporary names and renamed, the manifest last, so a crashed write leaves
the previous cache readable; appending writes new shards only.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from senseflow.models.batch import Conditioning
from senseflow.models.text_cache import (
    _GROUP_NAME,
    _SHARD_FILE,
    BASE,
    COMMAND,
    DEFAULT_SHARD_SIZE,
    MANIFEST,
    SHARD_BYTES,
    TextCacheError,
    _Group,
    _manifest_json,
    _read_manifest,
    _Shard,
    prompt_key,
)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_manifest(folder: Path, groups: Mapping[str, _Group]) -> None:
    """Replace the manifest atomically (temporary name, fsync, rename, fsync of the folder)."""
    tmp = folder / f".{MANIFEST}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(_manifest_json(groups), f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / MANIFEST)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(folder)


def _shard_name(group: str, index: int) -> str:
    return f"shard-{index:05d}.safetensors" if group == BASE else f"{group}-shard-{index:05d}.safetensors"


def _write_shard(folder: Path, name: str, tensors: dict[str, Tensor], prompts: list[str], group: str) -> None:
    tmp = folder / f".{name}.{os.getpid()}.tmp"
    try:
        save_file(tensors, str(tmp), metadata={"group": group, "prompts": json.dumps(prompts)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # safetensors creates it owner-only; the cache is shared like the manifest
        os.replace(tmp, folder / name)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_leftovers(folder: Path, groups: Mapping[str, _Group] | None) -> None:
    """Delete files of interrupted writes: temporary files and shards the manifest does not name."""
    named = {s.file for g in (groups or {}).values() for s in g.shards}
    for p in folder.iterdir():
        temporary = p.name.startswith(".") and p.name.endswith(".tmp")
        if temporary or (_SHARD_FILE.match(p.name) and p.name not in named):
            p.unlink(missing_ok=True)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------- write


@dataclass(frozen=True)
class WriteReport:
    folder: Path
    group: str
    identity_hash: str
    added: int  # prompts encoded and written now
    present: int  # prompts that were already in the group
    count: int  # prompts in the group after the write
    shards_written: int
    rebuilt: bool  # the group existed with another identity and was replaced


def _as_tensors(out: Conditioning | Mapping[str, Tensor]) -> dict[str, Tensor]:
    return dict(out.tensors if isinstance(out, Conditioning) else out)


def write_tensor_group(
    folder: str | os.PathLike,
    group: str,
    identity: Mapping[str, Any],
    encode: Callable[[list[str]], Conditioning | Mapping[str, Tensor]],
    prompts: Iterable[str],
    *,
    batch_size: int = 64,
    shard_size: int | None = None,
    progress: bool = True,
    commit_every_s: float = 120.0,
) -> WriteReport:
    """Encode the prompts ``group`` lacks with ``encode`` (batches of ``batch_size``, no grad) and add
    them to the cache at ``folder`` as new shards.

    ``group`` is ``"text"`` for the adapter's encodings (:func:`write_text_cache`) or another
    producer's name; that producer's tensors are stored as ``<group>.<name>``. A group written
    with another identity is replaced (its old shards are removed once the new manifest is in
    place); the other groups are kept. A group rebuilt with no prompt to write is committed empty
    (the new identity, no tensor, no shard), so the manifest never names a removed shard.
    ``shard_size``: prompts per shard (default: at most 4096 and about 1 GiB). The manifest is
    written after the last shard and every ``commit_every_s`` seconds on the way, so an interrupted
    run keeps what it committed.
    """
    if group != BASE and not _GROUP_NAME.match(group):
        raise ValueError(f"text cache group {group!r}: use lowercase letters, digits and '_'")
    if batch_size < 1 or (shard_size is not None and shard_size < 1):
        raise ValueError("batch_size and shard_size must be positive")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    identity = json.loads(json.dumps(dict(identity), default=str))  # as it reads back from JSON
    groups = _read_manifest(folder) or {}
    if group != BASE and BASE not in groups:
        raise TextCacheError(f"{folder}: no text cache to add group {group!r} to; run `{COMMAND}` first")
    _remove_leftovers(folder, groups)

    old = groups.get(group)
    rebuilt = old is not None and old.identity != identity
    replaced = [s.file for s in old.shards] if rebuilt and old is not None else []
    target = _Group(group, identity, {}, []) if old is None or rebuilt else old
    known = {k for s in target.shards for k in s.keys}

    todo: list[str] = []
    seen: set[str] = set()
    present = 0
    for p in prompts:
        key = prompt_key(p)
        if key in seen:
            continue
        seen.add(key)
        if key in known:
            present += 1
        else:
            todo.append(p)

    taken = [
        int(m["index"])
        for p in folder.iterdir()
        if (m := _SHARD_FILE.match(p.name)) and (m["group"] or BASE) == group
    ]
    next_index = max(taken, default=-1) + 1
    prefix = "" if group == BASE else f"{group}."
    pending: dict[str, list[Tensor]] = {}
    pending_prompts: list[str] = []
    per_shard = shard_size
    written = 0
    last_commit = time.monotonic()

    def flush() -> None:
        nonlocal next_index, written, pending, pending_prompts
        if not pending_prompts:
            return
        name = _shard_name(group, next_index)
        stacked = {k: torch.cat(v).contiguous() for k, v in pending.items()}
        _write_shard(folder, name, stacked, pending_prompts, group)
        target.shards.append(_Shard(name, [prompt_key(p) for p in pending_prompts]))
        next_index += 1
        written += 1
        pending, pending_prompts = {}, []

    def commit() -> None:
        nonlocal last_commit
        current = _read_manifest(folder) or {}
        current[group] = target
        _write_manifest(folder, current)
        last_commit = time.monotonic()

    bar = tqdm(total=len(todo), desc=f"cache-text {group}", unit="prompt", disable=not progress)
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            with torch.no_grad():
                out = _as_tensors(encode(chunk))
            out = {f"{prefix}{k}": v.detach().cpu() for k, v in out.items()}
            for k, v in out.items():
                if v.shape[0] != len(chunk):
                    raise ValueError(f"text cache: {k} holds {v.shape[0]} rows for {len(chunk)} prompts")
            spec = {k: {"shape": list(v.shape[1:]), "dtype": _dtype_name(v.dtype)} for k, v in out.items()}
            if not target.tensors:
                target.tensors = spec
            elif spec != target.tensors:
                raise TextCacheError(
                    f"{folder}: group {group!r} holds tensors {target.tensors}, the encoder now returns "
                    f"{spec} (same identity); delete the folder and run `{COMMAND}`"
                )
            if per_shard is None:
                row_bytes = sum(v[:1].numel() * v.element_size() for v in out.values())
                per_shard = max(1, min(DEFAULT_SHARD_SIZE, SHARD_BYTES // max(1, row_bytes)))
            for i, p in enumerate(chunk):
                for k, v in out.items():
                    pending.setdefault(k, []).append(v[i : i + 1].clone())
                pending_prompts.append(p)
                if len(pending_prompts) >= per_shard:
                    flush()
                    if time.monotonic() - last_commit > commit_every_s:
                        commit()
            bar.update(len(chunk))
        flush()
    finally:
        bar.close()
    if written or rebuilt:  # a rebuilt group is committed even empty: its old shards go next
        commit()
    for name in replaced:
        (folder / name).unlink(missing_ok=True)
    return WriteReport(folder, group, target.hash, len(todo), present, target.count, written, rebuilt)


def write_text_cache(
    adapter: Any,
    prompts: Iterable[str],
    folder: str | os.PathLike,
    *,
    batch_size: int = 64,
    shard_size: int | None = None,
    progress: bool = True,
) -> WriteReport:
    """Encode ``prompts`` (and the empty prompt, always) with ``adapter.encode_text`` and add the ones
    the cache lacks to ``folder``, keyed by ``adapter.text_identity()``. A cache written by other
    text encoders is replaced."""
    return write_tensor_group(
        folder,
        BASE,
        adapter.text_identity(),
        adapter.encode_text,
        ["", *prompts],
        batch_size=batch_size,
        shard_size=shard_size,
        progress=progress,
    )


# ---------------------------------------------------------------------------------------------- read
