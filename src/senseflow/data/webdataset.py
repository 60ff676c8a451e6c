"""Tar shards as img2dataset writes them, read in place: ``<key>.jpg|png|webp`` + ``<key>.txt``.

At start-up every shard's tar headers are read once (stdlib ``tarfile``; nothing is extracted) and
each sample's image and caption are recorded as (shard, byte offset, size); a sample is then two
seeks and reads. Members that are neither image nor caption (img2dataset's ``.json``) are ignored.
A sample's id is its shard's path relative to the shards' common folder, then its key
(``laion/00000.tar/000001``). Keys that have no image member are left out with one warning per
shard: among them, files with a dot in their key (``x.y.png`` is key ``x``, member ``y.png``, as
webdataset's convention takes the key up to the first dot of the file name).
``data.path`` is a tar file, a folder of tar files, or a brace pattern such as
``shards/{00000..00009}.tar`` (ranges keep their zero padding; ``{a,b}`` lists work too).
"""

from __future__ import annotations

import os
import re
import tarfile
import warnings
from pathlib import Path

import numpy as np

from senseflow.data.images import IMAGE_EXTENSIONS
from senseflow.data.index import DataWarning, SampleIndex, digest, listing

_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``a/{00..02}.tar`` -> ``a/00.tar, a/01.tar, a/02.tar``; ``{x,y}`` -> both; nested left to right."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    ends = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if ends:
        first, last = ends.groups()
        width = len(first) if first.startswith("0") or len(first) == len(last) else 0
        step = 1 if int(last) >= int(first) else -1
        choices = [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
    else:
        choices = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [out for choice in choices for out in expand_braces(head + choice + tail)]


def shard_paths(path: str | None) -> list[Path]:
    if not path:
        raise ValueError("data.path: required for data kind 'webdataset'")
    if _BRACE.search(path):
        expanded = [Path(p).expanduser() for p in expand_braces(path)]
        found = [p for p in expanded if p.is_file()]
        if not found:
            raise FileNotFoundError(
                f"data.path: the pattern {path} matches no file ({len(expanded)} names tried)"
            )
        missing = [str(p) for p in expanded if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"data.path: {len(missing)} of the {len(expanded)} shards of {path} do not exist: "
                f"{listing(missing)}"
            )
        return found
    root = Path(path).expanduser()
    if root.is_dir():
        shards = sorted(root.glob("*.tar"))
        if not shards:
            raise FileNotFoundError(f"data.path: {root} holds no .tar shard (data kind 'webdataset')")
        return shards
    if not root.is_file():
        raise FileNotFoundError(f"data.path: {root} does not exist (data kind 'webdataset')")
    return [root]


def _split(name: str) -> tuple[str, str]:
    """webdataset's convention: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def shard_names(shards: list[Path]) -> list[str]:
    """Each shard's path relative to the shards' common folder (``laion/00000.tar``,
    ``coyo/00000.tar``): the first part of its samples' ids, so two shards of the same file name in
    different folders give different ids, and moving the dataset keeps them."""
    absolute = [Path(os.path.abspath(s)) for s in shards]
    root = Path(os.path.commonpath([str(s.parent) for s in absolute]))
    return [s.relative_to(root).as_posix() for s in absolute]


def _unpaired(keys: dict[str, dict[str, tarfile.TarInfo]]) -> str:
    """What a shard's keys without an image member are, with an example of each kind."""
    dotted = {k: None for k, parts in keys.items() if any(_dotted_image(e) for e in parts)}
    others = [k for k in keys if k not in dotted]
    lines = []
    if dotted:
        key = next(iter(dotted))
        member = next(keys[key][e].name for e in keys[key] if _dotted_image(e))
        ext = next(e for e in keys[key] if _dotted_image(e))
        folder, slash, base = member.rpartition("/")
        renamed = folder + slash + base.replace(".", "_", base.count(".") - 1)
        lines.append(
            f"{len(dotted)} with a dot in the key, e.g. {member} (webdataset's convention makes the key "
            f"the name up to its first dot: key '{key}', member '{ext}'; rename such files, e.g. {renamed})"
        )
    if others:
        key = others[0]
        members = ", ".join(info.name for info in keys[key].values())
        lines.append(f"{len(others)} other(s), e.g. key '{key}' (members: {members})")
    return (
        f"{len(keys)} sample key(s) have no image member ({', '.join(IMAGE_EXTENSIONS)}) and are left "
        f"out: {'; '.join(lines)}"
    )


def _dotted_image(ext: str) -> bool:
    return "." in ext and ext.rpartition(".")[2] in IMAGE_EXTENSIONS


class TarIndex(SampleIndex):
    kind = "webdataset"

    def __init__(self, path: str | None):
        self.shards = shard_paths(path)
        prefixes = shard_names(self.shards)
        names, ids, rows, uncaptioned = [], [], [], []
        for number, shard in enumerate(self.shards):
            members: dict[str, dict[str, tarfile.TarInfo]] = {}
            try:
                with tarfile.open(shard, mode="r:") as tar:
                    for info in tar:
                        if info.isfile():
                            key, ext = _split(info.name)
                            members.setdefault(key, {})[ext] = info
            except (tarfile.TarError, OSError) as exc:
                raise ValueError(f"data.path: {shard} is not a readable tar shard ({exc})") from None
            samples = 0
            imageless: dict[str, dict[str, tarfile.TarInfo]] = {}
            for key, parts in members.items():
                image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
                if image is None:
                    imageless[key] = parts
                    continue
                caption = parts.get("txt")
                if caption is None:
                    uncaptioned.append(f"{shard.name}:{image.name}")
                    continue
                ids.append(f"{prefixes[number]}/{key}")
                names.append(image.name)
                rows.append((number, image.offset_data, image.size, caption.offset_data, caption.size))
                samples += 1
            if samples == 0 and not uncaptioned:
                found = f"; {_unpaired(imageless)}" if imageless else ""
                raise ValueError(
                    f"data.path: the shard {shard} holds no sample (expected members <key>.jpg|png|webp "
                    f"with <key>.txt){found}"
                )
            if imageless:
                warnings.warn(f"data: {shard}: {_unpaired(imageless)}", DataWarning, stacklevel=2)
        if uncaptioned:
            raise ValueError(
                f"data.path: {len(uncaptioned)} image member(s) have no <key>.txt caption: "
                f"{listing(uncaptioned)}"
            )
        self.ids, self.members = ids, names
        self.rows = np.asarray(rows, dtype=np.int64).reshape(-1, 5)
        self.check_not_empty(path or "")
        self.check_unique_ids(path or "")

    def _bytes(self, shard: int, offset: int, size: int) -> bytes:
        with open(self.shards[shard], "rb") as f:
            f.seek(offset)
            return f.read(size)

    def prompt(self, i: int) -> str:
        shard, _, _, offset, size = (int(v) for v in self.rows[i])
        return self._bytes(shard, offset, size).decode("utf-8", errors="replace").strip()

    def read(self, i: int) -> bytes:
        shard, offset, size, _, _ = (int(v) for v in self.rows[i])
        return self._bytes(shard, offset, size)

    def where(self, i: int) -> str:
        return f"{self.shards[int(self.rows[i, 0])]}:{self.members[i]}"

    def fingerprint(self) -> str:
        sizes = self.rows[:, [2, 4]].tolist()
        return digest(f"{key}:{a}:{b}" for key, (a, b) in zip(self.ids, sizes, strict=True))
