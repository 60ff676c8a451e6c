"""How the stock schedulers of `senseflow export` walk the shipped recipes' anchors at 1024 px.

For each shipped recipe on its published teacher's scheduler config (config-only folders from
``benchmarks/published_folders.py``; no weights are read) and each sampler, it prints the stock
scheduler, what the plain pipeline call (``num_inference_steps=4``) walks, its largest difference
from the anchors, and what the call must add to walk them exactly.

    python benchmarks/export_schedules.py --out /tmp/published
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from published_folders import write_teacher

from senseflow.config import load_config
from senseflow.export.pipeline_folder import diffusers_adapter, sampler_for
from senseflow.models import build_adapter

RECIPES = {"sdxl": "sdxl", "dmd2_sdxl": "sdxl", "sd35_large": "sd35_large", "sd35_medium": "sd35_medium"}
RECIPES["flux_dev"] = "flux_dev"


def rows(root: Path) -> list[str]:
    out = [
        "| recipe | sampler | stock scheduler | anchors | plain call walks | max difference "
        "| exact call adds |",
        "|---|---|---|---|---|---|---|",
    ]
    for recipe, teacher in RECIPES.items():
        folder = write_teacher(root, teacher)
        cfg = load_config(recipe, [f"model.teacher={folder}", "data.resolution=1024"])
        adapter = diffusers_adapter(build_adapter(cfg, text_cache=False), "benchmark")
        for mode in ("renoise", "euler"):
            try:
                s = sampler_for(adapter, mode, cfg.data.resolution)
            except ValueError as exc:
                out.append(f"| {recipe} | {mode} | not expressible: {exc} | | | | |")
                continue
            fmt = lambda xs: ", ".join(f"{x:.4g}" for x in xs)  # noqa: E731
            extra = "; ".join(f"`{k}` = [{fmt(v)}]" for k, v in s.call.items()) or "nothing"
            out.append(
                f"| {recipe} | {mode} | `{s.class_name}` | {fmt(s.anchors)} | {fmt(s.default_walk)} | "
                f"{s.deviation:.2g} | {extra} |"
            )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/published", help="where the config-only folders are written")
    args = parser.parse_args(argv)
    print("\n".join(rows(Path(args.out))))


if __name__ == "__main__":
    main()
