"""Damaged, half-deleted and crafted checkpoints: each is refused with one clear error, never taken
for a good one, and never runs code when loaded (unwritable ones: test_checkpoint_write_failures.py)."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest
import torch
from torch import nn

from senseflow.errors import CheckpointError
from senseflow.train import checkpoint as ckpt
from senseflow.train import checkpoint_layout
from senseflow.train.checkpoint_manifest import file_sha256, verify_checkpoint, write_manifest
from senseflow.train.sharded_checkpoint import DCP_DIR, load_sharded, saved_keys
from tests.checkpoint_helpers import (
    RunsCode,
    flip_last_byte,
    save_dcp,
    save_whole,
    small_net,
    trained_net,
    truncate_file,
)

# ------------------------------------------------------------------------------------------ manifest


@pytest.mark.parametrize("hashes", [True, False])
def test_the_manifest_lists_every_file_and_is_written_last(tmp_path, hashes):
    path = save_whole(tmp_path, 1, hashes=hashes)
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
    path = save_dcp(tmp_path, 1)
    listed = {e["path"] for e in json.loads((path / ckpt.MANIFEST).read_text())["files"]}
    assert {f"{DCP_DIR}/.metadata", ckpt.STATE, ckpt.META} <= listed
    assert any(p.startswith(f"{DCP_DIR}/") and p.endswith(".distcp") for p in listed)
    verify_checkpoint(path)


# ------------------------------------------------------------------------------------------ damage


def test_a_truncated_file_is_named_with_both_sizes(tmp_path):
    path = save_whole(tmp_path, 1)
    file = path / "generator.safetensors"
    size = file.stat().st_size
    truncate_file(file, keep=100)
    message = (
        r"checkpoint .*step-00000001 is damaged: "
        rf"generator\.safetensors: size differs: expected {size} bytes, found 100"
    )
    for check in (
        lambda: verify_checkpoint(path),
        lambda: ckpt.load_checkpoint(path, {"generator": small_net(1)}),
        lambda: ckpt.read_network(path, "generator"),
    ):
        with pytest.raises(CheckpointError, match=message):
            check()


def test_a_flipped_byte_is_a_sha256_mismatch_and_sizes_only_miss_it(tmp_path):
    path = save_whole(tmp_path, 1)
    flip_last_byte(path / ckpt.STATE)
    with pytest.raises(CheckpointError, match=r"state\.pt: sha256 mismatch: expected [0-9a-f]+\.\.\., found"):
        ckpt.load_checkpoint(path, {"generator": small_net(1)})
    unhashed = save_whole(tmp_path / "sizes", 1, hashes=False)
    flip_last_byte(unhashed / "generator.safetensors")
    verify_checkpoint(unhashed)  # what hashes=False gives up; truncation is still caught
    truncate_file(unhashed / "generator.safetensors")
    with pytest.raises(CheckpointError, match="size differs"):
        verify_checkpoint(unhashed)


def test_a_missing_file_and_an_unreadable_manifest_are_named(tmp_path):
    path = save_whole(tmp_path, 1)
    (path / ckpt.STATE).unlink()
    with pytest.raises(CheckpointError, match=r"step-00000001 is damaged: state\.pt: missing$"):
        verify_checkpoint(path)
    (path / ckpt.MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"step-00000001 is damaged: manifest\.json is unreadable"):
        ckpt.read_network(path, "generator")


def test_read_network_checks_only_what_it_reads(tmp_path):
    path = save_whole(tmp_path, 1)
    flip_last_byte(path / ckpt.STATE)  # the optimiser and counters: not needed for generate/export
    assert set(ckpt.read_network(path, "generator")) == set(small_net(0).state_dict())
    with pytest.raises(CheckpointError, match=r"state\.pt: sha256 mismatch"):
        verify_checkpoint(path)


def test_a_damaged_dcp_shard_is_refused(tmp_path):
    path = save_dcp(tmp_path, 1)
    shard = next((path / DCP_DIR).glob("*.distcp"))
    flip_last_byte(shard)
    net, opt = trained_net(5)
    with pytest.raises(CheckpointError, match=rf"dcp/{shard.name}: sha256 mismatch"):
        load_sharded(path, {"generator": net}, {"generator": opt})
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        ckpt.read_network(path, "generator")


# ------------------------------------------------------------------------- earlier versions (no manifest)


def test_a_checkpoint_without_manifest_still_loads(tmp_path):
    path = save_whole(tmp_path, 1, seed=3)
    (path / ckpt.MANIFEST).unlink()
    assert ckpt.list_checkpoints(tmp_path) == [(1, path)]
    verify_checkpoint(path)
    net = small_net(9)
    assert ckpt.load_checkpoint(path, {"generator": net})["iteration"] == 1
    torch.testing.assert_close(net[0].weight, small_net(3)[0].weight, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("name", "damage", "message"),
    [
        ("generator.safetensors", truncate_file, r"generator\.safetensors cannot be read \(.*header"),
        ("generator.safetensors", pathlib.Path.unlink, r"generator\.safetensors cannot be read"),
        (ckpt.STATE, truncate_file, r"state\.pt cannot be loaded"),
        (ckpt.META, truncate_file, r"meta\.json cannot be read"),
    ],
)
def test_damage_without_manifest_is_one_checkpoint_error(tmp_path, name, damage, message):
    path = save_whole(tmp_path, 1)
    (path / ckpt.MANIFEST).unlink()
    damage(path / name)
    with pytest.raises(CheckpointError, match=rf"checkpoint .*step-00000001: {message}"):
        ckpt.load_checkpoint(path, {"generator": small_net(1)})


@pytest.mark.parametrize("target", [".metadata", "shard"])
def test_a_damaged_dcp_checkpoint_without_manifest_is_one_checkpoint_error(tmp_path, target):
    path = save_dcp(tmp_path, 1)
    (path / ckpt.MANIFEST).unlink()
    folder = path / DCP_DIR
    truncate_file(folder / ".metadata" if target == ".metadata" else next(folder.glob("*.distcp")), keep=40)
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
    good = save_whole(tmp_path, 1)
    legacy = save_whole(tmp_path, 2)
    (legacy / ckpt.MANIFEST).unlink()
    half = save_whole(tmp_path, 3)
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
        save_whole(tmp_path, step, keep_last=2)
    real_rmtree = shutil.rmtree

    def killed(path, ignore_errors=False, **kwargs):
        if str(path).endswith(checkpoint_layout.DELETING_SUFFIX) and not ignore_errors:
            (pathlib.Path(path) / "generator.safetensors").unlink()  # some files already gone...
            raise KeyboardInterrupt("kill -9")  # ...when the process dies
        return real_rmtree(path, ignore_errors=ignore_errors, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        save_whole(tmp_path, 3, keep_last=2)
    monkeypatch.undo()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]
    assert ckpt.resume_candidates(tmp_path) == [tmp_path / "step-00000003", tmp_path / "step-00000002"]
    assert ckpt.clean_partial(tmp_path) == [tmp_path / "step-00000001.deleting"]


def test_resaving_a_step_killed_while_dropping_the_old_one(tmp_path, monkeypatch):
    save_whole(tmp_path, 5, seed=0)
    real_rmtree = shutil.rmtree

    def killed(path, ignore_errors=False, **kwargs):
        if str(path).endswith(checkpoint_layout.OLD_SUFFIX) and (pathlib.Path(path) / ckpt.META).exists():
            raise KeyboardInterrupt("kill -9")
        return real_rmtree(path, ignore_errors=ignore_errors, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        save_whole(tmp_path, 5, seed=1)
    monkeypatch.undo()
    net = small_net(7)
    ckpt.load_checkpoint(tmp_path / "step-00000005", {"generator": net})
    torch.testing.assert_close(net[0].weight, small_net(1)[0].weight, rtol=0, atol=0)
    assert ckpt.clean_partial(tmp_path) == [tmp_path / "step-00000005.old"]


# ------------------------------------------------------------------------------- crafted checkpoints


def test_a_crafted_state_pt_is_refused_without_running(tmp_path):
    path = save_whole(tmp_path, 1)
    marker = tmp_path / "ran"
    torch.save({"iteration": 1, "x": RunsCode(marker)}, path / ckpt.STATE)
    write_manifest(path)  # the hashes match: the loader has to refuse it on its own
    verify_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"state\.pt cannot be loaded \(.*posix\.system"):
        ckpt.load_checkpoint(path, {"generator": small_net(1)})
    with pytest.raises(CheckpointError, match=r"posix\.system"):
        ckpt.load_state(path)
    assert not marker.exists()
    torch.load(path / ckpt.STATE, weights_only=False)  # the trap is live: an unrestricted load runs it
    assert marker.exists()


def test_a_crafted_dcp_index_is_refused_without_running(tmp_path):
    import pickle

    import torch.distributed.checkpoint as dcp

    path = save_dcp(tmp_path, 1)
    marker = tmp_path / "ran"
    (path / DCP_DIR / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    write_manifest(path)
    net, opt = trained_net(5)
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
    net, opt = trained_net(1)
    opt.param_groups[0]["lr"] = RunsCode(marker)  # saved by DCP as a pickled value
    path = save_dcp(tmp_path / "run", 1, net, opt)
    fresh, fresh_opt = trained_net(2)
    with pytest.raises(CheckpointError, match=r"dcp/ cannot be read \(.*posix\.system"):
        load_sharded(path, {"generator": fresh}, {"generator": fresh_opt})
    assert not marker.exists()
    target = {"optimizers": {"generator": {"param_groups": [{"lr": 0.0}]}}}
    dcp.load(target, checkpoint_id=str(path / DCP_DIR), no_dist=True)  # torch's planner runs it
    assert marker.exists()


def test_a_normal_dcp_checkpoint_round_trips(tmp_path):
    net, opt = trained_net(3)
    path = save_dcp(tmp_path, 1, net, opt)
    fresh, fresh_opt = trained_net(4)
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
    return ckpt.load_checkpoint(path, {"generator": small_net(9)})["iteration"]


def test_resume_falls_back_to_the_newest_good_checkpoint(tmp_path):
    for step in (1, 2, 3, 4):
        save_whole(tmp_path, step)
    flip_last_byte(tmp_path / "step-00000004" / "generator.safetensors")
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
    save_whole(tmp_path, 1)
    truncate_file(tmp_path / "step-00000001" / ckpt.STATE)
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*state\.pt: size differs"):
        ckpt.load_newest_good(tmp_path, _load_for_resume)


def test_resume_does_not_fall_back_over_a_mismatch(tmp_path):
    for step in (1, 2):
        save_whole(tmp_path, step)
    with pytest.raises(ValueError, match="no weights for"):
        ckpt.load_newest_good(tmp_path, lambda p: ckpt.load_checkpoint(p, {"other": small_net(0)}))
    save_dcp(tmp_path / "dcp", 1)
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
