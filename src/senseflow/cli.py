"""The ``senseflow`` command line."""

from __future__ import annotations

import argparse
import sys

from senseflow.config.loader import ConfigError


def build_parser() -> argparse.ArgumentParser:
    from senseflow.data.cli import add_parser as add_cache_latents
    from senseflow.eval.cli import add_parser as add_eval
    from senseflow.experiments.toy.cli import add_parser as add_toy
    from senseflow.experiments.toy.demo import add_parser as add_demo
    from senseflow.export.cli import add_parser as add_export
    from senseflow.generate import add_parser as add_generate
    from senseflow.teacher_sample import add_parser as add_teacher_sample
    from senseflow.train.cache_cli import add_parser as add_cache_text
    from senseflow.train.cli import add_parser as add_train
    from senseflow.train.plan import add_parser as add_plan

    parser = argparse.ArgumentParser(
        prog="senseflow", description="Distil text-to-image teachers into 4-step generators (SenseFlow)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_demo(sub)
    add_train(sub)
    add_cache_latents(sub)
    add_cache_text(sub)
    add_plan(sub)
    add_generate(sub)
    add_export(sub)
    add_teacher_sample(sub)
    add_eval(sub)
    add_toy(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"senseflow: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
