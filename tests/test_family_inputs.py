"""What a real family reads besides its weights: every data kind, the offline text and latent caches,
and the folder's weight variant, on tiny folders of the real classes."""

from __future__ import annotations

import pytest
import torch

from senseflow.cli import main
from senseflow.families.tiny import write_tiny_teacher
from senseflow.models import build_adapter
from senseflow.models.build import build_networks
from senseflow.models.text_cache import TextCache
from senseflow.models.text_cache_write import write_text_cache
from senseflow.train.trainer import Distiller
from tests.data_helpers import data_overrides, write_dataset
from tests.family_helpers import RECIPES, SMALL, family_cfg, write_image_dataset


@pytest.mark.parametrize("kind", ["folder", "jsonl", "csv", "tsv", "webdataset", "hf"])
def test_a_family_trains_from_every_data_kind(tiny_folder, tmp_path, kind):
    pytest.importorskip("datasets") if kind == "hf" else None
    path = write_dataset(kind, tmp_path / "data")
    cfg = family_cfg("sdxl", tiny_folder("sdxl", "a"), path, tmp_path / "run", "schedule.iterations=2")
    cfg = type(cfg).model_validate(
        {**cfg.model_dump(), "data": {**cfg.data.model_dump(), **_data_fields(kind, path)}}
    )
    logs = Distiller(cfg, progress=False).run()
    assert torch.isfinite(torch.tensor(logs["loss_fake"]))


def _data_fields(kind, path):
    fields = {}
    for item in data_overrides(kind, path):
        key, _, value = item.partition("=")
        fields[key.removeprefix("data.")] = int(value) if value.isdigit() else value
    fields["resolution"] = 64
    fields["min_side"] = 8  # the test images are smaller than the resolution; upscale them
    return fields


def test_text_cache_runs_without_text_encoders(tiny_folder, tmp_path):
    folder, data = tiny_folder("sd3", "a"), write_image_dataset(tmp_path / "data")
    live = family_cfg("sd3", folder, data, tmp_path / "live", "schedule.iterations=2")
    adapter = build_adapter(live)
    prompts = [f"a photo of thing number {i}" for i in range(6)] + ["a red cat"]
    write_text_cache(adapter, prompts, tmp_path / "cache", progress=False)
    cache = TextCache.open(tmp_path / "cache", adapter)
    cached, fresh = cache.lookup([*prompts[::-1], ""]), adapter.encode_text([*prompts[::-1], ""])
    for key, value in fresh.tensors.items():
        torch.testing.assert_close(cached.tensors[key], value, rtol=1e-5, atol=1e-6)
    run = family_cfg(
        "sd3",
        folder,
        data,
        tmp_path / "cached",
        "schedule.iterations=2",
        f"model.text_cache={tmp_path / 'cache'}",
    )
    trainer = Distiller(run, progress=False)
    trainer.run()
    assert trainer.adapter._text is None  # the text encoders were never loaded
    reference = Distiller(live, progress=False).run()
    for key, value in reference.items():
        if key.startswith("loss_"):
            assert trainer.last_logs[key] == pytest.approx(value, rel=1e-4), key
    # another folder's text encoders: the cache is stale, said in one error naming the command
    other = family_cfg(
        "sd3", tiny_folder("sd3", "b"), data, tmp_path / "x", f"model.text_cache={tmp_path / 'cache'}"
    )
    with pytest.raises(ValueError, match="cache-text"):
        build_adapter(other)


def test_latent_cache_feeds_latents_from_the_teachers_vae(tiny_folder, tmp_path):
    folder, data = tiny_folder("sdxl", "a"), write_image_dataset(tmp_path / "data")
    common = [f"model.teacher={folder}", f"data.path={data}", *SMALL]
    assert main(["cache-latents", RECIPES["sdxl"], *common, "--out", str(tmp_path / "latents")]) == 0
    cache = f"data.latent_cache={tmp_path / 'latents'}"
    cfg = family_cfg("sdxl", folder, data, tmp_path / "run", cache, "schedule.iterations=2")
    trainer = Distiller(cfg, progress=False)
    batch = trainer.data.batch(0)
    assert batch.images is None and batch.latents is not None
    live = Distiller(family_cfg("sdxl", folder, data, tmp_path / "live"), progress=False).data.batch(0)
    torch.testing.assert_close(
        batch.latents, trainer.adapter.encode_pixels(live.images), rtol=1e-4, atol=1e-4
    )
    trainer.run()
    # a cache written with another teacher's VAE is refused at start-up
    other = family_cfg(
        "sdxl", tiny_folder("sdxl", "b"), data, tmp_path / "y", f"data.latent_cache={tmp_path / 'latents'}"
    )
    with pytest.raises(ValueError, match="cache-latents"):
        Distiller(other, progress=False)


def test_weight_variant_is_honoured(tmp_path):
    folder = write_tiny_teacher(tmp_path / "teacher", "flux", "a", weight_variant="fp16")
    data = write_image_dataset(tmp_path / "data")
    adapter = build_adapter(family_cfg("flux", folder, data, tmp_path / "run", "model.variant=fp16"))
    assert all(".fp16." in f.name for f in adapter.weight_files())
    nets = build_networks(adapter)
    assert next(nets.teacher.parameters()).dtype == torch.float32  # stored fp16, loaded as the recipe says
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.safetensors"):
        build_adapter(family_cfg("flux", folder, data, tmp_path / "run")).weight_files()
