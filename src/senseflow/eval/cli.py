"""``senseflow eval``: run the metric panel, list the metric weights, build prompt sets.

* ``senseflow eval run RECIPE [key=value ...]``: images, metrics, records and the table (see
  :mod:`senseflow.eval.run`); recipes in ``configs/eval/``.
* ``senseflow eval weights [--root DIR]``: every manifest entry, where it is expected and whether it
  is there (and verified).
* ``senseflow eval build-prompts coco5k|compbench ...``: prompt sets from the user's own files.
* ``senseflow eval fetch-weights NAME ... | all``: the only command that downloads (opt-in).

Everything else runs offline: the Hugging Face libraries are told so before anything is loaded.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from senseflow.errors import UsageError
from senseflow.inputs import existing_file, existing_folder, output_folder


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def cmd_run(args: argparse.Namespace) -> None:
    from senseflow.config import load_config
    from senseflow.eval.config import EvalConfig
    from senseflow.eval.run import run_eval

    _offline()
    cfg = load_config(args.recipe, args.overrides, schema=EvalConfig)
    result = run_eval(cfg, progress=not args.quiet)
    print(result.table.read_text())
    print(f"records in {result.out / 'records'}, table in {result.table}")


def cmd_weights(args: argparse.Namespace) -> None:
    from senseflow.metrics.weights import MANIFEST, WeightsError, resolve, weights_root

    root = weights_root(args.root)
    if root is not None and root.exists() and not root.is_dir():
        raise UsageError(f"a file, not a folder ({_root_option(args)} {root}): give the weights root folder")
    print(
        f"weights root: {root if root is not None else '(not configured: --root or $SENSEFLOW_EVAL_WEIGHTS)'}"
    )
    width = max(len(n) for n in MANIFEST)
    for name, entry in MANIFEST.items():
        if root is None:
            state = "-"
        else:
            try:
                w = resolve(name, root=root, hash_unverified=args.hash)
                state = (
                    "ok, verified" if w.verified else "present" + (f", sha256 {w.sha256}" if w.sha256 else "")
                )
            except WeightsError as exc:
                state = "MISMATCH" if "expects" in str(exc) else "missing"
        print(f"{name:<{width}}  {entry.relpath:<62}  {state}")
        if args.verbose:
            print(f"{'':<{width}}  from {entry.upstream}; licence {entry.licence}")


def _root_option(args: argparse.Namespace) -> str:
    return "--root" if args.root else "$SENSEFLOW_EVAL_WEIGHTS"


def cmd_fetch(args: argparse.Namespace) -> None:
    from senseflow.eval.fetch import fetch
    from senseflow.metrics.weights import MANIFEST, weights_root

    root = weights_root(args.root)
    if root is None:
        raise ValueError("fetch-weights needs --root or $SENSEFLOW_EVAL_WEIGHTS (the weights root to fill)")
    unknown = [n for n in args.names if n not in MANIFEST and n != "all"]
    if unknown:
        raise UsageError(
            f"no such weights ({', '.join(unknown)}): give names from `senseflow eval weights` "
            f"({', '.join(sorted(MANIFEST))}) or all"
        )
    if "all" in args.names and len(args.names) > 1:
        raise UsageError(f"all with other names ({' '.join(args.names)}): give all alone, or only names")
    output_folder(root, _root_option(args))
    fetch(args.names, root, force=args.force)


def _clip_caption_scorer(path: str, tokenizer: str | None):
    """``scorer(image_path, captions) -> cosines`` for the max_clip COCO rule (no prefix, no pre-resize)."""
    from senseflow.metrics.clip_score import ClipScorer
    from senseflow.metrics.image_io import load_rgb

    scorer = ClipScorer.from_path(path, tokenizer=tokenizer, prefix=None, pre_resize="none")

    def score(image_path, captions):
        image = load_rgb(image_path)
        return scorer.score([image] * len(captions), list(captions))

    return score


def cmd_build_prompts(args: argparse.Namespace) -> None:
    from senseflow.eval import prompts as p

    _offline()
    output_folder(args.out, "--out")
    if args.set == "coco5k":
        if not args.captions:
            raise ValueError("--captions (your captions_val2017.json) is required for coco5k")
        existing_file(args.captions, "--captions")
        scorer = None
        if args.rule == "max_clip":
            if not (args.clip and args.images and args.clip_name):
                raise ValueError("--rule max_clip needs --images, --clip (CLIP weights) and --clip-name")
            existing_folder(args.images, "--images")
            if not Path(args.clip).expanduser().exists():
                raise UsageError(f"no such file or folder (--clip {args.clip}): give the CLIP weights")
            tokenizer = args.clip_tokenizer
            if tokenizer and not Path(tokenizer).expanduser().exists():
                raise UsageError(f"no such file or folder (--clip-tokenizer {tokenizer}): check the path")
            scorer = _clip_caption_scorer(args.clip, args.clip_tokenizer)
        record = p.build_coco5k(
            args.captions,
            args.out,
            args.rule,
            scorer=scorer,
            images_dir=args.images,
            selection_model=args.clip_name,
            expected_count=None if args.any_count else p.COCO5K_COUNT,
        )
        print(f"wrote {record.tsv} and {record.provenance_path}")
    else:
        if not args.dataset:
            raise ValueError("--dataset (examples/dataset of your T2I-CompBench checkout) is required")
        existing_folder(args.dataset, "--dataset")
        info = p.build_compbench_prompts(args.dataset, args.out)
        sidecar = info["sidecar"]
        state = "built" if sidecar.get("built") else f"not built ({sidecar.get('reason')})"
        print(f"wrote {len(info['files'])} T2I-CompBench prompt lists to {args.out}; sidecar {state}")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from senseflow.eval.prompts import COCO5K_RULES

    ev = subparsers.add_parser("eval", help="evaluate teacher and students: FID-T, CLIP, HPSv2, ... tables")
    sub = ev.add_subparsers(
        dest="eval_command", metavar="{run,weights,fetch-weights,build-prompts}", required=True
    )

    run = sub.add_parser("run", help="generate (or reuse) images, score them, write records and a table")
    run.add_argument("recipe", type=Path, help="evaluation recipe (YAML), e.g. configs/eval/toy.yaml")
    run.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. prompts.limit=100")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(func=cmd_run)

    w = sub.add_parser("weights", help="list the metric weights and whether they are in the weights root")
    w.add_argument("--root", help="weights root (default $SENSEFLOW_EVAL_WEIGHTS)")
    w.add_argument("--hash", action="store_true", help="hash files without a manifest sha256 (slow)")
    w.add_argument("--verbose", "-v", action="store_true", help="also show upstream source and licence")
    w.set_defaults(func=cmd_weights)

    f = sub.add_parser("fetch-weights", help="opt-in: download metric weights into the weights root")
    f.add_argument("names", nargs="+", help="logical names (see 'senseflow eval weights'), or 'all'")
    f.add_argument("--root", help="weights root (default $SENSEFLOW_EVAL_WEIGHTS)")
    f.add_argument("--force", action="store_true", help="download again even if present")
    f.set_defaults(func=cmd_fetch)

    b = sub.add_parser("build-prompts", help="build COCO-5K or T2I-CompBench prompt sets from your files")
    b.add_argument("set", choices=("coco5k", "compbench"))
    b.add_argument("--out", required=True, help="output folder (outside this repository)")
    b.add_argument("--captions", help="coco5k: your captions_val2017.json")
    b.add_argument("--rule", choices=COCO5K_RULES, default="max_clip", help="coco5k caption selection rule")
    b.add_argument("--images", help="coco5k max_clip: your val2017 image folder")
    b.add_argument("--clip", help="coco5k max_clip: CLIP weights (folder or file)")
    b.add_argument("--clip-tokenizer", help="coco5k max_clip: tokenizer (default: the CLIP folder's)")
    b.add_argument("--clip-name", help="coco5k max_clip: CLIP model id recorded in the provenance")
    b.add_argument("--any-count", action="store_true", help="coco5k: accept a file without 5,000 images")
    b.add_argument("--dataset", help="compbench: examples/dataset folder of your T2I-CompBench checkout")
    b.set_defaults(func=cmd_build_prompts)
