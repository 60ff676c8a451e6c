"""The data kinds read from files: one stream, one geometry, one order and one bad-sample policy for
every format, and start-up errors that name the file or field at fault."""

from __future__ import annotations

import io
import json
import shutil
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from senseflow.config import ConfigError
from senseflow.config.registry import data_kind_spec
from senseflow.data import DataWarning, ImageStream, crop_geometry
from senseflow.data.images import load_image, resize_and_crop
from senseflow.data.index import folder_index
from senseflow.data.webdataset import expand_braces
from senseflow.families.toy.data import ScenePool, ShapesStream
from senseflow.train.cache_cli import dataset_prompts
from senseflow.train.data import BatchLoader, build_stream, stream_identity
from tests.data_helpers import (
    RESOLUTION,
    SIZES,
    data_cfg,
    picture,
    png_bytes,
    samples,
    write_dataset,
    write_images,
    write_parquet,
    write_shard,
)

IMAGE_KINDS = ("json", "jsonl", "csv", "tsv", "folder", "webdataset", "hf", "parquet")


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Parquet files are converted into the datasets cache: keep it inside the test's folder."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def reference(image: Image.Image, resolution: int = RESOLUTION) -> tuple[torch.Tensor, tuple, tuple]:
    """The center crop computed by hand: PIL bicubic resize of the short side, then the middle."""
    w, h = image.size
    if h <= w:
        new_h, new_w = resolution, round(w * resolution / h)
    else:
        new_h, new_w = round(h * resolution / w), resolution
    top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=None)
    crop = np.asarray(resized.crop((left, top, left + resolution, top + resolution)), dtype=np.float32)
    return torch.from_numpy(crop).permute(2, 0, 1) / 127.5 - 1, (h, w), (top, left)


# ------------------------------------------------------------------------------------------ geometry


def test_crop_geometry_by_hand():
    c = crop_geometry(300, 400, 100)  # landscape: height is the short side
    assert c.original_size == (300, 400) and c.resized_size == (100, 133) and c.top_left == (0, 16)
    c = crop_geometry(500, 200, 100)  # portrait
    assert c.resized_size == (250, 100) and c.top_left == (75, 0)
    assert crop_geometry(64, 64, 32).top_left == (0, 0)
    c = crop_geometry(10, 30, 20)  # smaller than the resolution: upscaled
    assert c.resized_size == (20, 60) and c.top_left == (0, 20)
    corners = {crop_geometry(100, 300, 50, np.random.default_rng(s)).top_left for s in range(40)}
    assert all(t == 0 and 0 <= left <= 100 for t, left in corners) and len(corners) > 10


def test_resize_and_crop_against_a_hand_computation():
    image = picture(40, 30, 0)
    pixels, crop = resize_and_crop(image, RESOLUTION)
    expected, size, corner = reference(image)
    assert pixels.shape == (3, RESOLUTION, RESOLUTION) and pixels.dtype == torch.float32
    assert torch.equal(pixels, expected)
    assert crop.original_size == size == (30, 40) and crop.top_left == corner == (0, 2)
    assert pixels.min() >= -1 and pixels.max() <= 1


def test_images_become_rgb_with_their_exif_orientation(tmp_path):
    grey = Image.fromarray(np.full((20, 30), 200, dtype=np.uint8), mode="L")
    grey.save(tmp_path / "grey.png")
    assert load_image(str(tmp_path / "grey.png"), 1).mode == "RGB"
    rotated = picture(30, 20, 1)
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    rotated.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(str(tmp_path / "rot.jpg"), 1).size == (20, 30)


def _encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def test_16_bit_and_float_grayscale_images_keep_their_tones():
    levels = np.linspace(0, 65535, 20 * 30).round().astype(np.uint16).reshape(20, 30)
    png16 = Image.fromarray(levels)  # a 16-bit grayscale PNG, as scanners and renderers write them
    assert png16.mode == "I;16"
    data = _encoded(png16, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    rgb = np.asarray(load_image(data, 1))
    expected = np.rint(levels / 257.0).astype(np.uint8)  # by the range of the mode: 65535 -> 255
    assert rgb.shape == (20, 30, 3) and (rgb == expected[..., None]).all()
    assert rgb.min() == 0 and rgb.max() == 255 and np.median(rgb) < 160  # not washed out to white

    # 32-bit integers: the smallest of 255 and 65535 that holds the largest value
    wide = (levels // 2).astype(np.int32)
    assert Image.open(io.BytesIO(_encoded(Image.fromarray(wide), "TIFF"))).mode == "I"
    got = np.asarray(load_image(_encoded(Image.fromarray(wide), "TIFF"), 1))[..., 0]
    assert (got == np.rint(wide * (255 / 65535)).astype(np.uint8)).all()
    dark = np.arange(600, dtype=np.int32).reshape(20, 30) % 256  # already in 8-bit range: unchanged
    assert (np.asarray(load_image(_encoded(Image.fromarray(dark), "TIFF"), 1))[..., 0] == dark).all()
    # floats in [0, 1] (negatives become 0)
    unit = levels.astype(np.float32) / 65535 - np.float32(0.1)
    got = np.asarray(load_image(_encoded(Image.fromarray(unit), "TIFF"), 1))[..., 0]
    assert (got == np.rint(np.clip(unit.astype(np.float64), 0, 1) * 255).astype(np.uint8)).all()


# ------------------------------------------------------------------------------------------ every kind


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_every_kind_yields_the_hand_computed_samples(kind, tmp_path):
    items = samples()
    path = write_dataset(kind, tmp_path / kind, items)
    stream = build_stream(data_cfg(kind, path, batch_size=len(items)))
    assert isinstance(stream, ImageStream) and stream.identity.startswith(
        f"{'hf' if kind == 'parquet' else kind}/"
    )
    batch = stream.batch(0)  # one epoch: every sample once
    assert sorted(batch.prompts) == sorted(p for _, p, _ in items)
    assert batch.images.shape == (len(items), 3, RESOLUTION, RESOLUTION) and batch.latents is None
    got = {p: j for j, p in enumerate(batch.prompts)}
    for _, prompt, image in items:
        expected, size, corner = reference(image)
        j = got[prompt]
        assert torch.equal(batch.images[j], expected), prompt
        assert batch.meta["original_size"][j].tolist() == list(size)
        assert batch.meta["crop_top_left"][j].tolist() == list(corner)
        assert batch.keys[j].endswith(f"|{RESOLUTION}px|{corner[0]},{corner[1]}")
    assert stream.skipped == 0


def test_keys_name_the_official_key_the_file_or_the_member(tmp_path):
    def first_keys(kind):
        path = write_dataset(kind, tmp_path / kind)
        return sorted(
            k.split("|")[0] for k in build_stream(data_cfg(kind, path, batch_size=len(SIZES))).batch(0).keys
        )

    assert first_keys("json")[0] == "s000"
    assert first_keys("csv")[0] == "img/s000.png"
    assert first_keys("folder")[0] == "a/s001.png"
    assert first_keys("webdataset")[0] == "00000.tar/s000"
    assert first_keys("hf")[0] == "row0"


def test_tar_ids_keep_the_shard_folder_so_same_named_shards_differ(tmp_path):
    laion = [(f"{n:06d}", f"laion caption {n}", picture(20, 20, n)) for n in range(3)]
    coyo = [(f"{n:06d}", f"coyo caption {n}", picture(20, 20, 10 + n)) for n in range(3)]
    write_shard(tmp_path / "d" / "laion" / "00000.tar", laion)
    write_shard(tmp_path / "d" / "coyo" / "00000.tar", coyo)
    stream = build_stream(data_cfg("webdataset", str(tmp_path / "d" / "{laion,coyo}" / "00000.tar")))
    assert sorted(stream.index.ids) == sorted(
        [f"laion/00000.tar/{n:06d}" for n in range(3)] + [f"coyo/00000.tar/{n:06d}" for n in range(3)]
    )
    batch = build_stream(
        data_cfg("webdataset", str(tmp_path / "d" / "{laion,coyo}" / "00000.tar"), batch_size=6)
    )
    by_prompt = dict(zip(batch.batch(0).prompts, batch.batch(0).keys, strict=True))
    assert by_prompt["coyo caption 1"].startswith("coyo/00000.tar/000001|")
    # the same shard listed twice is the same images under the same ids: allowed
    twice = build_stream(data_cfg("webdataset", str(tmp_path / "d" / "laion" / "{00000,00000}.tar")))
    assert len(twice.index) == 6


def test_an_id_naming_two_images_is_refused_at_start_up(tmp_path):
    items = samples()[:5]
    folder = tmp_path / "j"
    paths = write_images(folder, items)
    path = folder / "dup.json"
    keys = ["a", "b", "a", "c", "b"]
    path.write_text(json.dumps({"keys": keys, "image_paths": paths, "prompts": ["x"] * 5}))
    with pytest.raises(
        ValueError,
        match=r"dup\.json: 2 sample id\(s\) name more than one image.*'a' \(.*img/s000\.png, "
        r".*img/s002\.png\); 'b' \(.*s001\.png, .*s004\.png\); make the ids unique",
    ):
        build_stream(data_cfg("json", path))
    # one image listed twice (two captions) keeps one id and one image: allowed
    path.write_text(
        json.dumps(
            {
                "keys": ["a", "a", "b"],
                "image_paths": [paths[0], paths[0], paths[1]],
                "prompts": ["x", "y", "z"],
            }
        )
    )
    assert sorted(build_stream(data_cfg("json", path, batch_size=3)).batch(0).prompts) == ["x", "y", "z"]
    table = folder / "twice.csv"
    table.write_text(f"file,caption\n{paths[0]},one\n{paths[0]},two\n")
    assert len(build_stream(data_cfg("csv", table)).index) == 2


def test_webdataset_reads_a_single_tar_and_a_folder_of_tars(tmp_path):
    items = samples()
    write_shard(tmp_path / "one" / "only.tar", items)
    single = build_stream(data_cfg("webdataset", tmp_path / "one" / "only.tar", batch_size=len(items)))
    write_dataset("webdataset", tmp_path / "many", items)
    folder = build_stream(data_cfg("webdataset", tmp_path / "many", batch_size=len(items)))
    a, b = single.batch(0), folder.batch(0)
    assert sorted(a.prompts) == sorted(b.prompts)
    order = [b.prompts.index(p) for p in a.prompts]
    assert torch.equal(a.images, b.images[order])


def test_brace_patterns_expand_like_the_shell():
    assert expand_braces("s/{00008..00011}.tar") == [f"s/{n:05d}.tar" for n in range(8, 12)]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_hf_reads_a_bytes_column(tmp_path):
    import datasets

    items = samples()[:3]

    datasets.Dataset.from_dict(
        {"file": [png_bytes(im) for _, _, im in items], "caption": [p for _, p, _ in items]}
    ).save_to_disk(str(tmp_path / "ds"))
    cfg = data_cfg("hf", tmp_path / "ds", "data.image_column=file", batch_size=3)
    batch = build_stream(cfg).batch(0)
    for _, prompt, image in items:
        assert torch.equal(batch.images[batch.prompts.index(prompt)], reference(image)[0])


def test_hf_parquet_folders_read_the_train_split_only(tmp_path):
    items = samples()
    hub = tmp_path / "hub"
    write_parquet(hub / "data" / "train-00000-of-00002.parquet", items[:2])
    write_parquet(hub / "data" / "train-00001-of-00002.parquet", items[2:4])
    write_parquet(hub / "data" / "test-00000-of-00001.parquet", items[4:6])
    write_parquet(hub / "data" / "validation-00000-of-00001.parquet", items[6:])
    train = sorted(p for _, p, _ in items[:4])
    with pytest.warns(
        DataWarning,
        match=r"reading the train split's 2 parquet file\(s\) \(data/train-00000-of-00002\.parquet, "
        r"data/train-00001-of-00002\.parquet\); left out: test \(1 file\(s\)\), validation \(1 file\(s\)\)",
    ):
        stream = build_stream(data_cfg("hf", hub, batch_size=4))
    assert sorted(stream.batch(0).prompts) == train and len(stream.index) == 4
    assert [p.name for p in stream.index.files] == [
        "train-00000-of-00002.parquet",
        "train-00001-of-00002.parquet",
    ]

    folders = tmp_path / "folders"
    write_parquet(folders / "train" / "0000.parquet", items[:4])
    write_parquet(folders / "valid" / "0000.parquet", items[4:])
    with pytest.warns(DataWarning, match=r"train/0000\.parquet\); left out: validation \(1 file"):
        assert sorted(build_stream(data_cfg("hf", folders, batch_size=4)).batch(0).prompts) == train

    # a glob pattern and a single file are taken as given
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        every = build_stream(data_cfg("hf", str(hub / "data" / "*.parquet"), batch_size=len(items)))
        assert sorted(every.batch(0).prompts) == sorted(p for _, p, _ in items)
        one = build_stream(data_cfg("hf", hub / "data" / "test-00000-of-00001.parquet", batch_size=2))
        assert sorted(one.batch(0).prompts) == sorted(p for _, p, _ in items[4:6])
        plain = tmp_path / "plain"  # no split named: every file
        write_parquet(plain / "part-a.parquet", items[:3])
        write_parquet(plain / "part-b.parquet", items[3:])
        assert len(build_stream(data_cfg("hf", plain)).index) == len(items)
    with pytest.raises(FileNotFoundError, match=r"the pattern .*\*\.nothing matches no file"):
        build_stream(data_cfg("hf", str(hub / "*.nothing")))
    (hub / "data" / "train-00000-of-00002.parquet").unlink()
    (hub / "data" / "train-00001-of-00002.parquet").unlink()
    with pytest.raises(ValueError, match=r"named for the splits test, validation; expected a 'train' split"):
        build_stream(data_cfg("hf", hub))


def test_a_missing_datasets_package_is_one_clear_error(tmp_path, monkeypatch):
    path = write_dataset("hf", tmp_path / "hf", samples()[:2])
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"pip install senseflow\[data\]"):
        build_stream(data_cfg("hf", path))


# ------------------------------------------------------------------------------------------ order


def test_the_global_batch_is_the_same_for_any_world_size(tmp_path):
    path = write_dataset("folder", tmp_path / "f")  # 7 samples: batches cross epoch ends
    global_batch = 4
    for i in range(5):
        whole = build_stream(data_cfg("folder", path, batch_size=global_batch)).batch(i)
        for world in (2, 4):
            parts = [
                build_stream(data_cfg("folder", path, batch_size=global_batch // world), rank, world).batch(i)
                for rank in range(world)
            ]
            assert [k for p in parts for k in p.keys] == whole.keys
            assert torch.equal(torch.cat([p.images for p in parts]), whole.images)


def test_each_epoch_is_a_permutation_and_epochs_differ(tmp_path):
    path = write_dataset("folder", tmp_path / "f")
    stream = build_stream(data_cfg("folder", path, batch_size=1))
    n = len(SIZES)
    epochs = [[stream.batch(e * n + k).keys[0] for k in range(n)] for e in range(3)]
    assert all(sorted(e) == sorted(epochs[0]) and len(set(e)) == n for e in epochs)
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]
    other_seed = build_stream(data_cfg("folder", path, "seed=1", batch_size=1))
    assert [other_seed.batch(k).keys[0] for k in range(n)] != epochs[0]


def test_resume_and_prefetching_give_the_same_batches(tmp_path):
    items = samples()
    path = write_dataset("json", tmp_path / "j", items)
    (tmp_path / "j" / "img" / "s002.png").write_bytes(b"not a png")  # a bad sample in the mix
    cfg = data_cfg("json", path, "data.crop=random", batch_size=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        straight = build_stream(cfg)
        seen = [straight.batch(i) for i in range(6)]
        resumed = build_stream(cfg)
        for i in (4, 2, 5):
            b = resumed.batch(i)
            assert b.keys == seen[i].keys and torch.equal(b.images, seen[i].images)
            assert torch.equal(b.meta["crop_top_left"], seen[i].meta["crop_top_left"])
        loader = BatchLoader(build_stream(cfg), num_workers=2, stop=6)
        try:
            for i in (1, 2, 3):
                b = loader.batch(i)
                assert b.keys == seen[i].keys and torch.equal(b.images, seen[i].images)
        finally:
            loader.close()


def test_random_crops_are_drawn_per_sample_and_visit_and_repeat_exactly(tmp_path):
    items = [(f"s{i}", f"p{i}", picture(60, 20, i)) for i in range(4)]  # room to move sideways
    path = write_dataset("json", tmp_path / "j", items)
    cfg = data_cfg("json", path, "data.crop=random", batch_size=4)
    stream = build_stream(cfg)
    corners = [stream.batch(i).meta["crop_top_left"] for i in range(3)]
    assert all(((c[:, 0] == 0) & (c[:, 1] >= 0) & (c[:, 1] <= 60 - RESOLUTION * 1)).all() for c in corners)
    assert len({tuple(x) for c in corners for x in c.tolist()}) > 3
    again = build_stream(cfg)
    assert all(torch.equal(again.batch(i).meta["crop_top_left"], corners[i]) for i in range(3))
    b = again.batch(0)
    for j, prompt in enumerate(b.prompts):
        image = items[int(prompt[1:])][2].resize((48, 16), Image.Resampling.BICUBIC, reducing_gap=None)
        top, left = b.meta["crop_top_left"][j].tolist()
        crop = np.asarray(image.crop((left, top, left + 16, top + 16)), dtype=np.float32)
        assert torch.equal(b.images[j], torch.from_numpy(crop).permute(2, 0, 1) / 127.5 - 1)
        assert b.keys[j].endswith(f"|16px|{top},{left}")


# ------------------------------------------------------------------------------------------ bad samples


def test_the_identity_names_kind_content_resolution_and_crop(tmp_path):
    path = write_dataset("folder", tmp_path / "f")
    base = stream_identity(build_stream(data_cfg("folder", path)))
    kind, fingerprint, size, resolution, crop, min_side, _ = base.split("/")
    assert (kind, size, resolution, crop, min_side) == ("folder", "n7", "16px", "center", "min16")
    assert stream_identity(build_stream(data_cfg("folder", path, "data.crop=random"))) != base
    assert stream_identity(build_stream(data_cfg("folder", path, resolution=32, batch_size=2))) != base
    moved = tmp_path / "moved"
    shutil.copytree(path, moved)
    assert stream_identity(build_stream(data_cfg("folder", moved))) == base  # content, not location
    (moved / "a" / "s001.txt").write_text("another caption")
    assert stream_identity(build_stream(data_cfg("folder", moved))) != base
    assert folder_index(str(moved)).fingerprint() != fingerprint


# ------------------------------------------------------------------------------------------ prompts kind


def _prompt_cfg(path, *extra, batch_size=2):
    return data_cfg(
        "prompts", path, "method.backward_sim_prob=1.0", "method.gan.type=none", *extra, batch_size=batch_size
    )


def test_prompts_kind_gives_prompts_only_batches(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a red fox\n\n  a blue bird  \na green frog\n")
    stream = build_stream(_prompt_cfg(txt, batch_size=3))
    batch = stream.batch(0)
    assert batch.prompts_only and batch.images is None and batch.latents is None
    assert sorted(batch.prompts) == ["a blue bird", "a green frog", "a red fox"]
    listed = tmp_path / "p.json"
    listed.write_text(json.dumps(["a red fox", "a blue bird", "a green frog"]))
    split = [build_stream(_prompt_cfg(listed, batch_size=1), r, 3).batch(5).prompts[0] for r in range(3)]
    assert split == build_stream(_prompt_cfg(listed, batch_size=3)).batch(5).prompts
    assert stream_identity(stream).startswith("prompts/")
    (tmp_path / "none.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no prompt"):
        build_stream(_prompt_cfg(tmp_path / "none.txt"))


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["method.gan.type=none"], r"method\.backward_sim_prob is 0\.5 \(needs 1\.0\)"),
        (["method.backward_sim_prob=1.0"], r"method\.gan\.type is 'vfm' \(needs none\)"),
        ([], r"method\.backward_sim_prob .* and method\.gan\.type"),
    ],
)
def test_prompts_kind_refuses_runs_that_need_real_images(tmp_path, overrides, named):
    txt = tmp_path / "p.txt"
    txt.write_text("a red fox\n")
    with pytest.raises(ConfigError, match=r"data\.kind: 'prompts' gives prompts only.*" + named):
        data_cfg("prompts", txt, *overrides)


# ------------------------------------------------------------------------------------------ registry


def test_registry_entries_and_the_fields_they_read():
    image = {"path", "num_workers", "crop", "min_side", "latent_cache"}
    for name in ("json", "folder", "webdataset"):
        assert data_kind_spec(name).reads == image
    for name in ("jsonl", "csv", "tsv", "hf"):
        assert data_kind_spec(name).reads == image | {"prompt_column", "image_column"}
    assert (
        data_kind_spec("prompts").reads == {"path", "num_workers"} and data_kind_spec("prompts").prompts_only
    )
    assert data_kind_spec("latent_lmdb").builder is None


def test_fields_a_kind_does_not_read_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.prompt_column: data kind 'folder' does not read it"):
        data_cfg("folder", tmp_path, "data.prompt_column=text")
    with pytest.raises(ConfigError, match=r"data\.crop: data kind 'prompts' does not read it"):
        _prompt_cfg(tmp_path / "p.txt", "data.crop=random")


# ------------------------------------------------------------------------------------------ toy kind


def test_the_toy_stream_lists_the_prompt_pool_it_draws_from(tmp_path):
    from tests.trainer_helpers import RECIPE as TOY_RECIPE

    stream = ShapesStream("train", 8, seed=0)
    pool = stream.prompts()
    assert len(pool) == len(set(pool)) == 2697  # 28 one-object and 2,669 two-object scenes
    assert {p for i in range(20) for p in stream.batch(i).prompts} <= set(pool)
    assert set(ScenePool("train", 0.0).prompts()) == {s.prompt for s in ScenePool("train").pairs}
    assert set(ScenePool("train", 1.0).prompts()) == {s.prompt for s in ScenePool("train").singles}
    # cache-text reads the pool instead of rendering the run's batches
    from senseflow.config import load_config

    cfg = load_config(TOY_RECIPE, ["schedule.iterations=100000"])
    assert dataset_prompts(cfg, progress=False) == pool
