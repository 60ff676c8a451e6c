"""Image sources of ``senseflow eval``: what makes the images of one table row.

A source turns (prompts, seeds) into images in [-1, 1] and describes itself (``identity``) for the
image cache and the result record. Sources are registered by ``kind``; a teacher family adds its own
(e.g. a diffusers pipeline) with :func:`register_source`, without touching the evaluation loop.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from senseflow.errors import UsageError
from senseflow.eval.config import ModelEntry
from senseflow.inputs import existing_folder
from senseflow.metrics.image_io import list_images, load_rgb
from senseflow.metrics.weights import sha256_file
from senseflow.train.checkpoint import network_sha256
from senseflow.train.run_folder import run_folder

__all__ = ["ImageSource", "build_source", "register_source", "source_kinds"]


class ImageSource(ABC):
    """Makes the images of one model; ``identity()`` keys their cache and fills the record's ``model``."""

    #: False for sources that only read existing files (nothing to generate).
    generates = True

    def __init__(self, entry: ModelEntry):
        self.entry = entry

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """Fields that determine the images: checkpoint hash, sampler, steps, NFE, guidance, resolution."""

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        """Images in [-1, 1], NCHW, one per (prompt, seed)."""
        raise TypeError(f"model {self.entry.name!r} (kind {self.entry.kind!r}) does not generate images")

    def subset(self, name: str) -> ImageSource:
        """The source for another prompt list (T2I-CompBench category ``name``); generators reuse self."""
        return self

    def existing_image(self, index: int) -> np.ndarray:
        """The stored image of prompt ``index`` (sources that read files)."""
        raise TypeError(f"model {self.entry.name!r} (kind {self.entry.kind!r}) has no stored images")

    def check(self, count: int) -> None:
        """Before anything is written: the inputs of a source that reads files are all there (a source
        that generates its images has nothing to check)."""
        return None


_SOURCES: dict[str, Callable[[ModelEntry, str], ImageSource]] = {}


def register_source(kind: str, builder: Callable[[ModelEntry, str], ImageSource]) -> None:
    """Make ``kind`` usable in an eval recipe's ``reference``/``students`` entries."""
    _SOURCES[kind] = builder


def source_kinds() -> list[str]:
    return sorted(_SOURCES)


def build_source(entry: ModelEntry, device: str = "cpu") -> ImageSource:
    if entry.kind not in _SOURCES:
        raise ValueError(
            f"model {entry.name!r}: unknown kind {entry.kind!r}; known kinds: {', '.join(source_kinds())}"
        )
    return _SOURCES[entry.kind](entry, device)


def _sha256_of_files(paths: Sequence[Path]) -> str:
    """One digest over several files (their own sha256s in order)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(sha256_file(p).encode())
    return h.hexdigest()


class ToyTeacherSource(ImageSource):
    """The shapes world's teacher with its N-step Euler sampler and classifier-free guidance; steps and
    guidance default to its folder's recipe (the family-generic ``teacher`` kind needs them given)."""

    def __init__(self, entry: ModelEntry, device: str):
        super().__init__(entry)
        from senseflow.families.toy.pipeline import ToyTeacher

        if entry.checkpoint is not None or entry.sampler not in (None, "euler"):
            raise ValueError(
                f"model {entry.name!r}: a toy_teacher samples with 'euler' and has no checkpoint"
            )
        self.teacher = ToyTeacher(entry.path)
        self.steps = entry.steps or self.teacher.recipe.sampling.steps
        self.guidance = self.teacher.recipe.sampling.guidance if entry.guidance is None else entry.guidance

    def identity(self) -> dict[str, Any]:
        weights = sorted((self.teacher.folder / "transformer").glob("*.safetensors"))
        return {
            "kind": "toy_teacher",
            "checkpoint_sha256": _sha256_of_files(weights),
            "sampler": "euler",
            "steps": self.steps,
            "nfe": self.steps * (1 if self.guidance == 1.0 else 2),
            "guidance": self.guidance,
            "resolution": list(self.teacher.image_shape[1:]),
        }

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        return self.teacher.sample(
            list(prompts), list(seeds), steps=self.steps, guidance=self.guidance, batch_size=len(prompts)
        )


class TeacherSource(ImageSource):
    """Any family's teacher, named by a distillation recipe (its ``model`` section: family, folder,
    anchors), sampled with its own N-step sampler and guidance through the family's adapter: the same
    :func:`~senseflow.models.sampling.teacher_sample` that reports and training use."""

    def __init__(self, entry: ModelEntry, device: str):
        super().__init__(entry)
        from senseflow.config import load_config
        from senseflow.devices import resolve_device, to_dtype
        from senseflow.models import build_adapter
        from senseflow.models.build import build_roles

        if not entry.path or entry.steps is None or entry.guidance is None:
            raise ValueError(
                f"model {entry.name!r}: kind 'teacher' needs 'path' (a distillation recipe, e.g. "
                "toy/distill or sd35_large), 'steps' and 'guidance'"
            )
        if entry.checkpoint is not None or entry.sampler not in (None, "teacher"):
            raise ValueError(
                f"model {entry.name!r}: a teacher samples with its own sampler and has no checkpoint"
            )
        self.cfg = load_config(entry.path)
        self.device = resolve_device(device, field=f"model {entry.name!r}: device")
        self.adapter = build_adapter(self.cfg, text_cache=False).to(self.device)  # any prompt, live
        dtype = to_dtype(self.cfg.precision.teacher_dtype, "precision.teacher_dtype")
        self.net = build_roles(self.adapter, ("teacher",), dtype, dtype, self.device)["teacher"]

    def identity(self) -> dict[str, Any]:
        resolution = self.cfg.data.resolution
        return {
            "kind": "teacher",
            "family": self.cfg.model.family,
            "cfg_convention": self.cfg.model.cfg_convention,
            "guidance_kind": self.cfg.method.dmd.guidance_kind,
            "teacher_dtype": self.cfg.precision.teacher_dtype,
            "checkpoint_sha256": _sha256_of_files(self.adapter.weight_files()),
            "sampler": "teacher",
            "steps": self.entry.steps,
            # CFG doubles the passes; a guidance embedding (FLUX) does not
            "nfe": self.entry.steps
            * (2 if self.adapter.guidance_kind == "cfg" and self.entry.guidance != 1 else 1),
            "guidance": self.entry.guidance,
            "resolution": [resolution, resolution],
        }

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        from senseflow.models.sampling import teacher_sample

        images = teacher_sample(
            self.adapter,
            self.net,
            list(prompts),
            list(seeds),
            self.entry.steps,
            self.entry.guidance,
            self.cfg.data.resolution,
            batch_size=len(prompts),
        )
        return images.cpu()


class StudentSource(ImageSource):
    """A senseflow run's generator with its few-step sampler (any teacher family)."""

    def __init__(self, entry: ModelEntry, device: str):
        super().__init__(entry)
        from senseflow.student import Student, is_export

        if not entry.path:
            raise ValueError(
                f"model {entry.name!r}: 'path' (a run folder or an exported diffusers folder) is required "
                "for kind 'student'"
            )
        run_folder(entry.path, f"path of model {entry.name!r}")
        if entry.steps is not None or entry.guidance is not None:
            raise ValueError(
                f"model {entry.name!r}: a student samples at its recipe's anchors without guidance; "
                "remove 'steps'/'guidance'"
            )
        self.export: dict[str, Any] | None = None
        if is_export(entry.path):  # `senseflow export --format diffusers`: its weights and its sampler
            if entry.checkpoint:
                raise ValueError(
                    f"model {entry.name!r}: an exported folder has no checkpoints; remove 'checkpoint'"
                )
            self.student = Student.from_export(entry.path, device=device)
            self.export = self.student.export_meta
        else:
            self.student = Student.from_run(entry.path, entry.checkpoint, device=device)
        self.sampler = entry.sampler or self.student.default_sampler
        if self.sampler not in ("renoise", "euler"):
            raise ValueError(
                f"model {entry.name!r}: sampler must be 'renoise' or 'euler', got {self.sampler!r}"
            )

    def identity(self) -> dict[str, Any]:
        nfe = len(self.student.anchor_levels)
        resolution = self.student.cfg.data.resolution
        if self.export is not None:  # the trained weights it came from, and the dtype it was written in
            source = {
                "checkpoint": str(self.student.source),
                "checkpoint_sha256": self.export.get("generator_sha256"),
                "export_dtype": self.export.get("dtype"),
            }
        else:
            source = {
                "checkpoint": str(self.student.checkpoint),
                "checkpoint_sha256": network_sha256(self.student.checkpoint, "generator"),
            }
        return {
            "kind": "student",
            **source,
            "sampler": self.sampler,
            "steps": nfe,
            "nfe": nfe,
            "guidance": None,
            "resolution": [resolution, resolution],
        }

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        return self.student.sample(list(prompts), list(seeds), mode=self.sampler, batch_size=len(prompts))


class FolderSource(ImageSource):
    """Images made elsewhere (e.g. by the user's own pipeline): ``<folder>/<index>.png`` in prompt order,
    with the index zero-padded to five digits (``00000.png``) as senseflow writes them; T2I-CompBench
    images in ``<folder>/compbench/<category>/`` by image index (``line * images_per_prompt + k``)."""

    generates = False

    def __init__(self, entry: ModelEntry, device: str):
        super().__init__(entry)
        if not entry.path:
            raise ValueError(f"model {entry.name!r}: kind 'folder' needs 'path', an existing image folder")
        self.folder = existing_folder(entry.path, f"path of model {entry.name!r}")

    def subset(self, name: str) -> ImageSource:
        """T2I-CompBench category ``name`` is read from ``<folder>/compbench/<name>/`` (same naming)."""
        entry = self.entry.model_copy(update={"path": str(self.folder / "compbench" / name)})
        return FolderSource(entry, "cpu")

    def file(self, index: int) -> Path:
        return self.folder / f"{index:05d}.png"

    def identity(self) -> dict[str, Any]:
        files = list_images(self.folder, recursive=False)
        listing = hashlib.sha256("\n".join(f"{p.name}:{p.stat().st_size}" for p in files).encode())
        first = load_rgb(files[0]) if files else None
        return {
            "kind": "folder",
            "folder": str(self.folder.resolve()),
            "listing_sha256": listing.hexdigest(),
            "checkpoint_sha256": None,
            "sampler": self.entry.sampler,
            "steps": self.entry.steps,
            "nfe": self.entry.steps,
            "guidance": self.entry.guidance,
            "resolution": list(first.shape[:2]) if first is not None else None,
        }

    def check(self, count: int) -> None:
        """``00000.png`` .. of the ``count`` prompts are there and are images (their headers are read)."""
        where = f"model {self.entry.name!r}"
        for index in range(count):
            path = self.file(index)
            if not path.is_file():
                raise UsageError(
                    f"missing image ({where} {path}, prompt {index}): the folder needs one image per prompt, "
                    f"named by its index: {self.file(0).name} for the first, {self.file(count - 1).name} for "
                    "the last"
                )
            try:
                with Image.open(path) as image:
                    image.size  # noqa: B018 - the header is read and checked
            except (OSError, ValueError) as exc:
                raise UsageError(
                    f"not an image ({where} {path}, prompt {index}): {exc}; replace it with the image of "
                    "that prompt"
                ) from None

    def existing_image(self, index: int) -> np.ndarray:
        path = self.file(index)
        if not path.is_file():
            raise FileNotFoundError(f"model {self.entry.name!r}: missing image {path} (prompt {index})")
        return load_rgb(path)


register_source("toy_teacher", ToyTeacherSource)
register_source("teacher", TeacherSource)
register_source("student", StudentSource)
register_source("folder", FolderSource)
