import json

from senseflow.cli import main


def test_demo_distils_and_reports(tiny_teacher_dir, tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--per-split", "2", "--paired-per-split", "3"]
    args += ["--diversity-prompts", "2", "--diversity-seeds", "3"]
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
    rows = {r["name"]: r for r in results["reports"]}
    student = rows["student 4 steps (renoise)"]
    assert 0 <= student["coverage"]["recall"] <= 1 and student["diversity"]["seeds_per_prompt"] == 3
    background = student["background"]  # the tiny teacher's images may have no background at all
    assert 0 <= background["fraction"] <= 1 and (background["texture"] is None) == (
        background["fraction"] == 0
    )
    assert "green cast" in report
    assert "were sampled in this run" in report and (out / "teacher_samples.npz").is_file()
    teacher_rows = {k: v for k, v in rows.items() if k.startswith("teacher 50 steps")}
    # A second call resumes the finished run instead of training again, and takes the teacher's
    # reference images from the run's stored samples (checked by re-sampling four of them).
    assert main(args) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["train_minutes"] < 0.1
    assert "come from stored samples of this teacher" in (out / "report.md").read_text()
    for row in again["reports"]:
        if row["name"] in teacher_rows:
            assert row["accuracy"] == teacher_rows[row["name"]]["accuracy"]
            assert row["fid"] == teacher_rows[row["name"]]["fid"]


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
