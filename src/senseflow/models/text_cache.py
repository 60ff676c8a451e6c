"""The offline text cache: prompt encodings written once by ``senseflow cache-text``, read by training.

A cache is one folder::

    manifest.json                 format, identity, tensor specs, the shards and their prompt hashes
    shard-00000.safetensors       the encodings of up to ``shard_size`` prompts, stacked per name
    shard-00001.safetensors
    <group>-shard-00000.safetensors   tensors another producer added under its group's name

**Key.** The *identity* is the adapter's ``text_identity()`` (a JSON-able dict of what decides the
encodings besides the prompt: text-encoder weights, tokenizers, max lengths), hashed to the cache's
id; a prompt is keyed by a hash of its exact text (no normalisation). A reader whose adapter has
another identity gets one error naming the differing fields, never encodings of other encoders.

**Groups.** The adapter's ``encode_text`` tensors form the base group. Another producer (say a
discriminator's CLIP text embedding) adds a *group* of tensors, named ``<group>.<name>``, with its
own identity and its own shards, for prompts already in the cache or new ones; it rewrites the
manifest only, never the base group's shards.

**Atomicity.** Shards are written under temporary names, fsynced and renamed; the manifest is
written last, the same way. Files the manifest does not name are leftovers of an interrupted write
and are ignored (the next write removes them), so a crash leaves the previous cache readable.
Appending prompts writes new shards only. One writer at a time; any number of readers.

**Reading** is lazy: ``lookup`` opens the shards it needs with ``safe_open`` (a few handles kept in
an LRU) and reads only the rows of the requested prompts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from senseflow.models.batch import Conditioning
from senseflow.models.hub import file_sha256

FORMAT = 1
KIND = "senseflow-text-cache"
MANIFEST = "manifest.json"
BASE = "text"  # the group of the adapter's encode_text tensors
DEFAULT_SHARD_SIZE = 4096  # prompts per shard at most
SHARD_BYTES = 1 << 30  # and about this many bytes at most (long T5 encodings are MBs per prompt)
COMMAND = "senseflow cache-text RECIPE"
_GROUP_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_SHARD_FILE = re.compile(r"^(?:(?P<group>[a-z][a-z0-9_]*)-)?shard-(?P<index>\d{5,})\.safetensors$")


class TextCacheError(ValueError):
    """A text cache that cannot serve the run (missing, stale, or without a prompt)."""


class StaleTextCacheError(TextCacheError):
    """The cache was written by other text encoders (its identity differs from the adapter's)."""


class PromptNotCachedError(TextCacheError):
    """A prompt the run asked for is not in the cache."""


# ---------------------------------------------------------------------------------------- identities


def identity_hash(identity: Mapping[str, Any]) -> str:
    """The cache id of an identity: sha256 of its canonical JSON, 16 hex digits."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def prompt_key(prompt: str) -> str:
    """The key of one prompt: sha256 of its exact UTF-8 text, 32 hex digits."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:32]


def files_identity(root: str | os.PathLike, parts: Iterable[str]) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root / part`` for each part (a file or a folder,
    recursively, hidden files skipped): the usual body of a family's ``text_identity``."""
    root = Path(root)
    out: dict[str, str] = {}
    for part in parts:
        base = root / part
        if base.is_file():
            files = [base]
        elif base.is_dir():
            files = sorted(p for p in base.rglob("*") if p.is_file() and not p.name.startswith("."))
        else:
            raise FileNotFoundError(f"text identity: {base} does not exist")
        for p in files:
            out[p.relative_to(root).as_posix()] = file_sha256(p)
    return out


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix or "(identity)": value}


def _short(value: Any, n: int = 24) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= n else text[: n - 1] + "…"


def describe_difference(cached: Mapping[str, Any], current: Mapping[str, Any], limit: int = 6) -> str:
    """The fields where two identities differ, one ``key: cache X, now Y`` per line."""
    a, b = _flatten(cached), _flatten(current)
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, None) != b.get(key, None) or (key in a) != (key in b):
            was = _short(a[key]) if key in a else "(absent)"
            now = _short(b[key]) if key in b else "(absent)"
            lines.append(f"  {key}: cache {was}, now {now}")
    if len(lines) > limit:
        lines = [*lines[:limit], f"  ... and {len(lines) - limit} more"]
    return "\n".join(lines)


def _quote(prompt: str, n: int = 80) -> str:
    return repr(prompt if len(prompt) <= n else prompt[: n - 1] + "…")


# ------------------------------------------------------------------------------------------ manifest


@dataclass
class _Shard:
    file: str
    keys: list[str]


@dataclass
class _Group:
    """One producer's tensors: identity, per-prompt tensor specs and the shards holding them."""

    name: str
    identity: dict[str, Any]
    tensors: dict[str, dict[str, Any]]  # name -> {"shape": [...] (batch dim removed), "dtype": "float32"}
    shards: list[_Shard] = field(default_factory=list)

    @property
    def hash(self) -> str:
        return identity_hash(self.identity)

    @property
    def count(self) -> int:
        return sum(len(s.keys) for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        return {
            "identity": self.identity,
            "identity_hash": self.hash,
            "tensors": self.tensors,
            "count": self.count,
            "shards": [{"file": s.file, "count": len(s.keys), "prompts": s.keys} for s in self.shards],
        }

    @classmethod
    def from_json(cls, name: str, data: Mapping[str, Any]) -> _Group:
        shards = [_Shard(s["file"], list(s["prompts"])) for s in data["shards"]]
        return cls(name, dict(data["identity"]), dict(data["tensors"]), shards)


def _read_manifest(folder: Path) -> dict[str, _Group] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("kind") != KIND or data.get("format") != FORMAT:
        raise TextCacheError(
            f"{path}: not a text cache of format {FORMAT} (kind {data.get('kind')!r}, format "
            f"{data.get('format')!r}); delete the folder and run `{COMMAND}`"
        )
    groups = {BASE: _Group.from_json(BASE, data)}
    for name, g in data.get("groups", {}).items():
        groups[name] = _Group.from_json(name, g)
    return groups


def _manifest_json(groups: Mapping[str, _Group]) -> dict[str, Any]:
    base = groups[BASE]
    return {
        "kind": KIND,
        "format": FORMAT,
        **base.to_json(),
        "groups": {n: g.to_json() for n, g in sorted(groups.items()) if n != BASE},
    }


class TextCache:
    """A written cache, read lazily; ``lookup(prompts)`` is what ``FamilyAdapter.encode_prompts`` calls."""

    max_open = 8  # shard handles kept open

    def __init__(self, folder: str | os.PathLike, groups: Mapping[str, _Group]):
        self.folder = Path(folder)
        self._groups = dict(groups)
        self._index = {
            name: {k: (i, row) for i, s in enumerate(g.shards) for row, k in enumerate(s.keys)}
            for name, g in self._groups.items()
        }
        self._handles: OrderedDict[str, Any] = OrderedDict()
        self.device = torch.device("cpu")

    @classmethod
    def open(
        cls, folder: str | os.PathLike, adapter: Any = None, identity: Mapping[str, Any] | None = None
    ) -> TextCache:
        """The cache at ``folder``, checked against ``adapter.text_identity()`` (or ``identity``)."""
        folder = Path(folder).expanduser().absolute()
        groups = _read_manifest(folder)
        if groups is None:
            raise FileNotFoundError(
                f"no text cache at {folder} ({MANIFEST} missing): run `{COMMAND}` to write it, or set "
                "model.text_cache=live"
            )
        cache = cls(folder, groups)
        if identity is None and adapter is not None:
            identity = adapter.text_identity()
        if identity is not None:
            cache.check_identity(BASE, identity)
        return cache

    # -------------------------------------------------------------- description

    @property
    def identity(self) -> dict[str, Any]:
        return self._groups[BASE].identity

    @property
    def identity_hash(self) -> str:
        return self._groups[BASE].hash

    @property
    def groups(self) -> list[str]:
        return list(self._groups)

    def tensor_specs(self, group: str = BASE) -> dict[str, dict[str, Any]]:
        return dict(self._group(group).tensors)

    def __len__(self) -> int:
        return self._groups[BASE].count

    def __contains__(self, prompt: object) -> bool:
        return isinstance(prompt, str) and prompt_key(prompt) in self._index[BASE]

    def missing(self, prompts: Iterable[str], group: str = BASE) -> list[str]:
        """The distinct prompts of ``prompts`` the group lacks, in order."""
        index = self._index[self._group(group).name]
        out: list[str] = []
        for p in dict.fromkeys(prompts):
            if prompt_key(p) not in index:
                out.append(p)
        return out

    def prompts(self, group: str = BASE) -> list[str]:
        """Every cached prompt of ``group`` (read from the shards' metadata)."""
        out: list[str] = []
        for s in self._group(group).shards:
            out.extend(json.loads(self._handle(s.file).metadata()["prompts"]))
        return out

    def check_identity(self, group: str, identity: Mapping[str, Any]) -> None:
        """Raise :class:`StaleTextCacheError` unless ``group`` was written with ``identity``."""
        g = self._group(group)
        identity = json.loads(json.dumps(dict(identity), default=str))
        if g.identity != identity:
            what = "text encoders" if group == BASE else f"the producer of group {group!r}"
            raise StaleTextCacheError(
                f"the text cache at {self.folder} was written by other {what} (cache id {g.hash}, "
                f"now {identity_hash(identity)}):\n{describe_difference(g.identity, identity)}\n"
                f"run `{COMMAND}` (with the run's overrides) to rebuild it, or set model.text_cache=live"
            )

    # -------------------------------------------------------------- reading

    def to(self, device: torch.device | str) -> TextCache:
        """Where ``lookup`` puts its tensors (the adapter's device)."""
        self.device = torch.device(device)
        return self

    def lookup(self, prompts: Sequence[str], groups: Sequence[str] = ()) -> Conditioning:
        """The cached encodings of ``prompts``, stacked in their order (duplicates allowed), on
        ``self.device``: the base group's tensors plus those of ``groups``."""
        prompts = list(prompts)
        tensors: dict[str, Tensor] = {}
        for name in (BASE, *groups):
            tensors.update(self._lookup_group(self._group(name), prompts))
        return Conditioning(tensors)

    def lookup_group(self, group: str, prompts: Sequence[str]) -> Conditioning:
        """Only ``group``'s tensors (named ``<group>.<name>``) for ``prompts``."""
        return Conditioning(self._lookup_group(self._group(group), list(prompts)))

    def _group(self, name: str) -> _Group:
        if name not in self._groups:
            raise TextCacheError(
                f"the text cache at {self.folder} has no group {name!r} (groups: {', '.join(self._groups)})"
            )
        return self._groups[name]

    def _handle(self, file: str) -> Any:
        handle = self._handles.get(file)
        if handle is None:
            handle = safe_open(str(self.folder / file), framework="pt", device="cpu")
            self._handles[file] = handle
            while len(self._handles) > self.max_open:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(file)
        return handle

    def _lookup_group(self, g: _Group, prompts: list[str]) -> dict[str, Tensor]:
        index = self._index[g.name]
        keys = [prompt_key(p) for p in prompts]
        missing = [p for p, k in zip(prompts, keys, strict=True) if k not in index]
        if missing:
            distinct = list(dict.fromkeys(missing))
            more = f" (and {len(distinct) - 1} more)" if len(distinct) > 1 else ""
            where = "" if g.name == BASE else f" (group {g.name!r})"
            raise PromptNotCachedError(
                f"prompt not in the text cache at {self.folder}{where}: {_quote(distinct[0])}{more}; add it "
                f"with `{COMMAND} --prompts FILE` (one prompt per line), or set model.text_cache=live"
            )
        unique = list(dict.fromkeys(keys))
        position = {k: i for i, k in enumerate(unique)}
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for k in unique:
            shard, row = index[k]
            by_shard.setdefault(shard, []).append((row, position[k]))
        out = {
            name: torch.empty((len(unique), *spec["shape"]), dtype=getattr(torch, spec["dtype"]))
            for name, spec in g.tensors.items()
        }
        for shard, rows in by_shard.items():
            handle = self._handle(g.shards[shard].file)
            for name, dest in out.items():
                sl = handle.get_slice(name)
                for row, pos in rows:
                    dest[pos] = sl[row : row + 1][0]
        gather = torch.tensor([position[k] for k in keys], dtype=torch.long)
        return {name: t[gather].to(self.device) for name, t in out.items()}
