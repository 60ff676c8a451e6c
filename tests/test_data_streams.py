"""Data streams: each rank reads only its slice, slices make up the one-process batch, prefetching
changes nothing, and a batch with cached latents and conditioning trains exactly like one without."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import senseflow.config.registry as registry
from senseflow.config.registry import DataKindSpec, register_data_kind
from senseflow.families.toy.data import ShapesStream, build_toy_stream
from senseflow.models.batch import Batch
from senseflow.train import checkpoint as ckpt
from senseflow.train.data import BatchLoader
from senseflow.train.trainer import Distiller
from tests.trainer_helpers import toy_cfg


def test_rank_slices_make_up_the_one_process_batch():
    whole = ShapesStream("train", 6, seed=3).batch(5)
    parts = [ShapesStream("train", 2, seed=3, rank=r, world=3).batch(5) for r in range(3)]
    assert [p for b in parts for p in b.prompts] == whole.prompts
    torch.testing.assert_close(torch.cat([b.images for b in parts]), whole.images, rtol=0, atol=0)
    other = ShapesStream("train", 6, seed=3).batch(6)
    assert other.prompts != whole.prompts


def test_a_rank_renders_only_its_own_samples(monkeypatch):
    stream = ShapesStream("train", 2, seed=0, rank=1, world=4)
    drawn = []
    original = ShapesStream._sample

    def spy(self, index, j):
        drawn.append(j)
        return original(self, index, j)

    monkeypatch.setattr(ShapesStream, "_sample", spy)
    stream.batch(0)
    assert drawn == [2, 3]


def test_batch_loader_with_workers_gives_the_same_batches_and_restarts_on_resume():
    stream = ShapesStream("train", 3, seed=1)
    loader = BatchLoader(stream, num_workers=2, stop=8)
    for index in (0, 1, 2, 6, 7):  # 6 is a jump (a resume): the workers restart there
        got, want = loader.batch(index), stream.batch(index)
        assert got.prompts == want.prompts
        torch.testing.assert_close(got.images, want.images, rtol=0, atol=0)


def test_batch_checks_its_parts():
    assert Batch(prompts=["a"]).prompts_only  # neither images nor latents: a prompts-only batch
    assert not Batch(prompts=["a"], images=torch.zeros(1, 3, 4, 4)).prompts_only
    with pytest.raises(ValueError, match="keys holds 2 samples for 1 prompts"):
        Batch(prompts=["a"], images=torch.zeros(1, 3, 4, 4), keys=["x", "y"])
    with pytest.raises(ValueError, match="2 samples for 1 prompts"):
        Batch(prompts=["a"], images=torch.zeros(2, 3, 4, 4))


class CachedShapes:
    """The toy stream with the offline parts filled in: raw latents (the codec's ``encode_pixels``)
    and the prompts' encodings, as a latent-and-embedding cache would hold them; no images."""

    def __init__(self, cfg, rank, world):
        from senseflow.models import build_adapter

        self.inner = build_toy_stream(cfg, rank, world)
        self.adapter = build_adapter(cfg)

    def batch(self, index):
        b = self.inner.batch(index)
        with torch.no_grad():
            return Batch(
                prompts=b.prompts,
                latents=self.adapter.encode_pixels(b.images),
                conditioning=self.adapter.encode_prompts(b.prompts),
            )


def test_cached_latents_and_conditioning_train_like_the_uncached_stream(
    tiny_teacher_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(registry, "_DATA_KINDS", dict(registry._DATA_KINDS))
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    register_data_kind(DataKindSpec("toy_cached", CachedShapes, frozenset({"num_workers"}), needs_path=False))
    registry._FAMILIES["toy"] = dataclasses.replace(
        registry._FAMILIES["toy"], data_kinds=("toy", "toy_cached")
    )
    runs = {}
    for kind in ("toy", "toy_cached"):
        out = tmp_path / kind
        cfg = toy_cfg(tiny_teacher_dir, out, "schedule.iterations=3", f"data.kind={kind}", checkpoint_every=3)
        Distiller(cfg, progress=False).run()
        runs[kind] = ckpt.read_network(out / "checkpoints" / "step-00000003", "generator")
    for name, value in runs["toy"].items():
        torch.testing.assert_close(runs["toy_cached"][name], value, rtol=0, atol=0)


def test_model_space_discriminator_decodes_only_on_logging_iterations(
    tiny_teacher_dir, tmp_path, monkeypatch
):
    cfg = toy_cfg(
        tiny_teacher_dir,
        tmp_path,
        "schedule.iterations=4",
        "logging.every=2",
        "method.gan.type=dmd2_head",
        "method.gan.weight=5e-3",
        "method.gan.time_weight=constant",
        "method.isg.weight=0",
    )
    run = Distiller(cfg, progress=False)
    decoded = []
    original = run.adapter.decode
    monkeypatch.setattr(run.adapter, "decode", lambda x: decoded.append(run.iteration) or original(x))
    logs = [run.train_step() for _ in range(4)]
    assert decoded == [0, 2, 3]  # logging iterations 0 and 2, and the last one
    assert "image_std" in logs[0] and "image_std" not in logs[1]


def test_batch_loader_returns_a_repeated_iteration_without_restarting(monkeypatch):
    stream = ShapesStream("train", 2, seed=1)
    loader = BatchLoader(stream, num_workers=1, stop=4)
    first = loader.batch(0)
    iterator = loader._it
    assert loader.batch(0) is first and loader._it is iterator
    loader.close()
    assert loader._it is None
    assert loader.batch(1).prompts == stream.batch(1).prompts


def test_a_run_is_not_resumed_on_another_data_stream(tiny_teacher_dir, tmp_path, monkeypatch):
    cfg = toy_cfg(tiny_teacher_dir, tmp_path, "schedule.iterations=1", checkpoint_every=1)
    Distiller(cfg, progress=False).run()
    monkeypatch.setattr(ShapesStream, "identity", "shapes/some-other-sampling")
    resumed = toy_cfg(tiny_teacher_dir, tmp_path, "schedule.iterations=2", "checkpoint.resume=latest")
    with pytest.raises(ValueError, match=r"trained on data stream 'shapes/per-sample-seed/1'"):
        Distiller(resumed, progress=False).run()
