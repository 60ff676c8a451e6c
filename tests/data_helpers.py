"""Small image datasets written on the fly in every format the data kinds read."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from senseflow.config import load_config

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "sd35_large.yaml"
RESOLUTION = 16

# (width, height) of the test images: landscape, portrait, square, odd ratios; all >= RESOLUTION.
SIZES = [(40, 30), (24, 48), (16, 16), (33, 17), (50, 20), (20, 21), (64, 32)]


def picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def samples(sizes=SIZES) -> list[tuple[str, str, Image.Image]]:
    """(key, prompt, image) of each test sample."""
    return [(f"s{i:03d}", f"prompt number {i}", picture(w, h, i)) for i, (w, h) in enumerate(sizes)]


def write_images(folder: Path, items) -> list[str]:
    """The images as PNG files under ``folder/img``; their paths relative to ``folder``."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    paths = []
    for key, _, image in items:
        image.save(folder / "img" / f"{key}.png")
        paths.append(f"img/{key}.png")
    return paths


def write_dataset(kind: str, root: Path, items=None) -> Path:
    """``items`` (default :func:`samples`) in the format of ``kind``; returns the data.path."""
    items = samples() if items is None else items
    root.mkdir(parents=True, exist_ok=True)
    keys = [k for k, _, _ in items]
    prompts = [p for _, p, _ in items]
    if kind == "json":
        paths = write_images(root, items)
        path = root / "train.json"
        path.write_text(json.dumps({"keys": keys, "image_paths": paths, "prompts": prompts}))
        return path
    if kind in ("jsonl", "csv", "tsv"):
        paths = write_images(root, items)
        path = root / f"train.{kind}"
        if kind == "jsonl":
            path.write_text(
                "".join(
                    json.dumps({"caption": p, "file": f}) + "\n" for p, f in zip(prompts, paths, strict=True)
                )
            )
        else:
            with path.open("w", newline="") as f:
                writer = csv.writer(f, delimiter="\t" if kind == "tsv" else ",")
                writer.writerow(["file", "caption"])
                writer.writerows(zip(paths, prompts, strict=True))
        return path
    if kind == "folder":
        for key, prompt, image in items:
            sub = root / ("a" if int(key[1:]) % 2 else "b")
            sub.mkdir(exist_ok=True)
            image.save(sub / f"{key}.png")
            (sub / f"{key}.txt").write_text(prompt + "\n")
        return root
    if kind == "webdataset":
        half = (len(items) + 1) // 2
        for number, part in enumerate([items[:half], items[half:]]):
            write_shard(root / f"{number:05d}.tar", part)
        return root / "{00000..00001}.tar"
    if kind == "parquet":
        return write_parquet(root / "train.parquet", items)
    if kind == "hf":
        hf_dataset(items).save_to_disk(str(root / "ds"))
        return root / "ds"
    raise ValueError(kind)


def hf_dataset(items):
    """``items`` as a ``datasets.Dataset`` with an Image column ``image`` and a ``caption``."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    return datasets.Dataset.from_dict(
        {
            "image": [{"bytes": png_bytes(im), "path": None} for _, _, im in items],
            "caption": [p for _, p, _ in items],
        },
        features=features,
    )


def write_parquet(path: Path, items) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    hf_dataset(items).to_parquet(str(path))
    return path


def write_shard(path: Path, items, extra_json: bool = True, captions: bool = True) -> Path:
    """An img2dataset-style tar: ``<key>.png``, ``<key>.txt`` and ``<key>.json`` per sample."""
    members = []
    for key, prompt, image in items:
        members.append((f"{key}.png", png_bytes(image)))
        if captions:
            members.append((f"{key}.txt", prompt.encode()))
        if extra_json:
            members.append((f"{key}.json", json.dumps({"key": key, "caption": prompt}).encode()))
    return write_members(path, members)


def write_members(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar holding exactly ``members`` (name, content), in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


COLUMN_KINDS = ("jsonl", "csv", "tsv", "hf")


def data_overrides(
    kind: str, path, *extra: str, batch_size: int = 2, resolution: int = RESOLUTION
) -> list[str]:
    kind = "hf" if kind == "parquet" else kind
    columns = ["data.prompt_column=caption", "data.image_column=file"] if kind in COLUMN_KINDS else []
    if kind == "hf":
        columns = ["data.prompt_column=caption", "data.image_column=image"]
    return [
        f"data.kind={kind}",
        f"data.path={path}",
        f"data.resolution={resolution}",
        f"data.batch_size={batch_size}",
        "data.num_workers=0",
        *columns,
        *extra,
    ]


def data_cfg(kind: str, path, *extra: str, batch_size: int = 2, resolution: int = RESOLUTION):
    """The SD 3.5 recipe (it trains on any data kind) on a test dataset; no file is read here."""
    return load_config(
        RECIPE, data_overrides(kind, path, *extra, batch_size=batch_size, resolution=resolution)
    )
