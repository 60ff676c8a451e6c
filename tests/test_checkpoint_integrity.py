"""Damaged, half-deleted, unwritable and crafted checkpoints: each is refused with one clear error,
never taken for a good one, never left behind half-written, and never runs code when loaded."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shlex
import shutil

import pytest
import torch
from torch import nn

from senseflow.errors import CheckpointError, CheckpointWriteError
from senseflow.train import checkpoint as ckpt
from senseflow.train import checkpoint_commit, checkpoint_layout
from senseflow.train.checkpoint_manifest import file_sha256, verify_checkpoint, write_manifest
from senseflow.train.sharded_checkpoint import DCP_DIR, ShardedCheckpointer, load_sharded, saved_keys


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))


def _save(root, step, seed=0, keep_last=5, hashes=True):
    return ckpt.save_checkpoint(
        root, step, {"generator": _net(seed)}, {"iteration": step}, "a: 1\n", keep_last, hashes=hashes
    )


def _trained(seed: int):
    net = _net(seed)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.randn(2, 3)).sum().backward()
    opt.step()
    return net, opt


def _save_dcp(root, step, net=None, opt=None, hashes=True):
    if net is None:
        net, opt = _trained(step)
    saver = ShardedCheckpointer(root, keep_last=5, hashes=hashes)
    return saver.save(step, {"generator": net}, {"generator": opt}, {"iteration": step}, "a: 1\n")


def _truncate(file, keep: int | None = None) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2 if keep is None else keep])


def _flip_last_byte(file) -> None:
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))


class _RunsCode:
    """Unpickling this runs a shell command that creates ``marker``: what a crafted checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


# ------------------------------------------------------------------------------------------ manifest


@pytest.mark.parametrize("hashes", [True, False])
def test_the_manifest_lists_every_file_and_is_written_last(tmp_path, hashes):
    path = _save(tmp_path, 1, hashes=hashes)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    assert manifest["hashed"] is hashes
    listed = {e["path"]: e for e in manifest["files"]}
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert on_disk == {*listed, ckpt.MANIFEST}
    assert set(listed) == {"generator.safetensors", ckpt.STATE, ckpt.CONFIG, ckpt.META}
    for rel, entry in listed.items():
        assert entry["size"] == (path / rel).stat().st_size
        assert entry.get("sha256") == (file_sha256(path / rel) if hashes else None)
    assert max((path / rel).stat().st_mtime_ns for rel in listed) <= (path / ckpt.MANIFEST).stat().st_mtime_ns
    verify_checkpoint(path)


def test_a_dcp_checkpoint_lists_its_shards_and_index(tmp_path):
    path = _save_dcp(tmp_path, 1)
    listed = {e["path"] for e in json.loads((path / ckpt.MANIFEST).read_text())["files"]}
    assert {f"{DCP_DIR}/.metadata", ckpt.STATE, ckpt.META} <= listed
    assert any(p.startswith(f"{DCP_DIR}/") and p.endswith(".distcp") for p in listed)
    verify_checkpoint(path)


# ------------------------------------------------------------------------------------------ damage


def test_a_truncated_file_is_named_with_both_sizes(tmp_path):
    path = _save(tmp_path, 1)
    file = path / "generator.safetensors"
    size = file.stat().st_size
    _truncate(file, keep=100)
    message = (
        r"checkpoint .*step-00000001 is damaged: "
        rf"generator\.safetensors: size differs: expected {size} bytes, found 100"
    )
    for check in (
        lambda: verify_checkpoint(path),
        lambda: ckpt.load_checkpoint(path, {"generator": _net(1)}),
        lambda: ckpt.read_network(path, "generator"),
    ):
        with pytest.raises(CheckpointError, match=message):
            check()


def test_a_flipped_byte_is_a_sha256_mismatch_and_sizes_only_miss_it(tmp_path):
    path = _save(tmp_path, 1)
    _flip_last_byte(path / ckpt.STATE)
    with pytest.raises(CheckpointError, match=r"state\.pt: sha256 mismatch: expected [0-9a-f]+\.\.\., found"):
        ckpt.load_checkpoint(path, {"generator": _net(1)})
    unhashed = _save(tmp_path / "sizes", 1, hashes=False)
    _flip_last_byte(unhashed / "generator.safetensors")
    verify_checkpoint(unhashed)  # what hashes=False gives up; truncation is still caught
    _truncate(unhashed / "generator.safetensors")
    with pytest.raises(CheckpointError, match="size differs"):
        verify_checkpoint(unhashed)


def test_a_missing_file_and_an_unreadable_manifest_are_named(tmp_path):
    path = _save(tmp_path, 1)
    (path / ckpt.STATE).unlink()
    with pytest.raises(CheckpointError, match=r"step-00000001 is damaged: state\.pt: missing$"):
        verify_checkpoint(path)
    (path / ckpt.MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"step-00000001 is damaged: manifest\.json is unreadable"):
        ckpt.read_network(path, "generator")


def test_read_network_checks_only_what_it_reads(tmp_path):
    path = _save(tmp_path, 1)
    _flip_last_byte(path / ckpt.STATE)  # the optimiser and counters: not needed for generate/export
    assert set(ckpt.read_network(path, "generator")) == set(_net(0).state_dict())
    with pytest.raises(CheckpointError, match=r"state\.pt: sha256 mismatch"):
        verify_checkpoint(path)


def test_a_damaged_dcp_shard_is_refused(tmp_path):
    path = _save_dcp(tmp_path, 1)
    shard = next((path / DCP_DIR).glob("*.distcp"))
    _flip_last_byte(shard)
    net, opt = _trained(5)
    with pytest.raises(CheckpointError, match=rf"dcp/{shard.name}: sha256 mismatch"):
        load_sharded(path, {"generator": net}, {"generator": opt})
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        ckpt.read_network(path, "generator")


# ------------------------------------------------------------------------- earlier versions (no manifest)


def test_a_checkpoint_without_manifest_still_loads(tmp_path):
    path = _save(tmp_path, 1, seed=3)
    (path / ckpt.MANIFEST).unlink()
    assert ckpt.list_checkpoints(tmp_path) == [(1, path)]
    verify_checkpoint(path)
    net = _net(9)
    assert ckpt.load_checkpoint(path, {"generator": net})["iteration"] == 1
    torch.testing.assert_close(net[0].weight, _net(3)[0].weight, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("name", "damage", "message"),
    [
        ("generator.safetensors", _truncate, r"generator\.safetensors cannot be read \(.*header"),
        ("generator.safetensors", pathlib.Path.unlink, r"generator\.safetensors cannot be read"),
        (ckpt.STATE, _truncate, r"state\.pt cannot be loaded"),
        (ckpt.META, _truncate, r"meta\.json cannot be read"),
    ],
)
def test_damage_without_manifest_is_one_checkpoint_error(tmp_path, name, damage, message):
    path = _save(tmp_path, 1)
    (path / ckpt.MANIFEST).unlink()
    damage(path / name)
    with pytest.raises(CheckpointError, match=rf"checkpoint .*step-00000001: {message}"):
        ckpt.load_checkpoint(path, {"generator": _net(1)})


@pytest.mark.parametrize("target", [".metadata", "shard"])
def test_a_damaged_dcp_checkpoint_without_manifest_is_one_checkpoint_error(tmp_path, target):
    path = _save_dcp(tmp_path, 1)
    (path / ckpt.MANIFEST).unlink()
    folder = path / DCP_DIR
    _truncate(folder / ".metadata" if target == ".metadata" else next(folder.glob("*.distcp")), keep=40)
    with pytest.raises(CheckpointError, match=r"checkpoint .*step-00000001: dcp/ cannot be read \(.+\)"):
        ckpt.read_network(path, "generator")


def test_a_folder_that_is_no_checkpoint_is_named(tmp_path):
    (tmp_path / "step-00000003").mkdir()
    with pytest.raises(ckpt.IncompleteCheckpointError, match="not a complete checkpoint"):
        verify_checkpoint(tmp_path / "step-00000003")
    with pytest.raises(FileNotFoundError):  # what callers of earlier versions catch
        ckpt.read_network(tmp_path / "step-00000003", "generator")


# ------------------------------------------------------------------------------- pruning, leftovers


def test_clean_partial_removes_leftovers_and_unfinished_folders_only(tmp_path):
    good = _save(tmp_path, 1)
    legacy = _save(tmp_path, 2)
    (legacy / ckpt.MANIFEST).unlink()
    half = _save(tmp_path, 3)
    for file in (ckpt.MANIFEST, ckpt.META):  # a deletion of an earlier version, killed half-way
        (half / file).unlink()
    for suffix in (".partial", ".old", ".deleting"):
        shutil.copytree(good, tmp_path / f"step-00000004{suffix}")
    (tmp_path / "notes.old").mkdir()  # not ours
    removed = ckpt.clean_partial(tmp_path)
    assert [p.name for p in removed] == [
        "step-00000003",
        "step-00000004.deleting",
        "step-00000004.old",
        "step-00000004.partial",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.old", "step-00000001", "step-00000002"]


def test_pruning_killed_half_way_never_leaves_a_complete_looking_checkpoint(tmp_path, monkeypatch):
    for step in (1, 2):
        _save(tmp_path, step, keep_last=2)
    real_rmtree = shutil.rmtree

    def killed(path, ignore_errors=False, **kwargs):
        if str(path).endswith(checkpoint_layout.DELETING_SUFFIX) and not ignore_errors:
            (pathlib.Path(path) / "generator.safetensors").unlink()  # some files already gone...
            raise KeyboardInterrupt("kill -9")  # ...when the process dies
        return real_rmtree(path, ignore_errors=ignore_errors, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 3, keep_last=2)
    monkeypatch.undo()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]
    assert ckpt.resume_candidates(tmp_path) == [tmp_path / "step-00000003", tmp_path / "step-00000002"]
    assert ckpt.clean_partial(tmp_path) == [tmp_path / "step-00000001.deleting"]


def test_resaving_a_step_killed_while_dropping_the_old_one(tmp_path, monkeypatch):
    _save(tmp_path, 5, seed=0)
    real_rmtree = shutil.rmtree

    def killed(path, ignore_errors=False, **kwargs):
        if str(path).endswith(checkpoint_layout.OLD_SUFFIX) and (pathlib.Path(path) / ckpt.META).exists():
            raise KeyboardInterrupt("kill -9")
        return real_rmtree(path, ignore_errors=ignore_errors, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 5, seed=1)
    monkeypatch.undo()
    net = _net(7)
    ckpt.load_checkpoint(tmp_path / "step-00000005", {"generator": net})
    torch.testing.assert_close(net[0].weight, _net(1)[0].weight, rtol=0, atol=0)
    assert ckpt.clean_partial(tmp_path) == [tmp_path / "step-00000005.old"]


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
    first = _save(tmp_path, 1, seed=0)
    file, break_it = WRITE_POINTS[point]
    break_it(monkeypatch)
    with pytest.raises(CheckpointWriteError) as caught:
        _save(tmp_path, 2, seed=1)
    monkeypatch.undo()
    assert str(caught.value) == (
        f"cannot write checkpoint step-00000002 in {tmp_path}: No space left on device ({file}); "
        f"the newest valid checkpoint is still {first}"
    )
    assert isinstance(caught.value, OSError) and caught.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]
    assert ckpt.latest_checkpoint(tmp_path) == first
    ckpt.load_checkpoint(first, {"generator": _net(3)})


def test_a_failed_first_save_says_there_is_none(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", _no_space)
    with pytest.raises(
        CheckpointWriteError, match=r"\(state\.pt\); the newest valid checkpoint is still none$"
    ):
        _save(tmp_path, 1)
    assert list(tmp_path.iterdir()) == []


def test_safetensors_io_errors_are_os_errors(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(CheckpointWriteError, match=r"No space left on device \(generator\.safetensors\)"):
        _save(tmp_path, 1)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_resave_of_the_same_step_keeps_the_old_one(tmp_path, monkeypatch):
    _save(tmp_path, 5, seed=0)
    real_rename = pathlib.Path.rename

    def rename(self, target):
        if self.name.endswith(ckpt.TMP_SUFFIX):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_rename(self, target)

    monkeypatch.setattr(pathlib.Path, "rename", rename)
    with pytest.raises(CheckpointWriteError, match=r"Read-only file system.*still .*step-00000005$"):
        _save(tmp_path, 5, seed=1)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000005"]
    net = _net(7)
    ckpt.load_checkpoint(tmp_path / "step-00000005", {"generator": net})
    torch.testing.assert_close(net[0].weight, _net(0)[0].weight, rtol=0, atol=0)


def test_a_read_only_checkpoint_folder(tmp_path, monkeypatch):
    first = _save(tmp_path, 1)
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
            _save(tmp_path, 2)
    finally:
        tmp_path.chmod(0o755)
    assert ckpt.latest_checkpoint(tmp_path) == first


@pytest.mark.parametrize("point", ["shards", "state"])
def test_a_failed_dcp_save_leaves_the_previous_checkpoint_newest(tmp_path, monkeypatch, point):
    from torch.distributed.checkpoint.filesystem import FileSystem

    first = _save_dcp(tmp_path, 1)
    if point == "shards":  # raised inside DCP's writer, which wraps it in a CheckpointException
        monkeypatch.setattr(FileSystem, "create_stream", _no_space)
    else:
        monkeypatch.setattr(torch, "save", _no_space)
    with pytest.raises(CheckpointWriteError, match=rf"No space left on device .*still {first}$"):
        _save_dcp(tmp_path, 2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]


# ------------------------------------------------------------------------------- crafted checkpoints


def test_a_crafted_state_pt_is_refused_without_running(tmp_path):
    path = _save(tmp_path, 1)
    marker = tmp_path / "ran"
    torch.save({"iteration": 1, "x": _RunsCode(marker)}, path / ckpt.STATE)
    write_manifest(path)  # the hashes match: the loader has to refuse it on its own
    verify_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"state\.pt cannot be loaded \(.*posix\.system"):
        ckpt.load_checkpoint(path, {"generator": _net(1)})
    with pytest.raises(CheckpointError, match=r"posix\.system"):
        ckpt.load_state(path)
    assert not marker.exists()
    torch.load(path / ckpt.STATE, weights_only=False)  # the trap is live: an unrestricted load runs it
    assert marker.exists()


def test_a_crafted_dcp_index_is_refused_without_running(tmp_path):
    import pickle

    import torch.distributed.checkpoint as dcp

    path = _save_dcp(tmp_path, 1)
    marker = tmp_path / "ran"
    (path / DCP_DIR / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    write_manifest(path)
    net, opt = _trained(5)
    for load in (
        lambda: ckpt.read_network(path, "generator"),
        lambda: load_sharded(path, {"generator": net}, {"generator": opt}),
        lambda: saved_keys(path / DCP_DIR),
    ):
        with pytest.raises(CheckpointError, match=r"dcp/ cannot be read \(refusing posix\.system"):
            load()
    assert not marker.exists()
    with pytest.raises(AttributeError):  # torch's own reader runs it, then finds no Metadata
        dcp.FileSystemReader(str(path / DCP_DIR)).read_metadata()
    assert marker.exists()


def test_a_crafted_value_inside_a_dcp_shard_is_refused_without_running(tmp_path):
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "ran"
    net, opt = _trained(1)
    opt.param_groups[0]["lr"] = _RunsCode(marker)  # saved by DCP as a pickled value
    path = _save_dcp(tmp_path / "run", 1, net, opt)
    fresh, fresh_opt = _trained(2)
    with pytest.raises(CheckpointError, match=r"dcp/ cannot be read \(.*posix\.system"):
        load_sharded(path, {"generator": fresh}, {"generator": fresh_opt})
    assert not marker.exists()
    target = {"optimizers": {"generator": {"param_groups": [{"lr": 0.0}]}}}
    dcp.load(target, checkpoint_id=str(path / DCP_DIR), no_dist=True)  # torch's planner runs it
    assert marker.exists()


def test_a_normal_dcp_checkpoint_round_trips(tmp_path):
    net, opt = _trained(3)
    path = _save_dcp(tmp_path, 1, net, opt)
    fresh, fresh_opt = _trained(4)
    load_sharded(path, {"generator": fresh}, {"generator": fresh_opt})
    assert ckpt.load_state(path)["iteration"] == 1
    for a, b in zip(net.state_dict().values(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    torch.testing.assert_close(
        fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )
    whole = ckpt.read_network(path, "generator")
    assert all(torch.equal(whole[k], v) for k, v in net.state_dict().items())


# ----------------------------------------------------------------------------------- resume fallback


def _load_for_resume(path):
    return ckpt.load_checkpoint(path, {"generator": _net(9)})["iteration"]


def test_resume_falls_back_to_the_newest_good_checkpoint(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step)
    _flip_last_byte(tmp_path / "step-00000004" / "generator.safetensors")
    legacy = tmp_path / "step-00000003"  # an earlier version's, half-deleted
    (legacy / ckpt.MANIFEST).unlink()
    (legacy / "generator.safetensors").unlink()
    (tmp_path / "step-00000005.partial").mkdir()
    assert [p.name for p in ckpt.resume_candidates(tmp_path)] == [f"step-0000000{s}" for s in (4, 3, 2, 1)]
    path, iteration, skipped = ckpt.load_newest_good(tmp_path, _load_for_resume)
    assert (path.name, iteration) == ("step-00000002", 2)
    assert [p.name for p, _ in skipped] == ["step-00000004", "step-00000003"]
    assert "generator.safetensors: sha256 mismatch" in skipped[0][1]
    assert "generator.safetensors cannot be read" in skipped[1][1]


def test_resume_with_no_usable_checkpoint(tmp_path):
    with pytest.raises(ckpt.IncompleteCheckpointError, match="no complete checkpoint"):
        ckpt.load_newest_good(tmp_path, _load_for_resume)
    _save(tmp_path, 1)
    _truncate(tmp_path / "step-00000001" / ckpt.STATE)
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*state\.pt: size differs"):
        ckpt.load_newest_good(tmp_path, _load_for_resume)


def test_resume_does_not_fall_back_over_a_mismatch(tmp_path):
    for step in (1, 2):
        _save(tmp_path, step)
    with pytest.raises(ValueError, match="no weights for"):
        ckpt.load_newest_good(tmp_path, lambda p: ckpt.load_checkpoint(p, {"other": _net(0)}))
    _save_dcp(tmp_path / "dcp", 1)
    shaped_otherwise = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4))
    larger = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 1))
    for other, message in (
        (shaped_otherwise, r"1 missing or of another shape, e\.g\. '1\.weight'"),
        (larger, r"3 missing .*'1\.weight'"),
    ):
        with pytest.raises(ValueError, match=rf"other weights for 'generator' .*\({message}\)"):
            ckpt.load_newest_good(tmp_path / "dcp", _sharded_loader(other))


def _sharded_loader(net):
    opt = torch.optim.AdamW(net.parameters())
    return lambda path: load_sharded(path, {"generator": net}, {"generator": opt})


def test_write_failure_messages_name_files_inside_the_checkpoint(tmp_path):
    tmp = tmp_path / "step-00000007.partial"
    error = checkpoint_commit.write_failure(tmp, OSError(errno.EACCES, "Permission denied"), tmp / "dcp")
    assert str(error) == (
        f"cannot write checkpoint step-00000007 in {tmp_path}: Permission denied (dcp); "
        "the newest valid checkpoint is still none"
    )
