"""Bad training data: unreadable, truncated or too-small images are skipped and counted, and start-up
errors (missing files, mismatched lists, columns, empty shards) name the file or field."""

from __future__ import annotations

import json
import warnings

import pytest

from senseflow.config import ConfigError
from senseflow.data import BadImage, DataWarning
from senseflow.data.images import load_image
from senseflow.train.data import build_stream
from tests.data_helpers import (
    data_cfg,
    picture,
    png_bytes,
    samples,
    write_dataset,
    write_images,
    write_members,
    write_shard,
)

IMAGE_KINDS = ("json", "jsonl", "csv", "tsv", "folder", "webdataset", "hf", "parquet")


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Parquet files are converted into the datasets cache: keep it inside the test's folder."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def test_bad_images_are_skipped_counted_and_named_once(tmp_path):
    items = samples()
    path = write_dataset("json", tmp_path / "j", items)
    img = tmp_path / "j" / "img"
    (img / "s001.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # corrupt
    picture(80, 60, 3).save(img / "s003.jpg")
    (img / "s003.png").write_bytes((img / "s003.jpg").read_bytes()[:200])  # truncated
    picture(15, 40, 5).save(img / "s005.png")  # short side 15 < 16
    cfg = data_cfg("json", path, batch_size=2)
    stream = build_stream(cfg)
    with pytest.warns(DataWarning) as caught:
        batches = [stream.batch(i) for i in range(8)]  # > 2 epochs: every file is met, some twice
    named = sorted(str(w.message).split(": ")[1].removeprefix("skipped ") for w in caught)
    assert named == sorted(str(img / f) for f in ("s001.png", "s003.png", "s005.png"))
    assert "too small (15x40" in " ".join(str(w.message) for w in caught)
    assert stream.skipped == 3
    good = {"s000", "s002", "s004", "s006"}
    assert {k.split("|")[0] for b in batches for k in b.keys} == good
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        fresh = build_stream(cfg)
        assert all(fresh.batch(i).keys == batches[i].keys for i in (7, 3, 0))
    # a lower data.min_side keeps the small one (upscaled)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        lenient = build_stream(data_cfg("json", path, "data.min_side=8", batch_size=7))
        assert "s005" in {k.split("|")[0] for k in lenient.batch(0).keys} and lenient.skipped == 2


def test_a_dataset_without_one_good_image_is_an_error(tmp_path):
    path = write_dataset("folder", tmp_path / "f", samples([(8, 8), (10, 9), (30, 12)]))
    stream = build_stream(data_cfg("folder", path))
    with (
        pytest.warns(DataWarning) as caught,
        pytest.raises(
            ValueError,
            match=r"none of the 3 samples has a usable image; 3 of them are smaller than data\.min_side=16 "
            r"\(short sides 8 to 12 px\), the likely cause: lower data\.min_side",
        ),
    ):
        stream.batch(0)
    assert len(caught) == 1  # one summary, not one warning per image
    assert "skipped all 3 samples (3 smaller than data.min_side=16): " in str(caught[0].message)
    # unreadable and too small images are counted apart; only unreadable ones: data.min_side is not named
    (path / "a" / "s001.png").write_bytes(b"broken")
    stream = build_stream(data_cfg("folder", path, "data.min_side=13"))
    with pytest.warns(DataWarning) as caught, pytest.raises(ValueError) as error:
        stream.batch(0)
    assert len(caught) == 1 and "(2 smaller than data.min_side=13, 1 unreadable or unusable)" in str(
        caught[0].message
    )
    assert str(error.value).endswith(
        "2 of them are smaller than data.min_side=13 (short sides 8 to 12 px), "
        "the likely cause: lower data.min_side (smaller images are upscaled to "
        "data.resolution) or use larger images"
    )
    for f in path.rglob("*.png"):
        f.write_bytes(b"broken")
    with pytest.warns(DataWarning, match=r"\(3 unreadable or unusable\)"), pytest.raises(ValueError) as error:
        build_stream(data_cfg("folder", path)).batch(0)
    assert str(error.value) == "data.path: none of the 3 samples has a usable image"


def test_a_truncated_webdataset_member_is_a_bad_sample(tmp_path):
    items = samples()[:3]
    shard = write_shard(tmp_path / "w" / "0.tar", items, extra_json=False)
    stream = build_stream(data_cfg("webdataset", shard, batch_size=3))
    data = bytearray(shard.read_bytes())
    start = data.find(b"IDAT")
    data[start : start + 40] = bytes(40)  # damage the first image's pixel data in place
    shard.write_bytes(bytes(data))
    with pytest.warns(DataWarning, match=r"0\.tar:s000\.png"):
        batch = stream.batch(0)
    assert "prompt number 0" not in batch.prompts and stream.skipped == 1
    assert isinstance(stream.index.read(0), bytes)
    with pytest.raises(BadImage):
        load_image(stream.index.read(0), 1)


def test_tar_keys_without_an_image_are_counted_and_named_once_per_shard(tmp_path):
    items = samples()[:2]
    members = [(f"{k}.png", png_bytes(im)) for k, _, im in items] + [
        (f"{k}.txt", p.encode()) for k, p, _ in items
    ]
    members += [
        ("photo.v2.png", png_bytes(picture(20, 20, 9))),  # key 'photo', member 'v2.png'
        ("photo.v2.txt", b"dotted"),
        ("crop.final.jpg", png_bytes(picture(20, 20, 8))),
        ("lonely.txt", b"a caption without its image"),
    ]
    shard = write_members(tmp_path / "w" / "0.tar", members)
    with pytest.warns(DataWarning) as caught:
        stream = build_stream(data_cfg("webdataset", shard, batch_size=2))
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "0.tar: 3 sample key(s) have no image member (jpg, jpeg, png, webp) and are left out" in message
    assert "2 with a dot in the key, e.g. photo.v2.png" in message
    assert "key 'photo', member 'v2.png'; rename such files, e.g. photo_v2.png" in message
    assert "1 other(s), e.g. key 'lonely' (members: lonely.txt)" in message
    assert sorted(stream.batch(0).prompts) == sorted(p for _, p, _ in items)
    # a shard of dotted keys only: the error says why it holds no sample
    only = write_members(tmp_path / "w" / "1.tar", members[4:6])
    with pytest.raises(
        ValueError, match=r"1\.tar holds no sample .*with a dot in the key, e\.g\. photo\.v2\.png"
    ):
        build_stream(data_cfg("webdataset", only))


# ------------------------------------------------------------------------------------------ start-up errors


def test_missing_image_files_are_counted_and_named_at_start_up(tmp_path):
    path = write_dataset("json", tmp_path / "j")
    for key in ("s001", "s004"):
        (tmp_path / "j" / "img" / f"{key}.png").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"lists 2 image file\(s\) that do not exist: .*s001\.png, .*s004"
    ):
        build_stream(data_cfg("json", path))


def test_json_errors(tmp_path):
    items = samples()[:3]
    folder = tmp_path / "j"
    paths = write_images(folder, items)
    bad = folder / "bad.json"
    bad.write_text(json.dumps({"keys": ["a", "b"], "image_paths": paths, "prompts": ["x"] * 3}))
    with pytest.raises(ValueError, match=r"differ in length \(keys: 2, image_paths: 3, prompts: 3\)"):
        build_stream(data_cfg("json", bad))
    bad.write_text(json.dumps({"keys": ["a"], "prompts": ["x"]}))
    with pytest.raises(ValueError, match="keys, image_paths, prompts"):
        build_stream(data_cfg("json", bad))
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        build_stream(data_cfg("json", bad))
    bad.write_text(json.dumps({"keys": [], "image_paths": [], "prompts": []}))
    with pytest.raises(ValueError, match="holds no sample"):
        build_stream(data_cfg("json", bad))
    with pytest.raises(FileNotFoundError, match=r"data\.path: .*nowhere\.json does not exist"):
        build_stream(data_cfg("json", folder / "nowhere.json"))


def test_a_kind_that_reads_files_needs_data_path():
    with pytest.raises(ConfigError, match=r"data\.path: required for data kind 'folder'"):
        data_cfg("folder", "")


@pytest.mark.parametrize("kind", ["jsonl", "csv", "tsv", "hf"])
def test_missing_columns_name_the_field(kind, tmp_path):
    path = write_dataset(kind, tmp_path / kind, samples()[:2])
    with pytest.raises(ValueError, match=r"data\.prompt_column: .* has no column 'text'"):
        build_stream(data_cfg(kind, path, "data.prompt_column=text"))
    with pytest.raises(ValueError, match=r"data\.image_column: .* has no column 'picture'"):
        build_stream(data_cfg(kind, path, "data.image_column=picture"))


def test_table_errors(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("file,caption\n")
    with pytest.raises(ValueError, match="holds no sample"):
        build_stream(data_cfg("csv", empty))
    lines = tmp_path / "bad.jsonl"
    lines.write_text('{"file": "a.png", "caption": "x"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2 is not a JSON object"):
        build_stream(data_cfg("jsonl", lines))


def test_hf_errors(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"image": [1, 2], "caption": ["a", "b"]}).save_to_disk(str(tmp_path / "ints"))
    with pytest.raises(ValueError, match=r"data\.image_column: .*expected an Image feature or bytes"):
        build_stream(data_cfg("hf", tmp_path / "ints"))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="neither a dataset folder"):
        build_stream(data_cfg("hf", tmp_path / "nothing"))


def test_folder_errors(tmp_path):
    path = write_dataset("folder", tmp_path / "f")
    (path / "a" / "s001.txt").unlink()
    (path / "b" / "s004.txt").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"2 image\(s\) under .* have no \.txt caption.*a/s001\.png, b/s004\.png"
    ):
        build_stream(data_cfg("folder", path))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no image"):
        build_stream(data_cfg("folder", tmp_path / "empty"))


def test_webdataset_errors(tmp_path):
    w = tmp_path / "w"
    w.mkdir()
    empty = write_shard(w / "empty.tar", [])
    with pytest.raises(ValueError, match=r"empty\.tar holds no sample"):
        build_stream(data_cfg("webdataset", empty))
    (w / "junk.tar").write_bytes(b"this is no tar archive" * 40)
    with pytest.raises(ValueError, match=r"junk\.tar is not a readable tar shard"):
        build_stream(data_cfg("webdataset", w / "junk.tar"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        build_stream(data_cfg("webdataset", str(w / "{00000..00003}.tar")))
    write_shard(w / "00000.tar", samples()[:2])
    with pytest.raises(FileNotFoundError, match=r"3 of the 4 shards .* do not exist"):
        build_stream(data_cfg("webdataset", str(w / "{00000..00003}.tar")))
    write_shard(w / "nocap" / "0.tar", samples()[:2], captions=False)
    with pytest.raises(ValueError, match=r"2 image member\(s\) have no <key>\.txt caption"):
        build_stream(data_cfg("webdataset", w / "nocap" / "0.tar"))
    (tmp_path / "none").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no \.tar shard"):
        build_stream(data_cfg("webdataset", tmp_path / "none"))


# ------------------------------------------------------------------------------------------ identity
