"""Reading DCP checkpoints without running code from them.

torch.distributed.checkpoint stores two things as pickles: the folder's index (``dcp/.metadata``),
which its ``FileSystemReader`` reads with plain ``pickle.load``, and non-tensor values such as the
optimisers' hyperparameters, which its ``DefaultLoadPlanner`` reads with
``torch.load(weights_only=False)``. Either runs whatever code a crafted file names. A checkpoint is
often downloaded or shared, so senseflow reads both with restrictions:

- :class:`SafeFileSystemReader` unpickles the index with :class:`MetadataUnpickler`, which builds only
  the classes a DCP index is made of (found with ``pickletools`` on indices this torch writes: DCP's
  metadata dataclasses, ``torch.Size``, dtypes, layouts, paths) and refuses every other global;
- :class:`SafeLoadPlanner` reads non-tensor values with ``torch.load(weights_only=True)``.

Tensors themselves DCP already reads with ``weights_only=True``.
"""

from __future__ import annotations

import io
import pickle
from typing import IO, Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

#: DCP's index file in a checkpoint folder, and the per-rank variant DCP falls back to.
METADATA_FILE = ".metadata"

#: module -> names a DCP index may refer to. Constructing any of these from pickled arguments runs no
#: code of the file's choosing: they are dataclasses, an enum, containers and value types.
_ALLOWED_GLOBALS: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset(
        {
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),  # a torch.layout from its name
    "torch": frozenset({"Size"}),
    "collections": frozenset({"OrderedDict"}),
    # StorageMeta records the folder it was written to.
    "pathlib": frozenset({"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"}),
}
#: Values of these types found as ``torch.<name>`` are constants (torch.float32, torch.strided, ...).
_TORCH_CONSTANTS = (torch.dtype, torch.layout, torch.memory_format)


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler that builds only what a DCP index holds and refuses any other global."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_CONSTANTS):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"refusing {module}.{name}: a DCP checkpoint index holds no such object (a crafted file?)"
        )


def load_metadata(stream: IO[bytes]) -> Metadata:
    """A DCP index from an open file, built by :class:`MetadataUnpickler`."""
    metadata = MetadataUnpickler(stream).load()
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f"expected a DCP Metadata, found a {type(metadata).__name__}")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's file-system reader, reading the index with :func:`load_metadata` (the rest unchanged)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        # As the base class: the global index, or rank ``rank``'s own when DCP asks for it.
        rank = kwargs.get("rank")
        name = METADATA_FILE if rank is None else f"__{rank}{METADATA_FILE}"
        with self.fs.create_stream(self.fs.concat_path(self.path, name), "rb") as stream:
            metadata = load_metadata(stream)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, reading non-tensor values as plain data only."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        data = torch.load(value, weights_only=True)  # refuses anything but plain data
        # The base class places the value in the state dict (it unpickles without restriction, but
        # these bytes are written here, from the plain data just read).
        plain = io.BytesIO()
        torch.save(data, plain)
        plain.seek(0)
        super().load_bytes(read_item, plain)
