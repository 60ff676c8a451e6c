"""Report of ``senseflow toy ablate``: per-variant summary statistics and the markdown table."""

from __future__ import annotations

import textwrap

import numpy as np

from senseflow.experiments.toy.ablate_variants import BASELINE, DEFAULT_SET, SAMPLER, SETS, VARIANTS


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


def summarise(records: list[dict], variants: list[str], baseline: str = BASELINE) -> dict[str, dict]:
    out = {}
    for v in variants:
        rs = [r for r in records if r["variant"] == v]
        stats = {
            "fid_teacher": _mean_std([r["fid"]["teacher"] for r in rs]),
            "fid_renders": _mean_std([r["fid"]["renders"] for r in rs]),
            "accuracy_all": _mean_std([r["accuracy"]["all"]["overall"]["all"] for r in rs]),
            "accuracy_heldout": _mean_std([r["accuracy"]["heldout"]["overall"]["all"] for r in rs]),
            "seconds_per_iteration": _mean_std([r["timing"]["seconds_per_iteration"] for r in rs]),
        }
        out[v] = {k: {"mean": m, "std": s} for k, (m, s) in stats.items()} | {
            "seeds": [r["seed"] for r in rs]
        }
    base = out.get(baseline, {}).get("seconds_per_iteration", {}).get("mean")
    for v in variants:
        mine = out[v]["seconds_per_iteration"]["mean"]
        out[v]["time_vs_baseline"] = mine / base if mine is not None and base else None
    return out


def _sha_note(payload: dict) -> str:
    sha = payload.get("teacher_sha256")
    return f" (transformer sha256 `{sha[:16]}`)" if sha else ""


def _per_seed(payload: dict) -> list[str]:
    """One row per run: every number the summary's means and stds are taken over."""
    lines = [
        "| variant | seed | FID-T ↓ | FID vs renders ↓ | accuracy, all (%) | held-out (%) | s / iteration |"
        "\n|" + "---|" * 7
    ]
    for r in payload["runs"]:
        acc, spi = r["accuracy"], r["timing"]["seconds_per_iteration"]
        cells = [
            VARIANTS[r["variant"]].label,
            str(r["seed"]),
            f"{r['fid']['teacher']:.2f}",
            f"{r['fid']['renders']:.2f}",
            f"{100 * acc['all']['overall']['all']:.1f}",
            f"{100 * acc['heldout']['overall']['all']:.1f}",
            "–" if spi is None else f"{spi:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(payload: dict, curves_png: str | None, grid_png: str | None) -> str:
    s, ref = payload["summary"], payload["reference"]
    baseline = payload.get("baseline", BASELINE)
    head = (
        "| variant | overrides | FID-T ↓ | FID vs renders ↓ | accuracy, all (%) | held-out (%) "
        f"| s / iteration | time vs {baseline} |\n|" + "---|" * 8
    )
    lines = [head]
    for v in payload["variants"]:
        r = s[v]
        overrides = ", ".join(f"`{o}`" for o in VARIANTS[v].overrides) or "(the recipe)"
        ratio = r["time_vs_baseline"]
        cells = [
            VARIANTS[v].label,
            overrides,
            _fmt(r["fid_teacher"]["mean"], r["fid_teacher"]["std"]),
            _fmt(r["fid_renders"]["mean"], r["fid_renders"]["std"]),
            _fmt(r["accuracy_all"]["mean"], r["accuracy_all"]["std"], 100, 1),
            _fmt(r["accuracy_heldout"]["mean"], r["accuracy_heldout"]["std"], 100, 1),
            _fmt(r["seconds_per_iteration"]["mean"], r["seconds_per_iteration"]["std"], 1, 3),
            f"{ratio:.2f}x" if ratio is not None else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    ref_lines = ["| reference | FID-T | FID vs renders | accuracy, all (%) | held-out (%) |\n|" + "---|" * 5]
    for row in ref:
        acc = row["accuracy"]
        ref_lines.append(
            f"| {row['name']} | {row['fid']['teacher']:.2f} | {row['fid']['renders']:.2f} "
            f"| {100 * acc['all']['overall']['all']:.1f} | {100 * acc['heldout']['overall']['all']:.1f} |"
        )
    n, seeds = payload["prompts"], payload["seeds"]
    grid = ""
    if grid_png:
        grid = f"\nTest and held-out prompts; students of seed {min(seeds)}:\n\n![samples]({grid_png})\n"
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
        "accuracy (`senseflow.metrics.shapes.evaluator`). Seconds per iteration are the wall time of "
        "`Distiller.run` divided by the iterations it trained (this machine, runs one after another: "
        "other load on the machine shows up here); the last column divides them by "
        f"{VARIANTS[baseline].label}'s.",
        width=100,
    )
    curves = ""
    if curves_png:
        curves = (
            f"\nTraining curves (mean over seeds, moving average): `{curves_png}`\n\n"
            f"![curves]({curves_png})\n"
        )
    return f"""# Toy ablation: {payload.get("title", SETS[DEFAULT_SET].title)}

{intro}

{chr(10).join(lines)}

Per seed:

{chr(10).join(_per_seed(payload))}

Teacher baselines on the same prompts:

{chr(10).join(ref_lines)}
{curves}{grid}
Raw numbers of every run: `{payload["json"]}`. Reproduce (resumable: finished runs are skipped):

```
{payload["command"]}
```
"""
