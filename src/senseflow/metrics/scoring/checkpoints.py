"""Checkpoint files: load errors and reports, state-dict reading, key renaming, weight hashes.

:func:`load_state_dict_file` reads ``.safetensors`` or torch checkpoints (plain or
``{'state_dict': ...}``) with ``weights_only=True`` unless told otherwise; :func:`apply_key_rules`
renames/transforms a source state dict and :func:`load_converted` loads the result, raising
:class:`MissingWeightsError` naming every missing key; :func:`sha256_weights` hashes a weights file
or the weights a ``from_pretrained`` folder loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from senseflow.metrics.weights import sha256_file

logger = logging.getLogger(__name__)

PathType = str | PathLike

WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


# --------------------------------------------------------------------------------------------------
# errors and load reports
# --------------------------------------------------------------------------------------------------


class ScorerLoadError(RuntimeError):
    """A scorer's weights, config or tokenizer could not be loaded."""


class MissingWeightsError(ScorerLoadError):
    """A checkpoint lacks parameters the model needs; the message lists every missing key."""

    def __init__(self, source: str, missing: Sequence[str], unexpected: Sequence[str] = ()) -> None:
        self.source = source
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        lines = [f"{source}: {len(self.missing)} missing key(s): {', '.join(self.missing)}"]
        if self.unexpected:
            lines.append(f"unexpected key(s) also present: {', '.join(self.unexpected)}")
        super().__init__("\n".join(lines))


@dataclass
class LoadReport:
    """What happened when a checkpoint was mapped onto a model (source-side key names)."""

    source: str
    source_format: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def check(self) -> LoadReport:
        """Log unexpected keys; raise on missing or shape-mismatched ones."""
        if self.unexpected:
            logger.warning(
                "%s: %d unexpected key(s) not used by the model: %s",
                self.source,
                len(self.unexpected),
                ", ".join(self.unexpected),
            )
        if self.ignored:
            logger.info("%s: ignored non-parameter key(s): %s", self.source, ", ".join(self.ignored))
        if self.mismatched:
            raise ScorerLoadError(f"{self.source}: shape mismatch for key(s): {', '.join(self.mismatched)}")
        if self.missing:
            raise MissingWeightsError(self.source, self.missing, self.unexpected)
        return self


# --------------------------------------------------------------------------------------------------
# weight hashes
# --------------------------------------------------------------------------------------------------


# What transformers' from_pretrained reads from a folder, in its order of preference.
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_HF_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _folder_weight_files(path: Path) -> list[Path]:
    for name in _HF_WEIGHT_FILES:
        if (path / name).is_file():
            return [path / name]
    for name in _HF_WEIGHT_INDEXES:
        if (path / name).is_file():
            shards = set(json.loads((path / name).read_text())["weight_map"].values())
            return sorted(path / shard for shard in shards)
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_FILE_SUFFIXES)


def sha256_weights(path: PathType) -> str:
    """sha256 of a weights file, or of the weights a ``from_pretrained`` folder loads.

    In a folder: ``model.safetensors``, else ``pytorch_model.bin``, else the shards of an index,
    else every weights file. One file gets its own hash (so it matches a manifest entry for the
    file); several get the sha256 of the sorted ``"<relative name>  <sha256>\\n"`` lines.
    """
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    files = _folder_weight_files(path)
    if not files:
        raise ScorerLoadError(f"no weights file ({', '.join(WEIGHT_FILE_SUFFIXES)}) under {path}")
    if len(files) == 1:
        return sha256_file(files[0])
    lines = "".join(f"{p.relative_to(path).as_posix()}  {sha256_file(p)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# state dicts
# --------------------------------------------------------------------------------------------------


def load_state_dict_file(path: PathType) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` dict from ``.safetensors`` or a torch checkpoint.

    Torch checkpoints may be plain state dicts or ``{'state_dict': {...}}`` (other top-level entries
    are dropped). A common ``module.`` prefix (DDP) is stripped. ``torch.load`` runs with
    ``weights_only=True`` always: a pickle that names code is refused, never run.
    """
    path = Path(path)
    if not path.is_file():
        raise ScorerLoadError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(path))
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ScorerLoadError(
                f"{path}: refused, it is not a plain tensor file (torch.load with weights_only=True: "
                f"{str(err).splitlines()[0]}); if it comes from a trusted source, convert it once to "
                "safetensors (a state dict saved with safetensors.torch.save_file) and point to that"
            ) from err
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ScorerLoadError(f"{path}: expected a state dict, got {type(obj).__name__}")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    dropped = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if dropped:
        logger.info("%s: dropped non-tensor entries: %s", path, ", ".join(dropped))
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class KeyRule:
    """``target[dst] = transform(source[src])``."""

    src: str
    dst: str
    transform: Transform | None = None


def apply_key_rules(
    state: Mapping[str, torch.Tensor],
    rules: Iterable[KeyRule],
    *,
    source: str,
    source_format: str,
    ignorable: Callable[[str], bool] = lambda key: False,
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Rename/transform a source state dict; report missing source keys (source-side names)."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for rule in rules:
        if rule.src not in state:
            if rule.src not in missing:
                missing.append(rule.src)
            continue
        used.add(rule.src)
        tensor = state[rule.src]
        out[rule.dst] = rule.transform(tensor) if rule.transform else tensor
    leftover = [k for k in state if k not in used]
    report = LoadReport(
        source=source,
        source_format=source_format,
        missing=missing,
        unexpected=[k for k in leftover if not ignorable(k)],
        ignored=[k for k in leftover if ignorable(k)],
    )
    return out, report


def load_converted(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], report: LoadReport
) -> LoadReport:
    """Load an already-renamed state dict; fail on missing/mismatched keys (in report terms)."""
    expected = model.state_dict()
    for key, tensor in state.items():
        if key in expected and tuple(expected[key].shape) != tuple(tensor.shape):
            report.mismatched.append(f"{key} {tuple(tensor.shape)} vs {tuple(expected[key].shape)}")
    if not report.mismatched and not report.missing:
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys:  # a conversion rule set that does not cover the model: a bug
            report.missing.extend(f"<target> {k}" for k in result.missing_keys)
    return report.check()
