"""``senseflow cache-text RECIPE [overrides] [--prompts FILE] [--out DIR]``: run the text encoders once.

The prompts are the recipe's dataset prompts, the empty prompt and ``model.negative_prompt`` (CFG's
unconditional branch), ``logging.sample_prompts``, and any ``--prompts`` files. A run with
``model.text_cache=DIR`` then reads its encodings from the folder and never loads the text encoders.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

from tqdm.auto import tqdm

from senseflow import inputs
from senseflow.config import load_config
from senseflow.config.schema import DistillConfig
from senseflow.data.index import read_prompt_list


def dataset_prompts(cfg: DistillConfig, world: int = 1, progress: bool = True) -> list[str]:
    """Every prompt the recipe's data stream can hand the trainer.

    A stream that lists its prompts (``prompts()``) answers directly; for any other stream (the toy
    stream draws from its scene pool without end) the prompts of the run's ``schedule.iterations``
    batches on each of ``world`` ranks are read.
    """
    from senseflow.train.data import build_stream

    if getattr(cfg.data, "latent_cache", None):  # prompts only: the latent cache may not exist yet
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"latent_cache": None})})
    stream = build_stream(cfg, 0, world)
    listed = getattr(stream, "prompts", None)
    if callable(listed):
        return list(listed())
    out: list[str] = []
    iterations = cfg.schedule.iterations
    bar = tqdm(total=iterations * world, desc="prompts", unit="batch", disable=not progress)
    for rank in range(world):
        if rank:
            stream = build_stream(cfg, rank, world)
        for i in range(iterations):
            out.extend(stream.batch(i).prompts)
            bar.update(1)
    bar.close()
    return out


def _distinct(prompts: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(prompts))


def cmd_cache_text(args: argparse.Namespace) -> None:
    from senseflow.devices import resolve_device
    from senseflow.models import build_adapter
    from senseflow.models.text_cache_write import write_text_cache

    if args.world < 1:
        raise ValueError("cache-text: --world must be at least 1")
    inputs.at_least(args.batch_size, 1, "--batch-size")
    inputs.at_least(args.shard_size, 1, "--shard-size")
    cfg = load_config(args.recipe, list(args.overrides))
    if args.out:
        out = inputs.output_folder(args.out, "--out")
    elif cfg.model.text_cache != "live":
        out = inputs.output_folder(cfg.model.text_cache, "model.text_cache")
    else:
        raise ValueError(
            "cache-text: no output folder: pass --out DIR, or set model.text_cache to a folder in the recipe"
        )
    extra = [p for path in args.prompts or [] for p in read_prompt_list(Path(path), "--prompts")]
    device = resolve_device(args.device, "--device") if args.device else resolve_device(cfg.parallel.device)
    prompts: list[str] = ["", *([cfg.model.negative_prompt] if cfg.model.negative_prompt else [])]
    if not args.skip_dataset:
        prompts += dataset_prompts(cfg, world=args.world, progress=not args.quiet)
    prompts += list(cfg.logging.sample_prompts)
    prompts = _distinct([*prompts, *extra])

    adapter = build_adapter(cfg, text_cache=False).to(device)
    report = write_text_cache(
        adapter,
        prompts,
        out,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        progress=not args.quiet,
    )
    state = "rebuilt (the text encoders changed)" if report.rebuilt else f"{report.present} already there"
    print(
        f"text cache {report.folder}: {report.count} prompts ({report.added} added, {state}; "
        f"{report.shards_written} new shards), id {report.identity_hash}; train with "
        f"model.text_cache={out}"
    )
    write_discriminator_text(cfg, prompts, out, device, args)


def write_discriminator_text(cfg: DistillConfig, prompts: list[str], out: Path, device, args) -> None:
    """The discriminator's own text embeddings (the VFM's CLIP features), as a group of the same cache,
    when the recipe's discriminator has a text encoder: training then holds no text tower at all."""
    from senseflow.config.registry import discriminator_spec, resolve_builder
    from senseflow.models.text_cache_write import write_tensor_group

    spec = discriminator_spec(cfg.method.gan.type)
    if spec is None or spec.text_encoder is None:
        return
    encoder = resolve_builder(spec, "method.gan.type", attribute="text_encoder")(cfg.method.gan).to(device)
    report = write_tensor_group(
        out,
        encoder.group,
        encoder.identity(),
        encoder.encode,
        prompts,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        progress=not args.quiet,
    )
    print(f"  + discriminator text ({encoder.group}): {report.count} prompts ({report.added} added)")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "cache-text",
        help="encode a recipe's prompts once into a text cache (train with model.text_cache=DIR)",
    )
    p.add_argument("recipe", help="recipe YAML, or a shipped recipe's name")
    p.add_argument("overrides", nargs="*", default=[], help="dotted overrides, as for `senseflow train`")
    p.add_argument(
        "--prompts",
        action="append",
        metavar="FILE",
        help="more prompts: one per line, or a JSON list (may be given several times)",
    )
    p.add_argument("--out", metavar="DIR", help="cache folder (default: the recipe's model.text_cache)")
    p.add_argument(
        "--skip-dataset",
        action="store_true",
        help="only the empty prompt, logging.sample_prompts and the --prompts files",
    )
    p.add_argument(
        "--world",
        type=int,
        default=1,
        help="ranks the run will use (read for streams that do not list their prompts)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="prompts encoded at once")
    p.add_argument(
        "--shard-size", type=int, default=None, help="prompts per shard (default: up to 4096 and ~1 GiB)"
    )
    p.add_argument("--device", default=None, help="where the text encoders run (default: parallel.device)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_cache_text)
