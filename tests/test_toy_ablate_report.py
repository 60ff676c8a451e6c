"""The toy ablation's report: per-variant summaries, seed-paired tests (against a hand-computed
paired t-test) and the markdown tables, on synthetic run records."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from senseflow.experiments.toy.ablate_report import markdown, paired_tests, summarise
from senseflow.experiments.toy.ablate_variants import VARIANTS

SEEDS = (0, 1, 2)
# variant -> per-seed values (seeds 0, 1, 2)
NUMBERS = {
    "vanilla": {
        "fid_teacher": [10.0, 12.0, 11.0],
        "fid_renders": [20.0, 21.0, 25.0],
        "accuracy_all": [0.50, 0.60, 0.55],
        "accuracy_heldout": [0.30, 0.35, 0.40],
        "precision": [0.70, 0.75, 0.80],
        "recall": [0.40, 0.50, 0.45],
        "diversity": [3.0, 3.5, 4.0],
        "layout_diversity": [5.0, 6.0, 7.0],
        "green_cast": [1.0, 2.0, 0.0],
        "texture": [2.0, 2.5, 3.0],
        "seconds_per_iteration": [0.10, 0.12, 0.11],
    },
    "ida": {
        "fid_teacher": [8.0, 11.0, 7.5],
        "fid_renders": [19.0, 22.0, 23.0],
        "accuracy_all": [0.55, 0.62, 0.60],
        "accuracy_heldout": [0.32, 0.33, 0.45],
        "precision": [0.72, 0.70, 0.85],
        "recall": [0.45, 0.48, 0.50],
        "diversity": [3.1, 3.6, 3.8],
        "layout_diversity": [5.5, 6.5, 6.0],
        "green_cast": [0.5, 1.0, -0.5],
        "texture": [1.0, 2.5, 3.5],
        "seconds_per_iteration": [0.15, 0.18, 0.15],
    },
}


def _record(variant: str, seed: int, values: dict) -> dict:
    return {
        "variant": variant,
        "seed": seed,
        "fid": {"teacher": values["fid_teacher"], "renders": values["fid_renders"]},
        "accuracy": {
            "all": {"overall": {"all": values["accuracy_all"]}},
            "heldout": {"overall": {"all": values["accuracy_heldout"]}},
        },
        "coverage": {"precision": values["precision"], "recall": values["recall"]},
        "diversity": {"features": values["diversity"], "layout": values["layout_diversity"]},
        "background": {"green_cast": values["green_cast"], "texture": values["texture"]},
        "timing": {"seconds_per_iteration": values["seconds_per_iteration"]},
    }


def _records(numbers=NUMBERS, seeds=SEEDS) -> list[dict]:
    return [
        _record(v, s, {k: vals[i] for k, vals in per.items()})
        for v, per in numbers.items()
        for i, s in enumerate(seeds)
    ]


def _hand_mean_sd(xs):
    n = len(xs)
    m = sum(xs) / n
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))


def _hand_paired(a, b):
    d = [x - y for x, y in zip(a, b, strict=True)]
    m, sd = _hand_mean_sd(d)
    t = m / (sd / math.sqrt(len(d)))
    return m, sd, 2 * stats.t.sf(abs(t), len(d) - 1), sum(x > 0 for x in d), sum(x < 0 for x in d)


def test_summarise_means_and_sample_std():
    out = summarise(_records(), ["vanilla", "ida"])
    for v, per in NUMBERS.items():
        assert out[v]["seeds"] == list(SEEDS)
        for name, xs in per.items():
            m, sd = _hand_mean_sd(xs)
            assert out[v][name]["mean"] == pytest.approx(m, rel=1e-12, abs=1e-15), (v, name)
            assert out[v][name]["std"] == pytest.approx(sd, rel=1e-12, abs=1e-15), (v, name)
    assert out["vanilla"]["fid_teacher"] == {"mean": 11.0, "std": 1.0}
    assert out["vanilla"]["time_vs_baseline"] == pytest.approx(1.0)
    assert out["ida"]["time_vs_baseline"] == pytest.approx((0.48 / 3) / (0.33 / 3), rel=1e-12)


def test_summarise_missing_values_and_single_seed():
    records = _records()
    records[0]["coverage"] = None  # vanilla seed 0 not measured
    records[1]["background"]["texture"] = None
    del records[2]["diversity"]
    out = summarise(records, ["vanilla", "ida"])
    m, sd = _hand_mean_sd([0.50, 0.45])
    assert out["vanilla"]["recall"] == {"mean": pytest.approx(m), "std": pytest.approx(sd)}
    m, sd = _hand_mean_sd([2.0, 3.0])
    assert out["vanilla"]["texture"] == {"mean": pytest.approx(m), "std": pytest.approx(sd)}
    m, sd = _hand_mean_sd([3.0, 3.5])
    assert out["vanilla"]["diversity"] == {"mean": pytest.approx(m), "std": pytest.approx(sd)}
    one = summarise(_records(seeds=(4,))[:1], ["vanilla"])  # vanilla, one seed: no spread
    assert one["vanilla"]["fid_teacher"] == {"mean": 10.0, "std": None}
    for r in records:
        if r["variant"] == "vanilla":
            r["coverage"] = None
    assert summarise(records, ["vanilla"])["vanilla"]["precision"] == {"mean": None, "std": None}


def test_summarise_without_baseline_has_no_time_ratio():
    out = summarise([r for r in _records() if r["variant"] == "ida"], ["ida"])
    assert out["ida"]["time_vs_baseline"] is None


def test_paired_tests_against_hand_t_test():
    pairs = paired_tests(_records(), ["vanilla", "ida"])
    # vanilla has no `against` and is the baseline; ida's `against` is the baseline: one pair only
    assert VARIANTS["ida"].against == "vanilla"
    assert [(p["variant"], p["against"]) for p in pairs] == [("ida", "vanilla")]
    pair = pairs[0]
    assert pair["seeds"] == [0, 1, 2]
    assert set(pair["tests"]) == {"fid_teacher", "accuracy_all", "recall", "texture"}
    for name, test in pair["tests"].items():
        m, sd, p, hi, lo = _hand_paired(NUMBERS["ida"][name], NUMBERS["vanilla"][name])
        assert test["diff_mean"] == pytest.approx(m, rel=1e-12, abs=1e-15), name
        assert test["diff_std"] == pytest.approx(sd, rel=1e-12), name
        assert test["p"] == pytest.approx(p, rel=1e-9), name
        assert (test["higher"], test["lower"]) == (hi, lo), name
    # FID-T by hand: d = (-2, -1, -3.5), mean -13/6, sd sqrt(19/12)
    fid = pair["tests"]["fid_teacher"]
    assert fid["diff_mean"] == pytest.approx(-13 / 6)
    assert fid["diff_std"] == pytest.approx(math.sqrt(19 / 12))
    t = (-13 / 6) / (math.sqrt(19 / 12) / math.sqrt(3))
    assert fid["p"] == pytest.approx(2 * stats.t.sf(abs(t), 2), rel=1e-9)
    assert 0 < fid["p"] < 0.1
    assert (fid["higher"], fid["lower"]) == (0, 3)
    # texture: d = (-1, 0, 0.5): one seed higher, one lower, one tied
    assert (pair["tests"]["texture"]["higher"], pair["tests"]["texture"]["lower"]) == (1, 1)


def test_paired_tests_against_and_baseline_differ():
    numbers = {"vanilla": NUMBERS["vanilla"], "isg": NUMBERS["ida"], "isg_l2_w3": NUMBERS["vanilla"]}
    pairs = paired_tests(_records(numbers), list(numbers))
    assert [(p["variant"], p["against"]) for p in pairs] == [
        ("isg", "vanilla"),
        ("isg_l2_w3", "isg"),
        ("isg_l2_w3", "vanilla"),
    ]
    # identical values: zero differences, p = 1
    same = pairs[2]["tests"]["fid_teacher"]
    assert same == {"diff_mean": 0.0, "diff_std": 0.0, "p": None, "higher": 0, "lower": 0}
    # isg_l2_w3 vs isg mirrors isg vs vanilla
    assert pairs[1]["tests"]["fid_teacher"]["diff_mean"] == pytest.approx(13 / 6)
    assert pairs[1]["tests"]["fid_teacher"]["p"] == pytest.approx(pairs[0]["tests"]["fid_teacher"]["p"])
    # a variant whose `against` is not run is paired with the baseline only
    pairs = paired_tests(_records(numbers), ["vanilla", "isg_l2_w3"])
    assert [(p["variant"], p["against"]) for p in pairs] == [("isg_l2_w3", "vanilla")]


def test_paired_constant_difference_has_no_p_value():
    shifted = dict(NUMBERS["vanilla"], fid_teacher=[x + 1.0 for x in NUMBERS["vanilla"]["fid_teacher"]])
    pairs = paired_tests(_records({"vanilla": NUMBERS["vanilla"], "ida": shifted}), ["vanilla", "ida"])
    fid = pairs[0]["tests"]["fid_teacher"]
    # every seed moved by the same amount: the t statistic is undefined, so no p-value is claimed
    assert fid == {"diff_mean": 1.0, "diff_std": 0.0, "p": None, "higher": 3, "lower": 0}
    assert pairs[0]["tests"]["recall"]["p"] is None  # unchanged values: no difference, no p either


def test_paired_missing_value_skips_only_that_statistic():
    records = _records()
    next(r for r in records if r["variant"] == "ida" and r["seed"] == 1)["coverage"]["recall"] = None
    next(r for r in records if r["variant"] == "vanilla" and r["seed"] == 2)["background"] = None
    (pair,) = paired_tests(records, ["vanilla", "ida"])
    assert set(pair["tests"]) == {"fid_teacher", "accuracy_all"}
    m, sd, p, hi, lo = _hand_paired(NUMBERS["ida"]["accuracy_all"], NUMBERS["vanilla"]["accuracy_all"])
    acc = pair["tests"]["accuracy_all"]
    assert (acc["diff_mean"], acc["diff_std"]) == (pytest.approx(m), pytest.approx(sd))
    assert acc["p"] == pytest.approx(p, rel=1e-9)
    assert (acc["higher"], acc["lower"]) == (hi, lo) == (3, 0)


def test_paired_unmatched_seeds_are_left_out():
    records = _records()
    extra = {k: v[0] + 100.0 for k, v in NUMBERS["ida"].items()}
    records.append(_record("ida", 7, extra))  # no vanilla seed 7
    records = [r for r in records if not (r["variant"] == "vanilla" and r["seed"] == 0)]
    (pair,) = paired_tests(records, ["vanilla", "ida"])
    assert pair["seeds"] == [1, 2]
    m, sd, p, hi, lo = _hand_paired(NUMBERS["ida"]["fid_teacher"][1:], NUMBERS["vanilla"]["fid_teacher"][1:])
    fid = pair["tests"]["fid_teacher"]
    assert (fid["diff_mean"], fid["diff_std"]) == (pytest.approx(m), pytest.approx(sd))
    assert fid["p"] == pytest.approx(p, rel=1e-9)
    assert (fid["higher"], fid["lower"]) == (hi, lo)


def test_paired_single_common_seed_has_no_tests():
    records = [r for r in _records() if r["seed"] == 0 or r["variant"] == "ida"]
    pairs = paired_tests(records, ["vanilla", "ida"])
    assert all(not p["tests"] for p in pairs)


def _reference_row(name: str) -> dict:
    values = {k: xs[0] for k, xs in NUMBERS["vanilla"].items()}
    row = _record("vanilla", 0, values)
    for k in ("variant", "seed", "timing"):
        del row[k]
    return {"name": name, **row}


def _payload(records, variants) -> dict:
    """The keys ``run_ablation`` writes that ``markdown`` reads."""
    return {
        "command": "senseflow toy ablate --seeds 0 1 2",
        "set": "ablation",
        "title": "a test ablation",
        "baseline": "vanilla",
        "recipe": "toy/distill",
        "teacher": "shipped toy teacher",
        "teacher_sha256": "0123456789abcdef" * 4,
        "iterations": 100,
        "batch_size": 8,
        "seeds": list(SEEDS),
        "per_split": 4,
        "prompt_seed": 0,
        "prompts": 12,
        "sampler": "renoise",
        "variants": variants,
        "diversity": {"prompts": 2, "seeds_per_prompt": 3},
        "summary": summarise(records, variants, "vanilla"),
        "paired": paired_tests(records, variants, "vanilla"),
        "reference": [_reference_row("teacher 50 steps")],
        "runs": records,
        "json": "toy_ablation.json",
    }


def test_markdown_tables():
    records = _records()
    text = markdown(_payload(records, ["vanilla", "ida"]), {})
    # the paired row, formatted by hand from the hand-computed test of each value
    cells = []
    for name, scale, digits in (
        ("fid_teacher", 1, 2),
        ("accuracy_all", 100, 1),
        ("recall", 1, 3),
        ("texture", 1, 2),
    ):
        m, sd, p, hi, lo = _hand_paired(NUMBERS["ida"][name], NUMBERS["vanilla"][name])
        cells.append(f"{scale * m:+.{digits}f} ± {scale * sd:.{digits}f} (p {p:.2g}, {hi}↑ {lo}↓)")
    assert cells[0].startswith("-2.17 ± 1.26 (p ")
    row = "| +IDA | vanilla DMD2 | 3 | " + " | ".join(cells) + " |"
    assert row in text.splitlines()
    assert (
        "| variant | precision ↑ | recall ↑ | diversity (features) | diversity (layout, px) "
        "| green cast (0-255) | background texture (0-255) |"
    ) in text
    # summary row of vanilla: FID-T 11.00 ± 1.00 and time vs itself 1.00x
    vanilla = next(line for line in text.splitlines() if line.startswith("| vanilla DMD2 | 11.00 ± 1.00 |"))
    assert vanilla.endswith("| 1.00x |")
    ratio = (0.48 / 3) / (0.33 / 3)
    assert any(
        line.startswith("| +IDA |") and line.endswith(f"| {ratio:.2f}x |") for line in text.splitlines()
    )
    assert "| teacher 50 steps | 10.00 | 20.00 |" in text
    assert "`0123456789abcdef`" in text
    assert text.count("\n| vanilla DMD2 | 0 |") == 1  # per-seed table: one row per run


def test_markdown_without_paired_tests_has_no_paired_table():
    records = [r for r in _records() if r["variant"] == "vanilla"]
    text = markdown(_payload(records, ["vanilla"]), {})
    assert "Paired by seed" not in text
    assert "| variant | against |" not in text
    assert np.isfinite(summarise(records, ["vanilla"])["vanilla"]["fid_teacher"]["mean"])
