"""The registry's stream builders, one per ``data.kind``: ``builder(cfg, rank, world)``."""

from __future__ import annotations

from senseflow.config.schema import DistillConfig
from senseflow.data.index import SampleIndex, folder_index, json_index, prompt_list, table_index
from senseflow.data.streams import ImageStream, PromptStream


def image_stream(cfg: DistillConfig, index: SampleIndex, rank: int, world: int) -> ImageStream:
    """The common image stream over ``index`` with the recipe's data settings (and latent cache)."""
    d = cfg.data
    stream = ImageStream(index, d.resolution, d.batch_size, cfg.seed, rank, world, d.crop, d.min_side)
    if d.latent_cache:
        stream.use_latent_cache(d.latent_cache)
    return stream


def build_json_stream(cfg: DistillConfig, rank: int, world: int) -> ImageStream:
    return image_stream(cfg, json_index(cfg.data.path), rank, world)


def _table(kind: str):
    def build(cfg: DistillConfig, rank: int, world: int) -> ImageStream:
        d = cfg.data
        return image_stream(cfg, table_index(kind, d.path, d.prompt_column, d.image_column), rank, world)

    build.__name__ = f"build_{kind}_stream"
    return build


build_jsonl_stream = _table("jsonl")
build_csv_stream = _table("csv")
build_tsv_stream = _table("tsv")


def build_folder_stream(cfg: DistillConfig, rank: int, world: int) -> ImageStream:
    return image_stream(cfg, folder_index(cfg.data.path), rank, world)


def build_webdataset_stream(cfg: DistillConfig, rank: int, world: int) -> ImageStream:
    from senseflow.data.webdataset import TarIndex

    return image_stream(cfg, TarIndex(cfg.data.path), rank, world)


def build_hf_stream(cfg: DistillConfig, rank: int, world: int) -> ImageStream:
    from senseflow.data.hf import HFIndex

    d = cfg.data
    return image_stream(cfg, HFIndex(d.path, d.prompt_column, d.image_column), rank, world)


def build_prompt_stream(cfg: DistillConfig, rank: int, world: int) -> PromptStream:
    source, prompts = prompt_list(cfg.data.path)
    return PromptStream(source, prompts, cfg.data.batch_size, cfg.seed, rank, world)
