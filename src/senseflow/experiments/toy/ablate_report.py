"""Report of ``senseflow toy ablate``: per-variant summary statistics and the markdown table."""

from __future__ import annotations

import textwrap

import numpy as np

from senseflow.experiments.toy.ablate_variants import BASELINE, DEFAULT_SET, SAMPLER, SETS, VARIANTS
from senseflow.experiments.toy.points import COVERAGE_COLUMNS, COVERAGE_HEAD, QUALITY_KEYS, quality_point


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else None


def _fmt(mean: float | None, std: float | None, scale: float = 1.0, digits: int = 2) -> str:
    if mean is None:
        return "–"
    text = f"{scale * mean:.{digits}f}"
    return text + (f" ± {scale * std:.{digits}f}" if std is not None else "")


#: Summary statistics: name -> value of a run record (None where not measured).
_STATS = {
    **{k: (lambda r, k=k: quality_point(r)[k]) for k in QUALITY_KEYS},
    "fid_renders": lambda r: r["fid"]["renders"],
    "accuracy_heldout": lambda r: r["accuracy"]["heldout"]["overall"]["all"],
    "seconds_per_iteration": lambda r: r["timing"]["seconds_per_iteration"],
}
#: Values the paired tests compare: name -> (label, scale, digits).
PAIRED = {
    "fid_teacher": ("FID-T", 1.0, 2),
    "accuracy_all": ("accuracy (points)", 100.0, 1),
    "recall": ("recall", 1.0, 3),
    "texture": ("background texture", 1.0, 2),
}


def summarise(records: list[dict], variants: list[str], baseline: str = BASELINE) -> dict[str, dict]:
    out = {}
    for v in variants:
        rs = [r for r in records if r["variant"] == v]
        stats = {name: _mean_std([get(r) for r in rs]) for name, get in _STATS.items()}
        out[v] = {k: {"mean": m, "std": s} for k, (m, s) in stats.items()} | {
            "seeds": [r["seed"] for r in rs]
        }
    base = out.get(baseline, {}).get("seconds_per_iteration", {}).get("mean")
    for v in variants:
        mine = out[v]["seconds_per_iteration"]["mean"]
        out[v]["time_vs_baseline"] = mine / base if mine is not None and base else None
    return out


def paired_tests(records: list[dict], variants: list[str], baseline: str = BASELINE) -> list[dict]:
    """Each variant against ``Variant.against`` and against the baseline: per value, the seed-by-seed
    differences (same seed: same data, noise and init), their mean and sd, a two-sided paired t-test
    (``p`` None when every difference is the same: the t statistic is undefined) and how many seeds
    moved each way."""
    from scipy.stats import ttest_rel

    by = {(r["variant"], r["seed"]): r for r in records}
    pairs = []
    for v in variants:
        for other in dict.fromkeys([VARIANTS[v].against, baseline]):
            if other is None or other == v or other not in variants:
                continue
            seeds = sorted(s for (w, s) in by if w == v and (other, s) in by)
            if len(seeds) < 2:  # no spread to test against
                continue
            tests = {}
            for name in PAIRED:
                a = [_STATS[name](by[(v, s)]) for s in seeds]
                b = [_STATS[name](by[(other, s)]) for s in seeds]
                if None in a or None in b:
                    continue
                d = np.subtract(a, b)
                same = np.allclose(d, d[0], rtol=1e-9, atol=1e-12)
                p = None if same else float(ttest_rel(a, b).pvalue)
                tests[name] = {
                    "diff_mean": float(d.mean()),
                    "diff_std": float(d.std(ddof=1)),
                    "p": p,
                    "higher": int((d > 0).sum()),
                    "lower": int((d < 0).sum()),
                }
            pairs.append({"variant": v, "against": other, "seeds": seeds, "tests": tests})
    return pairs


def _paired_lines(pairs: list[dict]) -> list[str]:
    head = "| variant | against | seeds | " + " | ".join(f"Δ {lab}" for lab, _, _ in PAIRED.values())
    lines = [head + " |\n|" + "---|" * (3 + len(PAIRED))]
    for pair in pairs:
        cells = [VARIANTS[pair["variant"]].label, VARIANTS[pair["against"]].label, str(len(pair["seeds"]))]
        for name, (_, scale, digits) in PAIRED.items():
            t = pair["tests"].get(name)
            if t is None:
                cells.append("–")
                continue
            cells.append(
                f"{scale * t['diff_mean']:+.{digits}f} ± {scale * t['diff_std']:.{digits}f} "
                f"(p {'n/a' if t['p'] is None else format(t['p'], '.2g')}, {t['higher']}↑ {t['lower']}↓)"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _sha_note(payload: dict) -> str:
    sha = payload.get("teacher_sha256")
    return f" (transformer sha256 `{sha[:16]}`)" if sha else ""


def _cells(stats: dict, spec) -> list[str]:
    return [_fmt(stats[k]["mean"], stats[k]["std"], scale, digits) for k, scale, digits in spec]


#: Columns of the two summary tables: (statistic, scale, digits).
_QUALITY_COLUMNS = (
    ("fid_teacher", 1, 2),
    ("fid_renders", 1, 2),
    ("accuracy_all", 100, 1),
    ("accuracy_heldout", 100, 1),
    ("seconds_per_iteration", 1, 3),
)
_COVERAGE_COLUMNS = tuple((key, 1, digits) for key, digits in COVERAGE_COLUMNS)


def _row_values(row: dict) -> dict:
    """A reference row or run record as {statistic: {"mean", "std": None}}."""
    return {
        k: {"mean": get(row) if k != "seconds_per_iteration" else None, "std": None}
        for k, get in _STATS.items()
    }


def _per_seed(payload: dict) -> list[str]:
    """One row per run: every number the summary's means and stds are taken over."""
    lines = [
        "| variant | seed | FID-T ↓ | FID vs renders ↓ | accuracy, all (%) | held-out (%) | s / iteration "
        + COVERAGE_HEAD
        + "\n|"
        + "---|" * 13
    ]
    for r in payload["runs"]:
        values = _row_values(r)
        values["seconds_per_iteration"]["mean"] = r["timing"]["seconds_per_iteration"]
        cells = [VARIANTS[r["variant"]].label, str(r["seed"])]
        cells += _cells(values, _QUALITY_COLUMNS + _COVERAGE_COLUMNS)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(payload: dict, figures: dict[str, str]) -> str:
    from senseflow.metrics.coverage import DEFAULT_K

    s, ref = payload["summary"], payload["reference"]
    baseline = payload.get("baseline", BASELINE)
    head = (
        "| variant | FID-T ↓ | FID vs renders ↓ | accuracy, all (%) | held-out (%) "
        f"| s / iteration | time vs {baseline} |\n|" + "---|" * 7
    )
    lines, cov_lines = [head], ["| variant " + COVERAGE_HEAD + "\n|" + "---|" * 7]
    over_lines = ["| variant | overrides on the recipe |\n|---|---|"]
    for v in payload["variants"]:
        r = s[v]
        ratio = r["time_vs_baseline"]
        lines.append(
            "| "
            + " | ".join([VARIANTS[v].label, *_cells(r, _QUALITY_COLUMNS), f"{ratio:.2f}x" if ratio else "–"])
            + " |"
        )
        cov_lines.append("| " + " | ".join([VARIANTS[v].label, *_cells(r, _COVERAGE_COLUMNS)]) + " |")
        overrides = ", ".join(f"`{o}`" for o in VARIANTS[v].overrides) or "(the recipe)"
        over_lines.append(f"| {VARIANTS[v].label} | {overrides} |")
    ref_lines = [
        "| reference | FID-T | FID vs renders | accuracy, all (%) | held-out (%) "
        + COVERAGE_HEAD
        + "\n|"
        + "---|" * 11
    ]
    for row in ref:
        cells = _cells(_row_values(row), _QUALITY_COLUMNS[:4] + _COVERAGE_COLUMNS)
        ref_lines.append("| " + " | ".join([row["name"], *cells]) + " |")
    n, seeds = payload["prompts"], payload["seeds"]
    div = payload.get("diversity", {})
    intro = textwrap.fill(
        f"Each row is `{payload['recipe']}` with the listed overrides, distilled for "
        f"{payload['iterations']} iterations at batch {payload['batch_size']} from the teacher "
        f"`{payload['teacher']}`{_sha_note(payload)}, with seeds {', '.join(map(str, seeds))} "
        "(mean ± sample std over seeds). "
        f"The students are sampled with the 4-step `{SAMPLER}` sampler on {n} prompts "
        f"({payload['per_split']} each from the train, test and held-out splits; one image per prompt, "
        "seed = prompt index). FID-T is the Fréchet distance "
        "(toy features, `senseflow.metrics.shapes.features`) "
        "to the teacher's own reference samples of the same prompts and seeds; its floor at this N is "
        "the teacher with other seeds, below. Accuracy is the rule-based evaluator's compositional "
        f"accuracy (`senseflow.metrics.shapes.evaluator`). Precision and recall (k = {DEFAULT_K}) are taken "
        "against the teacher's reference samples on the same features; diversity is the mean pairwise "
        f"feature distance among {div.get('seeds_per_prompt', '?')} seeds of each of "
        f"{div.get('prompts', '?')} prompts, and its layout form the same over the evaluator's object "
        "positions and sizes; green cast and texture describe the background "
        "(`senseflow.metrics.shapes.background`). Seconds per iteration are the wall time of "
        "`Distiller.run` divided by the iterations it trained, a checkpoint write every "
        f"{payload.get('curve_every', '?')} iterations included ({payload.get('machine', 'this machine')}; "
        "other runs sharing the machine show up here); the last column divides them by "
        f"{VARIANTS[baseline].label}'s.",
        width=100,
    )
    figs = ""
    if "quality" in figures:
        figs += (
            f"\nQuality over training (each kept checkpoint measured; mean ± sd over seeds; dashed: the "
            f"teacher): `{figures['quality']}`\n\n![quality]({figures['quality']})\n"
        )
    if "curves" in figures:
        figs += (
            f"\nTraining curves (logged values, mean over seeds, moving average): `{figures['curves']}`\n\n"
            f"![curves]({figures['curves']})\n"
        )
    if "grid" in figures:
        figs += (
            f"\nTest and held-out prompts; students of seed {min(seeds)}:\n\n![samples]({figures['grid']})\n"
        )
    paired = payload.get("paired") or []
    paired_text = ""
    if paired:
        paired_text = (
            "\nPaired by seed (variant minus the other; p: two-sided paired t-test over seeds; arrows: "
            "seeds where the variant's value is higher / lower):\n\n"
            + "\n".join(_paired_lines(paired))
            + "\n"
        )
    return f"""# Toy ablation: {payload.get("title", SETS[DEFAULT_SET].title)}

{intro}

{chr(10).join(lines)}

Coverage, diversity and background of the same students:

{chr(10).join(cov_lines)}
{paired_text}
Teacher baselines on the same prompts:

{chr(10).join(ref_lines)}

Variants:

{chr(10).join(over_lines)}

Per seed:

{chr(10).join(_per_seed(payload))}
{figs}
Raw numbers of every run: `{payload["json"]}`. Reproduce (resumable: finished runs are skipped):

```
{payload["command"]}
```
"""
