import json

from senseflow.cli import main


def test_demo_distils_and_reports(tiny_teacher_dir, tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--per-split", "2", "--paired-per-split", "3"]
    args += [f"model.teacher={tiny_teacher_dir}"]
    args += ["schedule.iterations=2", "data.batch_size=2", "logging.sample_every=null"]
    assert main(args) == 0
    report = (out / "report.md").read_text()
    for row in (
        "teacher 4 steps",
        "student 4 steps (renoise)",
        "student 4 steps (euler)",
        "FID-T reference set",
    ):
        assert row in report
    assert "exact McNemar p" in report and "N = 9" in report
    results = json.loads((out / "results.json").read_text())
    assert len(results["reports"]) == 6
    paired = results["paired_accuracy"]
    assert paired["n"] == 9 and paired["a_only"] + paired["b_only"] <= 9 and 0 <= paired["p_value"] <= 1
    assert (out / "grid.png").is_file() and (out / "train" / "checkpoints" / "step-00000002").is_dir()
    # A second call resumes the finished run instead of training again.
    assert main(args) == 0
    assert json.loads((out / "results.json").read_text())["train_minutes"] < 0.1


def test_report_teacher(tiny_teacher_dir, tmp_path):
    out = tmp_path / "toy_teacher.md"
    args = [
        "toy",
        "report-teacher",
        "--teacher",
        str(tiny_teacher_dir),
        "--per-split",
        "2",
        "--out",
        str(out),
    ]
    assert main([*args, "--steps", "3", "2"]) == 0
    text = out.read_text()
    assert "teacher 3 steps, CFG 3.0" in text and "teacher 2 steps, CFG 3.0" in text
    assert (tmp_path / "toy_teacher_grid.png").is_file() and (tmp_path / "toy_teacher.json").is_file()
