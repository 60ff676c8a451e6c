"""The offline text cache: round trip, identity and missing-prompt errors, atomic writes, appends,
added groups, and training from it (same losses as live encoding, text encoder never loaded)."""

import json
from pathlib import Path

import pytest
import torch

from senseflow.cli import main
from senseflow.families.toy.adapter import ToyAdapter
from senseflow.models import build_adapter
from senseflow.models import text_cache_write as tc
from senseflow.models.sampling import teacher_sample
from senseflow.models.text_cache import PromptNotCachedError, StaleTextCacheError, TextCache
from senseflow.models.text_cache_write import write_tensor_group, write_text_cache
from tests.trainer_helpers import RECIPE, toy_cfg

PROMPTS = [
    "a small red circle",
    "a large blue square above a small green triangle",
    "a small yellow triangle to the left of a large purple circle",
    "a large cyan circle below a small red square",
    "a small green square",
]


@pytest.fixture
def adapter(tiny_teacher_dir, tmp_path):
    return build_adapter(toy_cfg(tiny_teacher_dir, tmp_path / "run"))


def _shard_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def test_round_trip_is_bit_exact_in_any_order(adapter, tmp_path):
    folder = tmp_path / "cache"
    report = write_text_cache(
        adapter, [*PROMPTS, PROMPTS[0]], folder, batch_size=8, shard_size=2, progress=False
    )
    assert (report.added, report.count, report.shards_written) == (6, 6, 3)  # "" + 5 prompts
    reference = adapter.encode_text(["", *PROMPTS])  # the batch the cache was encoded in
    row = {p: i for i, p in enumerate(["", *PROMPTS])}

    cache = TextCache.open(folder, adapter)
    assert len(cache) == 6 and "" in cache and PROMPTS[3] in cache and "a red" not in cache
    query = [PROMPTS[4], PROMPTS[1], "", PROMPTS[4], PROMPTS[0], PROMPTS[2], PROMPTS[1]]
    got = cache.lookup(query)
    assert list(got.tensors) == list(reference.tensors) == ["tokens", "pooled"]
    index = torch.tensor([row[p] for p in query])
    for name, t in reference.tensors.items():
        assert got.tensors[name].dtype == t.dtype
        assert torch.equal(got.tensors[name], t[index]), name
    # Live encoding of another batch composition agrees to float32 rounding.
    live = adapter.encode_text(query)
    for name in live.tensors:
        torch.testing.assert_close(got.tensors[name], live.tensors[name], rtol=1e-5, atol=1e-6)
    assert cache.prompts() == ["", *PROMPTS]

    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["identity"] == adapter.text_identity() and manifest["count"] == 6
    assert manifest["tensors"]["tokens"]["shape"] == list(reference.tensors["tokens"].shape[1:])
    assert [s["file"] for s in manifest["shards"]] == [f"shard-{i:05d}.safetensors" for i in range(3)]

    # The empty prompt comes from the cache, so null_conditioning needs no text encoder.
    adapter.text_cache = cache
    null = adapter.null_conditioning(3)
    assert torch.equal(null.tensors["pooled"], reference.tensors["pooled"][:1].expand(3, -1))


def test_missing_prompt_and_stale_identity(adapter, tiny_teacher_dir, tmp_path):
    folder = tmp_path / "cache"
    write_text_cache(adapter, PROMPTS[:2], folder, progress=False)
    cache = TextCache.open(folder, adapter)
    with pytest.raises(
        PromptNotCachedError, match=r"'a purple hexagon'.*senseflow cache-text RECIPE --prompts"
    ):
        cache.lookup([PROMPTS[0], "a purple hexagon"])
    assert cache.missing([PROMPTS[0], "x", "x"]) == ["x"]

    shipped = ToyAdapter(None)  # the packaged teacher: another text encoder
    with pytest.raises(
        StaleTextCacheError, match=r"(?s)text_encoder/model\.safetensors.*senseflow cache-text"
    ):
        TextCache.open(folder, shipped)
    cfg = toy_cfg("null", tmp_path / "run", f"model.text_cache={folder}")  # the shipped teacher
    with pytest.raises(StaleTextCacheError, match="written by other text encoders"):
        build_adapter(cfg)
    with pytest.raises(FileNotFoundError, match="senseflow cache-text"):
        TextCache.open(tmp_path / "nothing", adapter)

    # Writing with the other encoder replaces the cache; its old shards go.
    report = write_text_cache(shipped, PROMPTS[:1], folder, progress=False)
    assert report.rebuilt and report.count == 2
    assert sorted(_shard_files(folder)) == ["shard-00001.safetensors"]
    TextCache.open(folder, shipped).lookup(PROMPTS[:1])


def test_interrupted_write_leaves_the_previous_cache(adapter, tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    write_text_cache(adapter, PROMPTS[:2], folder, progress=False)
    before = _shard_files(folder)

    def crash(*args, **kwargs):
        raise RuntimeError("killed before the manifest")

    monkeypatch.setattr(tc, "_write_manifest", crash)
    with pytest.raises(RuntimeError, match="killed"):
        write_text_cache(adapter, PROMPTS, folder, progress=False)
    monkeypatch.undo()
    assert set(_shard_files(folder)) == {*before, "shard-00001.safetensors"}  # written, not committed

    cache = TextCache.open(folder, adapter)
    assert len(cache) == 3 and cache.missing(PROMPTS) == PROMPTS[2:]
    cache.lookup(["", *PROMPTS[:2]])
    report = write_text_cache(adapter, PROMPTS, folder, progress=False)  # removes the leftover first
    assert report.added == 3 and TextCache.open(folder, adapter).missing(PROMPTS) == []


def test_append_writes_new_shards_only_and_groups_add_tensors(adapter, tmp_path):
    folder = tmp_path / "cache"
    write_text_cache(adapter, PROMPTS[:2], folder, progress=False)
    before = _shard_files(folder)
    report = write_text_cache(adapter, PROMPTS, folder, shard_size=2, progress=False)
    assert (report.added, report.present, report.count, report.shards_written) == (3, 3, 6, 2)
    after = _shard_files(folder)
    assert {k: after[k] for k in before} == before and len(after) == 3

    # A second producer adds its own tensors to existing prompts without touching the text shards.
    def clip_like(prompts):
        return {"text_embeds": torch.stack([torch.full((4,), float(len(p))) for p in prompts])}

    group = write_tensor_group(folder, "disc", {"backbone": "fake-clip"}, clip_like, PROMPTS, progress=False)
    assert group.added == 5 and {k: _shard_files(folder)[k] for k in after} == after
    cache = TextCache.open(folder, adapter)
    both = cache.lookup([PROMPTS[3], PROMPTS[0]], groups=("disc",))
    assert set(both.tensors) == {"tokens", "pooled", "disc.text_embeds"}
    assert both.tensors["disc.text_embeds"][:, 0].tolist() == [len(PROMPTS[3]), len(PROMPTS[0])]
    assert set(cache.lookup(PROMPTS[:1]).tensors) == {"tokens", "pooled"}
    with pytest.raises(PromptNotCachedError, match="group 'disc'"):
        cache.lookup_group("disc", [""])
    with pytest.raises(StaleTextCacheError, match="backbone"):
        cache.check_identity("disc", {"backbone": "other"})
    # Appending text prompts keeps the group.
    write_text_cache(adapter, ["a large red circle"], folder, progress=False)
    assert TextCache.open(folder, adapter).groups == ["text", "disc"]


def test_cli_cache_then_cached_run_matches_live_without_text_encoder(tiny_teacher_dir, tmp_path, monkeypatch):
    from senseflow.train.trainer import Distiller

    monkeypatch.chdir(tmp_path)  # the recipe's relative cache folder resolves against it
    overrides = [
        f"model.teacher={tiny_teacher_dir}",
        "data.batch_size=2",
        "schedule.iterations=2",
        "logging.every=1",
        "logging.sample_every=null",
        "checkpoint.every=100",
    ]
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps(["a tiny orange blob"]))
    assert (
        main(["cache-text", str(RECIPE), *overrides, "--out", "cache", "--prompts", str(extra), "--quiet"])
        == 0
    )
    cache = TextCache.open("cache", build_adapter(toy_cfg(tiny_teacher_dir, tmp_path / "x")))
    assert "" in cache and "a tiny orange blob" in cache and "a small red circle" in cache  # sample prompt
    assert main(["cache-text", str(RECIPE), *overrides]) == 2  # no folder: --out or model.text_cache

    def run(name, *more):
        cfg = toy_cfg(tiny_teacher_dir, tmp_path / name, "schedule.iterations=2", *more, checkpoint_every=100)
        distiller = Distiller(cfg, progress=False)
        distiller.run()
        lines = (tmp_path / name / "log.jsonl").read_text().splitlines()
        return distiller, [json.loads(line) for line in lines]

    cached, cached_logs = run("cached", "model.text_cache=cache")
    _, live_logs = run("live")
    assert len(cached_logs) == len(live_logs) == 2
    assert "loss_dmd" in cached_logs[0] and "loss_fake" in cached_logs[1]
    for a, b in zip(cached_logs, live_logs, strict=True):
        losses = [k for k in b if k.startswith("loss")]
        assert losses and sorted(losses) == sorted(k for k in a if k.startswith("loss"))
        for key in losses:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    adapter = cached.adapter
    assert adapter.text_cache is not None and adapter._encoder is None
    teacher_sample(adapter, cached.teacher, ["a small red circle"], [0], steps=2, guidance=3.0, resolution=32)
    assert adapter._encoder is None


def test_rebuilding_a_group_with_no_prompt_commits_it_empty(tmp_path):
    folder = tmp_path / "cache"

    def fake(prompts):
        return {"t": torch.stack([torch.full((2,), float(len(p))) for p in prompts])}

    write_tensor_group(folder, "text", {"encoder": "e"}, fake, ["", *PROMPTS[:2]], progress=False)
    write_tensor_group(folder, "disc", {"backbone": "a"}, fake, PROMPTS, shard_size=2, progress=False)
    assert len(list(folder.glob("disc-shard-*.safetensors"))) == 3

    report = write_tensor_group(folder, "disc", {"backbone": "b"}, fake, [], progress=False)
    assert report.rebuilt and (report.added, report.count, report.shards_written) == (0, 0, 0)
    manifest = json.loads((folder / "manifest.json").read_text())
    disc = manifest["groups"]["disc"]
    assert disc["identity"] == {"backbone": "b"} and disc["shards"] == [] and disc["count"] == 0
    named = [s["file"] for s in manifest["shards"]] + [
        s["file"] for g in manifest["groups"].values() for s in g["shards"]
    ]
    assert all((folder / f).is_file() for f in named)  # the manifest names no removed shard
    assert not list(folder.glob("disc-shard-*.safetensors"))
    cache = TextCache.open(folder, identity={"encoder": "e"})
    cache.check_identity("disc", {"backbone": "b"})
    assert cache.prompts("disc") == [] and torch.equal(
        cache.lookup([PROMPTS[1]]).tensors["t"], fake([PROMPTS[1]])["t"]
    )
    with pytest.raises(PromptNotCachedError, match="group 'disc'"):
        cache.lookup_group("disc", [PROMPTS[0]])
    # the emptied group fills again
    write_tensor_group(folder, "disc", {"backbone": "b"}, fake, PROMPTS[:1], progress=False)
    assert TextCache.open(folder).lookup_group("disc", PROMPTS[:1]).tensors["disc.t"].shape == (1, 2)
