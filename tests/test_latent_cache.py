"""``senseflow cache-latents`` and ``data.latent_cache``: a cached run sees the latents of exactly the
samples an image run sees, and a cache written for other data, another resolution or another VAE is
refused with one message that says how to rewrite it."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

import senseflow.config.registry as registry
from senseflow.cli import main
from senseflow.data import DataWarning, verify_latent_cache
from senseflow.data.latents import MANIFEST
from senseflow.models.text_cache import TextCache
from senseflow.models.text_cache_write import write_tensor_group
from senseflow.train.data import build_stream, stream_identity
from tests.data_helpers import (
    RECIPE,
    data_cfg,
    data_overrides,
    picture,
    samples,
    write_dataset,
    write_images,
    write_shard,
)
from tests.trainer_helpers import RECIPE as TOY_RECIPE


class ConvAdapter:
    """A stand-in for a family adapter: ``encode_pixels`` is a fixed strided conv (an "autoencoder"
    with factor 2 and 4 channels)."""

    def __init__(self, tag: str = "conv-v1"):
        self.weight = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
        self.tag = tag

    def to(self, device):
        return self

    def encode_pixels(self, images: torch.Tensor) -> torch.Tensor:
        return F.conv2d(images, self.weight, stride=2)

    def vae_identity(self) -> dict:
        return {"vae": self.tag, "factor": (2, 2)}


@pytest.fixture
def conv_family(monkeypatch):
    """The recipe's family (sd3) builds a ConvAdapter in this test."""
    spec = registry.family_spec("sd3")
    monkeypatch.setitem(
        registry._FAMILIES, "sd3", dataclasses.replace(spec, builder=lambda cfg: ConvAdapter())
    )


@pytest.fixture
def dataset(tmp_path):
    """The test images as a json dataset, one of them unreadable."""
    path = write_dataset("json", tmp_path / "data")
    (tmp_path / "data" / "img" / "s003.png").write_bytes(b"broken")
    return path


def cache_latents(path, out, *extra: str, kind: str = "json") -> int:
    args = ["cache-latents", str(RECIPE), *data_overrides(kind, path, *extra), "--out", str(out)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return main([*args, "--shard-size", "3", "--batch-size", "2"])


def quiet_batches(cfg, iterations):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        stream = build_stream(cfg)
        return stream, [stream.batch(i) for i in iterations]


def test_cached_latents_are_the_encoded_images_of_the_same_samples(conv_family, dataset, tmp_path):
    cache = tmp_path / "cache"
    assert cache_latents(dataset, cache) == 0
    manifest = json.loads((cache / MANIFEST).read_text())
    assert manifest["samples"] == 6 and manifest["skipped"] == ["s003"] and len(manifest["shards"]) >= 2
    assert manifest["vae"] == {"vae": "conv-v1", "factor": [2, 2]} and manifest["latent_shape"] == [4, 8, 8]
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary file left

    images, image_batches = quiet_batches(data_cfg("json", dataset, batch_size=3), range(5))
    cached, cached_batches = quiet_batches(
        data_cfg("json", dataset, f"data.latent_cache={cache}", batch_size=3), range(5)
    )
    assert stream_identity(cached) == stream_identity(images) == manifest["stream"]
    verify_latent_cache(cached, ConvAdapter())
    adapter = ConvAdapter()
    for a, b in zip(image_batches, cached_batches, strict=True):
        assert b.images is None and b.latents is not None and not b.prompts_only
        assert b.keys == a.keys and b.prompts == a.prompts
        assert all(torch.equal(a.meta[k], b.meta[k]) for k in ("original_size", "crop_top_left"))
        torch.testing.assert_close(b.latents, adapter.encode_pixels(a.images), rtol=0, atol=1e-5)
    assert cached.skipped == images.skipped == 1


def test_a_stale_or_incomplete_cache_is_refused(conv_family, dataset, tmp_path):
    cache = tmp_path / "cache"
    assert cache_latents(dataset, cache) == 0
    rewrite = r"senseflow cache-latents RECIPE"

    with pytest.raises(ValueError, match=r"another VAE .*conv-v2.*" + rewrite):
        verify_latent_cache(
            build_stream(data_cfg("json", dataset, f"data.latent_cache={cache}")), ConvAdapter("conv-v2")
        )
    with pytest.raises(ValueError, match=r"was written for the data .*" + rewrite):
        build_stream(data_cfg("json", dataset, f"data.latent_cache={cache}", resolution=32))
    with pytest.raises(ValueError, match=r"data\.latent_cache: a latent cache holds center crops"):
        build_stream(data_cfg("json", dataset, f"data.latent_cache={cache}", "data.crop=random"))

    data = json.loads(dataset.read_text())
    data["prompts"][0] = "an edited caption"
    edited = dataset.with_name("edited.json")
    edited.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"was written for the data .*" + rewrite):
        build_stream(data_cfg("json", edited, f"data.latent_cache={cache}"))

    manifest = json.loads((cache / MANIFEST).read_text())
    del manifest["entries"]["s001"]
    (cache / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"has no entry for 1 sample\(s\): s001; .*" + rewrite):
        build_stream(data_cfg("json", dataset, f"data.latent_cache={cache}"))
    (cache / manifest["shards"][0]).unlink()
    with pytest.raises(FileNotFoundError, match=r"1 shard\(s\) are missing"):
        build_stream(data_cfg("json", dataset, f"data.latent_cache={cache}"))
    (cache / MANIFEST).unlink()
    with pytest.raises(FileNotFoundError, match=r"holds no manifest\.json; .*" + rewrite):
        build_stream(data_cfg("json", dataset, f"data.latent_cache={cache}"))


def test_rewriting_a_cache_replaces_it_whole(conv_family, tmp_path):
    path = write_dataset("json", tmp_path / "data")
    cache = tmp_path / "cache"
    assert cache_latents(path, cache) == 0
    small = write_dataset("json", tmp_path / "small", samples()[:2])
    assert cache_latents(small, cache) == 0
    manifest = json.loads((cache / MANIFEST).read_text())
    assert (
        sorted(p.name for p in cache.glob("*.safetensors"))
        == manifest["shards"]
        == ["latents-00000.safetensors"]
    )
    cached = build_stream(data_cfg("json", small, f"data.latent_cache={cache}"))
    assert cached.batch(0).latents.shape == (2, 4, 8, 8)


def test_the_command_refuses_what_it_cannot_cache(conv_family, tmp_path, capsys):
    path = write_dataset("json", tmp_path / "data", [("a", "p", picture(20, 20, 0))])
    assert cache_latents(path, tmp_path / "c", "data.crop=random") == 2
    assert "data.crop: cache-latents stores each sample's center crop" in capsys.readouterr().err
    assert main(["cache-latents", str(RECIPE), *data_overrides("json", path)]) == 2
    assert "--out DIR or data.latent_cache=DIR" in capsys.readouterr().err
    assert main(["cache-latents", str(TOY_RECIPE), "--out", str(tmp_path / "c")]) == 2
    assert "data.kind: 'toy' has no fixed list of images to cache" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_the_recipe_folder_is_the_default_destination(conv_family, dataset, tmp_path):
    cache = tmp_path / "by_recipe"
    args = ["cache-latents", str(RECIPE), *data_overrides("json", dataset, f"data.latent_cache={cache}")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        assert main(args) == 0
    assert (cache / MANIFEST).is_file()


def test_same_named_shards_in_two_folders_keep_their_own_latents(conv_family, tmp_path):
    laion = [(f"{n:06d}", f"laion {n}", picture(20, 20, n)) for n in range(3)]
    coyo = [(f"{n:06d}", f"coyo {n}", picture(20, 20, 10 + n)) for n in range(3)]
    write_shard(tmp_path / "d" / "laion" / "00000.tar", laion)
    write_shard(tmp_path / "d" / "coyo" / "00000.tar", coyo)
    path = str(tmp_path / "d" / "{laion,coyo}" / "00000.tar")
    cache = tmp_path / "cache"
    assert cache_latents(path, cache, kind="webdataset") == 0
    assert json.loads((cache / MANIFEST).read_text())["samples"] == 6
    _, (images,) = quiet_batches(data_cfg("webdataset", path, batch_size=6), [0])
    _, (cached,) = quiet_batches(
        data_cfg("webdataset", path, f"data.latent_cache={cache}", batch_size=6), [0]
    )
    assert cached.prompts == images.prompts and len(set(cached.keys)) == 6
    torch.testing.assert_close(cached.latents, ConvAdapter().encode_pixels(images.images), rtol=0, atol=1e-5)


def test_an_image_listed_twice_is_encoded_once(conv_family, tmp_path):
    items = samples()[:2]
    paths = write_images(tmp_path / "data", items)
    path = tmp_path / "data" / "twice.json"
    path.write_text(
        json.dumps({"keys": ["a", "a", "b"], "image_paths": [paths[0], *paths], "prompts": ["x", "y", "z"]})
    )
    cache = tmp_path / "cache"
    assert cache_latents(path, cache) == 0
    assert sorted(json.loads((cache / MANIFEST).read_text())["entries"]) == ["a", "b"]
    _, (batch,) = quiet_batches(data_cfg("json", path, f"data.latent_cache={cache}", batch_size=3), [0])
    assert sorted(batch.prompts) == ["x", "y", "z"]
    x, y = batch.prompts.index("x"), batch.prompts.index("y")
    assert torch.equal(batch.latents[x], batch.latents[y])


def test_the_command_never_writes_over_another_kind_of_cache(conv_family, dataset, tmp_path, capsys):
    text = tmp_path / "text_cache"
    write_tensor_group(
        text, "text", {"encoder": "e"}, lambda ps: {"t": torch.ones(len(ps), 2)}, ["", "a"], progress=False
    )
    before = {p.name: p.read_bytes() for p in text.iterdir()}
    assert cache_latents(dataset, text) == 2
    err = capsys.readouterr().err
    assert f"cache-latents: {text} holds a text cache (written by `senseflow cache-text`)" in err
    assert "choose another folder (--out DIR or data.latent_cache=DIR)" in err
    assert {p.name: p.read_bytes() for p in text.iterdir()} == before
    assert len(TextCache.open(text)) == 2
    other = tmp_path / "other"
    other.mkdir()
    (other / MANIFEST).write_text(json.dumps({"format": "something/3"}))
    assert cache_latents(dataset, other) == 2
    assert "holds a manifest.json of something else (format 'something/3'" in capsys.readouterr().err
    (other / MANIFEST).write_text("{not json")
    assert cache_latents(dataset, other) == 2
    assert "not readable JSON" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == [MANIFEST]


def test_caching_images_all_below_min_side_is_one_clear_error(conv_family, tmp_path, capsys):
    path = write_dataset("json", tmp_path / "data", samples([(8, 8), (12, 10), (9, 30)]))
    args = ["cache-latents", str(RECIPE), *data_overrides("json", path), "--out", str(tmp_path / "c")]
    with pytest.warns(DataWarning) as caught:
        assert main(args) == 2
    assert len(caught) == 1 and "skipped all 3 samples (3 smaller than data.min_side=16)" in str(
        caught[0].message
    )
    assert (
        "none of the 3 samples has a usable image; 3 of them are smaller than data.min_side=16 (short sides "
        "8 to 10 px), the likely cause: lower data.min_side" in capsys.readouterr().err
    )
