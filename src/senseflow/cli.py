"""The ``senseflow`` command line.

Only the chosen command's module is imported, so a bad recipe or argument is answered before torch,
diffusers or transformers load. Every error ends as one line, ``error: <message>``, with exit code 2
for what the user gave (arguments, recipes, files, folders) and 1 for a failure while running
(:mod:`senseflow.errors`); ``--debug`` anywhere on the line, or ``SENSEFLOW_DEBUG=1``, adds the
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import traceback

from senseflow.errors import RUNTIME, USAGE, SenseflowError, UsageError

#: command -> the module whose ``add_parser`` defines it (one module may define several commands).
COMMANDS = {
    "demo": "senseflow.experiments.toy.demo",
    "train": "senseflow.train.cli",
    "recipes": "senseflow.train.cli",
    "cache-latents": "senseflow.data.cli",
    "cache-text": "senseflow.train.cache_cli",
    "plan": "senseflow.train.plan",
    "generate": "senseflow.generate",
    "export": "senseflow.export.cli",
    "teacher-sample": "senseflow.teacher_sample",
    "eval": "senseflow.eval.cli",
    "toy": "senseflow.experiments.toy.cli",
}
DEBUG_FLAG = "--debug"
DEBUG_ENV = "SENSEFLOW_DEBUG"
#: A dotted recipe override, accepted anywhere on the line by commands that take overrides.
OVERRIDE_RE = re.compile(r"^[A-Za-z_][\w\-]*(\.[\w\-]+)*=")
#: Errors in what the user gave, reported with exit code 2 like :class:`UsageError`.
INPUT_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, UnicodeDecodeError)


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are raised as one-line :class:`UsageError` instead of printed."""

    def error(self, message: str):
        raise UsageError(f"{message} ({self.prog}): see `{self.prog} --help`")


def _command(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command, or, when ``command`` is known, with that command only."""
    parser = Parser(
        prog="senseflow", description="Distil text-to-image teachers into 4-step generators (SenseFlow)."
    )
    parser.add_argument(DEBUG_FLAG, action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    modules = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for name in modules:
        importlib.import_module(name).add_parser(sub)
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` overrides may follow options (``train r.yaml --quiet a.b=1``)."""
    args, extra = build_parser(_command(argv)).parse_known_args(argv)
    overrides = [a for a in extra if OVERRIDE_RE.match(a)]
    unknown = [a for a in extra if a not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        where = f"senseflow {args.command}"
        raise UsageError(
            f"unrecognized arguments: {' '.join(unknown or overrides)} ({where}): see `{where} --help`"
        )
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (several lines are joined with '; ')."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = "; ".join(lines) or type(exc).__name__
    if not isinstance(exc, (SenseflowError, *INPUT_ERRORS, OSError)):
        text = f"{type(exc).__name__}: {text} (run with {DEBUG_FLAG} for the traceback)"
    return text


def exit_code(exc: BaseException) -> int:
    if isinstance(exc, SenseflowError):
        return exc.exit_code
    if isinstance(exc, INPUT_ERRORS):
        return USAGE
    return RUNTIME


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        args = parse(argv)
        args.func(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the one place every error becomes one line
        if debug:
            traceback.print_exc()
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return exit_code(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
