"""``senseflow cache-latents RECIPE [overrides]``: encode a recipe's training images once.

Builds the recipe's family adapter and its data stream (without a latent cache), encodes every
sample's center crop with ``adapter.encode_pixels`` (the VAE pass; raw latents, no scale or shift)
and writes them where ``data.latent_cache`` (or ``--out``) says. A run whose recipe sets
``data.latent_cache`` to that folder then reads latents instead of decoding and encoding images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from senseflow import inputs
from senseflow.config import load_config
from senseflow.config.registry import data_kind_spec, resolve_builder
from senseflow.data.latents import check_replaceable, vae_identity, write_latent_cache
from senseflow.data.streams import ImageStream
from senseflow.devices import resolve_device


def cmd_cache_latents(args: argparse.Namespace) -> None:
    inputs.at_least(args.batch_size, 1, "--batch-size")
    inputs.at_least(args.shard_size, 1, "--shard-size")
    cfg = load_config(args.recipe, list(args.overrides))
    out = args.out or cfg.data.latent_cache
    if not out:
        raise ValueError("cache-latents: say where to write the cache: --out DIR or data.latent_cache=DIR")
    inputs.output_folder(out, "--out" if args.out else "data.latent_cache")
    check_replaceable(Path(out).expanduser())  # before the slow part: never over another kind of cache
    if args.device:
        inputs.device(args.device, "--device")
    if cfg.data.crop != "center":
        raise ValueError(
            "data.crop: cache-latents stores each sample's center crop (a random crop differs at every "
            "visit); set data.crop=center for the cache and for the runs that read it"
        )
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"latent_cache": None})})
    spec = data_kind_spec(cfg.data.kind)
    if spec is None:
        raise ValueError(f"data.kind: '{cfg.data.kind}' is not registered")
    stream = resolve_builder(spec, "data.kind")(cfg, 0, 1)
    if not isinstance(stream, ImageStream):
        raise ValueError(f"data.kind: '{cfg.data.kind}' has no fixed list of images to cache")

    from senseflow.models import build_adapter

    device = resolve_device(args.device, "--device") if args.device else resolve_device(cfg.parallel.device)
    adapter = build_adapter(cfg, text_cache=False).to(device)  # only the VAE is used

    def encode(images):
        return adapter.encode_pixels(images.to(device))

    manifest = write_latent_cache(
        stream, encode, vae_identity(adapter), out, args.batch_size or cfg.data.batch_size, args.shard_size
    )
    print(f"cached {len(stream.index) - stream.skipped} samples ({stream.skipped} skipped): {manifest}")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "cache-latents", help="encode a recipe's training images with its VAE once (data.latent_cache)"
    )
    p.add_argument("recipe", help="recipe YAML, or a shipped recipe's name")
    p.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. data.path=train.json")
    p.add_argument("--out", help="cache folder (default: the recipe's data.latent_cache)")
    p.add_argument("--batch-size", type=int, help="images per encoder call (default: data.batch_size)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per safetensors shard")
    p.add_argument("--device", help="where the encoder runs (default: parallel.device)")
    p.set_defaults(func=cmd_cache_latents)
