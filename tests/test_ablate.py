"""``senseflow toy ablate`` end to end on the tiny teacher: report files, finite numbers, resume."""

import hashlib
import json
import math

import torch

from senseflow.cli import main
from senseflow.config import load_config
from senseflow.experiments.toy.ablate import VARIANTS
from senseflow.experiments.toy.ablate_variants import SETS


def _args(teacher, tmp_path):
    return [
        "toy",
        "ablate",
        "--teacher",
        str(teacher),
        "--seeds",
        "0",
        "--iterations",
        "2",
        "--batch-size",
        "2",
        "--per-split",
        "2",
        "--diversity-prompts",
        "2",
        "--diversity-seeds",
        "2",
        "--curve-every",
        "1",
        "--variants",
        "vanilla",
        "full",
        "--runs",
        str(tmp_path / "runs"),
        "--out",
        str(tmp_path / "out"),
        "--quiet",
    ]


def test_ablate_writes_report_and_resumes(tiny_teacher_dir, tmp_path, capsys):
    torch.set_num_threads(1)
    assert main(_args(tiny_teacher_dir, tmp_path)) == 0
    out = tmp_path / "out"
    md = (out / "toy_ablation.md").read_text()
    payload = json.loads((out / "toy_ablation.json").read_text())
    assert (out / "toy_ablation_curves.png").is_file() and (out / "toy_ablation_samples.png").is_file()
    assert (out / "toy_ablation_quality.png").is_file()

    assert payload["variants"] == ["vanilla", "full"]
    assert [(r["variant"], r["seed"]) for r in payload["runs"]] == [("vanilla", 0), ("full", 0)]
    for v in ("vanilla", "full"):
        row = next(line for line in md.splitlines() if line.startswith(f"| {VARIANTS[v].label} |"))
        assert "–" not in row.split("|")[3:8], row  # FID-T, FID, accuracies and s/it are all present
        s = payload["summary"][v]
        for key in (
            "fid_teacher",
            "fid_renders",
            "accuracy_all",
            "accuracy_heldout",
            "seconds_per_iteration",
            "precision",
            "recall",
            "diversity",
        ):
            assert math.isfinite(s[key]["mean"]), (v, key)
        for key in ("texture", "green_cast"):  # None when the tiny teacher's images have no background
            assert s[key]["mean"] is None or math.isfinite(s[key]["mean"]), (v, key)
    # Every kept checkpoint is measured: the quality curve has a point per iteration (--curve-every 1).
    for run in payload["runs"]:
        assert [p["iteration"] for p in run["curve"]] == [1, 2]
        assert run["curve"][-1]["fid_teacher"] == run["fid"]["teacher"]
        assert 0 <= run["coverage"]["recall"] <= 1 and run["diversity"]["prompts"] == 2
    assert payload["paired"] == [] and "Paired by seed" not in md  # one seed: nothing to test
    assert "Coverage, diversity and background" in md
    assert payload["summary"]["vanilla"]["time_vs_baseline"] == 1.0
    assert "senseflow toy ablate --seeds 0 --variants vanilla full" in md and "--curve-every 1" in md
    assert len(payload["reference"]) == 3 and "FID-T floor" in md
    weights = tiny_teacher_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    assert payload["teacher_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert f"`{payload['teacher_sha256'][:16]}`" in md  # named in the intro

    final = tmp_path / "runs" / "full" / "seed0" / "checkpoints" / "step-00000002" / "meta.json"
    stamp = final.stat().st_mtime_ns
    capsys.readouterr()
    assert main(_args(tiny_teacher_dir, tmp_path)) == 0
    log = capsys.readouterr().out
    assert log.count("skip training") == 2 and log.count("skip measuring") == 2
    assert "reference: cached" in log
    assert final.stat().st_mtime_ns == stamp
    assert json.loads((out / "toy_ablation.json").read_text())["summary"] == payload["summary"]

    # --name writes a second report beside the first; without the set's baseline (vanilla) among
    # the variants, the first variant given is the baseline of the timing column.
    args = _args(tiny_teacher_dir, tmp_path)
    args.remove("vanilla")
    assert main([*args, "--name", "full_only"]) == 0
    other = json.loads((out / "full_only.json").read_text())
    assert other["baseline"] == "full" and other["summary"]["full"]["time_vs_baseline"] == 1.0
    assert other["summary"]["full"]["fid_teacher"] == payload["summary"]["full"]["fid_teacher"]
    assert (out / "full_only_quality.png").is_file() and (out / "full_only_samples.png").is_file()
    assert "--name full_only" in other["command"] and "time vs full" in (out / "full_only.md").read_text()
    assert json.loads((out / "toy_ablation.json").read_text())["summary"] == payload["summary"]  # kept


def test_ablate_rejects_unknown_variant(tiny_teacher_dir, tmp_path, capsys):
    args = _args(tiny_teacher_dir, tmp_path)
    args[args.index("full")] = "nonsense"
    assert main(args) == 2
    assert "unknown nonsense" in capsys.readouterr().err


def test_variant_sets_name_known_variants():
    for vset in SETS.values():
        assert set(vset.variants) <= set(VARIANTS) and vset.baseline in vset.variants
    leak = SETS["grad_leak"]
    assert leak.variants == ("full", "full_leak") and leak.stem == "toy_grad_leak"
    off, on = (load_config("toy/distill", list(VARIANTS[v].overrides)) for v in leak.variants)
    # the two recipes differ in the flag alone, and the toy GAN term it acts on is active
    assert not off.method.gan.official_grad_leak and on.method.gan.official_grad_leak
    dump = on.model_dump()
    dump["method"]["gan"]["official_grad_leak"] = False
    assert dump == off.model_dump()
    assert on.method.gan.type == "toy" and on.method.gan.weight > 0


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_each_variant_differs_from_its_comparison_only_where_its_overrides_say():
    """A paired test reads as "this change": the recipe fields that differ between a variant and its
    ``against`` are exactly the fields their override lists disagree on."""
    for name, variant in VARIANTS.items():
        if variant.against is None:
            continue
        other = VARIANTS[variant.against]
        a, b = (_flat(load_config("toy/distill", list(v.overrides)).model_dump()) for v in (variant, other))
        differ = {k for k in a if a[k] != b[k]}
        named = {o.split("=")[0] for o in set(variant.overrides) ^ set(other.overrides)}
        assert differ, f"{name} trains the same recipe as {variant.against}"
        assert differ <= named, f"{name} vs {variant.against}: {differ - named} changed unasked"
        assert {n for n in named if a.get(n) != b.get(n)} == differ


def test_stressed_set_stresses_the_fake_score():
    stressed = SETS["stressed"]
    assert stressed.baseline == stressed.variants[0] == "vanilla" and stressed.stem == "toy_ablation_stressed"
    cfgs = {v: load_config("toy/distill", list(VARIANTS[v].overrides)) for v in stressed.variants}
    assert cfgs["stressed"].method.ttur_ratio == 1 < cfgs["vanilla"].method.ttur_ratio
    assert cfgs["high_lr"].optim.fake.lr == cfgs["high_lr"].optim.generator.lr > cfgs["vanilla"].optim.fake.lr
    assert cfgs["stressed_ida"].method.ida.enabled and not cfgs["stressed"].method.ida.enabled
    assert cfgs["no_bs"].method.backward_sim_prob == 0 < cfgs["vanilla"].method.backward_sim_prob


def test_machine_note_names_the_training_device():
    from senseflow.experiments.toy.ablate import machine_note

    note = machine_note("cpu")
    assert note.startswith("trained on the CPU; CPU ") and note.endswith(" cores")


def test_plot_palette_draws_each_variant_of_a_set_in_its_own_colour():
    from senseflow.experiments.toy.ablate_plots import PALETTE

    assert len(set(PALETTE)) == len(PALETTE) >= max(len(s.variants) for s in SETS.values())


def test_ablate_jobs_runs_children_with_the_serial_results(tiny_teacher_dir, tmp_path, capsys):
    """--jobs 2 trains and measures each (variant, seed) in a child process; the report then reads
    their caches and equals a serial run's, every number but the timings."""
    torch.set_num_threads(1)
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    assert main([*_args(tiny_teacher_dir, serial), "--threads", "1"]) == 0
    capsys.readouterr()
    assert main([*_args(tiny_teacher_dir, parallel), "--threads", "1", "--jobs", "2"]) == 0
    log = capsys.readouterr().out
    assert log.count("started ") == 2 and log.count(": exit 0") == 2
    assert log.count("skip training") == 2 and log.count("skip measuring") == 2  # the children did both
    child_log = (parallel / "runs" / "logs" / "full_seed0.log").read_text()
    assert "measured " in child_log and "full/seed0" in child_log
    a, b = (json.loads((d / "out" / "toy_ablation.json").read_text()) for d in (serial, parallel))
    for ra, rb in zip(a["runs"], b["runs"], strict=True):
        for key in ("fid", "accuracy", "coverage", "diversity", "curve"):
            assert ra[key] == rb[key], key
    assert a["command"].replace(str(serial), "") == b["command"].replace(str(parallel), "")


def test_ablate_jobs_reports_a_failed_child(tiny_teacher_dir, tmp_path, capsys):
    from senseflow.cli import RUNTIME

    args = [*_args(tiny_teacher_dir, tmp_path), "--jobs", "2"]
    args.remove("vanilla")  # one run, which fails: its folder holds an unreadable configuration
    (tmp_path / "runs" / "full" / "seed0").mkdir(parents=True)
    (tmp_path / "runs" / "full" / "seed0" / "config.yaml").write_text("seed: 5\n")
    assert main(args) == RUNTIME
    assert "error: " in (tmp_path / "runs" / "logs" / "full_seed0.log").read_text()  # the child's own
    err = capsys.readouterr().err
    assert "--jobs: 1 run(s) failed: full seed 0" in err and "full_seed0.log" in err
