"""Disk full, read-only folders, permission denied: a failed checkpoint write is one clear error, the
half-written folder is removed and the previous checkpoint stays the newest valid one."""

from __future__ import annotations

import errno
import os
import pathlib

import pytest
import torch

from senseflow.errors import CheckpointWriteError
from senseflow.train import checkpoint as ckpt
from senseflow.train import checkpoint_commit
from tests.checkpoint_helpers import save_dcp, save_whole, small_net

# ----------------------------------------------------------------------------------- write failures


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _failing_write_text(name):
    real = pathlib.Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == name:
            _no_space()
        return real(self, *args, **kwargs)

    return write_text


WRITE_POINTS = {
    "network": ("generator.safetensors", lambda mp: mp.setattr(ckpt, "save_file", _no_space)),
    "state": (ckpt.STATE, lambda mp: mp.setattr(torch, "save", _no_space)),
    "config": (
        ckpt.CONFIG,
        lambda mp: mp.setattr(pathlib.Path, "write_text", _failing_write_text(ckpt.CONFIG)),
    ),
    "meta": (ckpt.META, lambda mp: mp.setattr(pathlib.Path, "write_text", _failing_write_text(ckpt.META))),
    "manifest": (
        ckpt.MANIFEST,
        lambda mp: mp.setattr(pathlib.Path, "write_text", _failing_write_text(ckpt.MANIFEST)),
    ),
}


@pytest.mark.parametrize("point", list(WRITE_POINTS))
def test_a_full_disk_leaves_the_previous_checkpoint_newest(tmp_path, monkeypatch, point):
    first = save_whole(tmp_path, 1, seed=0)
    file, break_it = WRITE_POINTS[point]
    break_it(monkeypatch)
    with pytest.raises(CheckpointWriteError) as caught:
        save_whole(tmp_path, 2, seed=1)
    monkeypatch.undo()
    assert str(caught.value) == (
        f"cannot write checkpoint step-00000002 in {tmp_path}: No space left on device ({file}); "
        f"the newest valid checkpoint is still {first}"
    )
    assert isinstance(caught.value, OSError) and caught.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]
    assert ckpt.latest_checkpoint(tmp_path) == first
    ckpt.load_checkpoint(first, {"generator": small_net(3)})


def test_a_failed_first_save_says_there_is_none(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", _no_space)
    with pytest.raises(
        CheckpointWriteError, match=r"\(state\.pt\); the newest valid checkpoint is still none$"
    ):
        save_whole(tmp_path, 1)
    assert list(tmp_path.iterdir()) == []


def test_safetensors_io_errors_are_os_errors(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(CheckpointWriteError, match=r"No space left on device \(generator\.safetensors\)"):
        save_whole(tmp_path, 1)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_resave_of_the_same_step_keeps_the_old_one(tmp_path, monkeypatch):
    save_whole(tmp_path, 5, seed=0)
    real_rename = pathlib.Path.rename

    def rename(self, target):
        if self.name.endswith(ckpt.TMP_SUFFIX):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_rename(self, target)

    monkeypatch.setattr(pathlib.Path, "rename", rename)
    with pytest.raises(CheckpointWriteError, match=r"Read-only file system.*still .*step-00000005$"):
        save_whole(tmp_path, 5, seed=1)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000005"]
    net = small_net(7)
    ckpt.load_checkpoint(tmp_path / "step-00000005", {"generator": net})
    torch.testing.assert_close(net[0].weight, small_net(0)[0].weight, rtol=0, atol=0)


def test_a_read_only_checkpoint_folder(tmp_path, monkeypatch):
    first = save_whole(tmp_path, 1)
    if os.geteuid() == 0:  # chmod does not stop root: fail the way a read-only folder makes mkdir fail
        real_mkdir = pathlib.Path.mkdir

        def mkdir(self, *args, **kwargs):
            if self.parent == tmp_path:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    else:
        tmp_path.chmod(0o555)
    try:
        with pytest.raises(
            CheckpointWriteError, match=rf"Permission denied \(.*step-00000002\.partial\).*{first}$"
        ):
            save_whole(tmp_path, 2)
    finally:
        tmp_path.chmod(0o755)
    assert ckpt.latest_checkpoint(tmp_path) == first


@pytest.mark.parametrize("point", ["shards", "state"])
def test_a_failed_dcp_save_leaves_the_previous_checkpoint_newest(tmp_path, monkeypatch, point):
    from torch.distributed.checkpoint.filesystem import FileSystem

    first = save_dcp(tmp_path, 1)
    if point == "shards":  # raised inside DCP's writer, which wraps it in a CheckpointException
        monkeypatch.setattr(FileSystem, "create_stream", _no_space)
    else:
        monkeypatch.setattr(torch, "save", _no_space)
    with pytest.raises(CheckpointWriteError, match=rf"No space left on device .*still {first}$"):
        save_dcp(tmp_path, 2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]


def test_write_failure_messages_name_files_inside_the_checkpoint(tmp_path):
    tmp = tmp_path / "step-00000007.partial"
    error = checkpoint_commit.write_failure(tmp, OSError(errno.EACCES, "Permission denied"), tmp / "dcp")
    assert str(error) == (
        f"cannot write checkpoint step-00000007 in {tmp_path}: Permission denied (dcp); "
        "the newest valid checkpoint is still none"
    )
