"""Bad inputs to every command: one line on stderr, the right exit code, the culprit named, nothing written.

Each row of :data:`CASES` is one command line run in-process through ``senseflow.cli.main`` from inside
a scratch folder that holds the bad inputs (:func:`write_inputs`). For every row the test checks the
exit code (2: the user's input, 1: a failure while running), that stderr is exactly one line
``error: <message>`` naming the option, field or file, that no traceback is printed, and that no
file was written, changed or removed anywhere in the scratch folder or the run folders it reads.

A command must refuse a bad input before it trains, loads a model or downloads anything: those entry
points are replaced by :func:`no_work` with one that raises, so a command that accepts the bad input
fails its row with ``ReachedWork`` instead of running for minutes. The rows are in
tests/bad_input_cases.py; a new command or field joins by adding one there.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from senseflow.cli import main
from senseflow.errors import USAGE
from senseflow.train.trainer import Distiller
from tests.bad_input_cases import CASES, Case
from tests.trainer_helpers import RECIPE, toy_cfg

ROOT = Path(__file__).resolve().parents[1]
SENSEFLOW = Path(sys.executable).with_name("senseflow")
UNEXPECTED = "for the traceback)"  # the tail of an unexpected exception's line (senseflow.cli.one_line)


class ReachedWork(RuntimeError):
    """A command got past its input checks into training, a model load or a download."""


def _refuse(what: str):
    def refuse(*args, **kwargs):
        raise ReachedWork(f"{what} was reached: the command took the bad input")

    return refuse


#: (module, attribute, what): the entry points of real work, replaced for every case.
WORK = [
    ("senseflow.train.trainer", "Distiller.__init__", "training"),
    ("senseflow.student", "Student.__init__", "a student load"),
    ("senseflow.models", "build_adapter", "a model load"),
    ("senseflow.teacher_sample", "build_adapter", "a model load"),
    ("senseflow.families.toy.pipeline", "ToyTeacher.sample", "teacher sampling"),
    ("senseflow.experiments.toy.teacher", "train_teacher", "teacher training"),
    ("senseflow.experiments.toy.report", "write_teacher_report", "a teacher report"),
    ("senseflow.experiments.toy.ablate", "reference", "an ablation"),
    ("senseflow.eval.run", "ensure_images", "image generation"),
    ("senseflow.eval.panel", "Panel.load", "a metric load"),
    ("senseflow.eval.fetch", "_download_url", "a download"),
    ("senseflow.eval.fetch", "_download_hf", "a download"),
    ("senseflow.metrics.clip_score", "ClipScorer.from_path", "a CLIP load"),
    ("senseflow.data.cli", "write_latent_cache", "latent caching"),
    ("senseflow.models.text_cache_write", "write_text_cache", "text caching"),
    ("senseflow.train.plan", "analyse", "a memory plan"),
]


@pytest.fixture
def no_work(monkeypatch):
    """Every entry point of :data:`WORK` raises :class:`ReachedWork`; nothing is read from the network."""
    import importlib

    for module, attribute, what in WORK:
        owner = importlib.import_module(module)
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        monkeypatch.setattr(owner, name, _refuse(what))
    monkeypatch.delenv("SENSEFLOW_EVAL_WEIGHTS", raising=False)
    monkeypatch.delenv("SENSEFLOW_DEBUG", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def runs(tiny_teacher_dir, tmp_path_factory):
    """A finished 1-iteration toy run, and a copy whose checkpoint files are cut short."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("bad_inputs_run") / "run"
    Distiller(
        toy_cfg(tiny_teacher_dir, run, "schedule.iterations=1", checkpoint_every=1), progress=False
    ).run()
    torch.set_num_threads(threads)
    broken = run.with_name("broken_run")
    shutil.copytree(run, broken)
    for f in (broken / "checkpoints").rglob("*"):
        if f.suffix in (".distcp", ".pt", ".safetensors"):  # the weights, as a full disk leaves them
            f.write_bytes(f.read_bytes()[:16])
    return {"run": run, "broken_run": broken, "teacher": Path(tiny_teacher_dir)}


def write_inputs(tmp: Path, teacher: Path) -> None:
    """The bad (and a few good) inputs the rows name."""
    text = {
        "prompts.txt": "a small red circle\n",
        "blank.txt": "\n   \n\t\n",
        "long.txt": "x" * 10_001 + "\n",
        "file.txt": "a file, not a folder\n",
        "numbers.json": "[1, 2, 3]\n",
        "empty.yaml": "",
        "list.yaml": "- a\n- b\n",
        "broken.yaml": "model: [unclosed\n",
        "held/log.jsonl": "{}\n",
        "no_checkpoint/config.yaml": "name: x\n",
        "no_checkpoint/checkpoints/step-00000002.partial/state.pt": "half",
        "generated/00000.png": "an earlier image",
        "generated/index.jsonl": "{}\n",
        "generated/notes.md": "the user's own file\n",
        "exported/keep.txt": "mine\n",
        "text_images/00000.png": "this is not a PNG\n",
        "coco.json": '{"images": [{"id": 1, "file_name": "1.jpg"}], '
        '"annotations": [{"id": 1, "image_id": 1, "caption": "a cat"}]}',
        "compbench_empty/color_val.txt": "",
    }
    for name, content in text.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(content)
    binary = bytes(range(128, 256)) * 4
    for name in ("empty.txt", "empty_images/00000.png"):
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(b"")
    for name in ("binary.txt", "binary.yaml", "compbench_binary/color_val.txt"):
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(binary)
    (tmp / "a_folder").mkdir()
    (tmp / "duplicate.yaml").write_text(RECIPE.read_text() + "\nseed: 1\n")
    (tmp / "teacher_duplicate.yaml").write_text((ROOT / "configs/toy/teacher.yaml").read_text() + "seed: 3\n")
    eval_recipe = (
        f"output_dir: {tmp / 'eval_out'}\n"
        "prompts: {kind: toy, toy_per_split: 1}\n"
        f"reference: {{name: teacher, kind: toy_teacher, path: {teacher}, steps: 2}}\n"
        f"students: [{{name: fast, kind: toy_teacher, path: {teacher}, steps: 1}}]\n"
    )
    (tmp / "eval.yaml").write_text(eval_recipe)
    (tmp / "eval_duplicate.yaml").write_text(eval_recipe + f"output_dir: {tmp / 'other'}\n")


def snapshot(*roots: Path) -> dict[str, tuple[int, int] | None]:
    """Every file (size, mtime) and folder under ``roots``."""
    out: dict[str, tuple[int, int] | None] = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            st = path.lstat()
            out[str(path)] = None if path.is_dir() else (st.st_size, st.st_mtime_ns)
    return out


def fill(text: str, places: dict[str, Path]) -> str:
    for key, value in places.items():
        text = text.replace("{" + key + "}", str(value))
    return text.replace("{{", "{").replace("}}", "}")


@pytest.mark.parametrize("row", CASES, ids=[c.id for c in CASES])
def test_a_bad_input_is_one_line_and_writes_nothing(row: Case, runs, no_work, tmp_path, monkeypatch, capsys):
    tmp = tmp_path / "work"
    tmp.mkdir()
    write_inputs(tmp, runs["teacher"])
    monkeypatch.chdir(tmp)
    places = {"tmp": tmp, **runs}
    argv = shlex.split(fill(row.argv, places))
    outputs = Path(fill(row.outputs, places)) if row.outputs else None
    roots = [tmp, runs["run"], runs["broken_run"], runs["teacher"]]
    before = snapshot(*roots)
    held = snapshot(outputs) if outputs is not None and outputs.exists() else {}

    code = main(argv)

    out, err = capsys.readouterr()
    lines = err.splitlines()
    shown = f"argv: {shlex.join(argv)}\nstderr: {err}"
    assert "Traceback" not in out + err, shown
    assert code == row.code, shown
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0][len("error: ") :].strip(), shown
    assert UNEXPECTED not in lines[0], f"an exception the command does not check for\n{shown}"
    names = (row.names,) if isinstance(row.names, str) else row.names
    for name in names:
        assert fill(name, places) in lines[0], f"{name!r} is not named\n{shown}"
    if outputs is not None:
        gained = set(snapshot(outputs) if outputs.exists() else {}) - set(held)
        assert not gained, f"{outputs} gained {sorted(gained)}"
    after = snapshot(*roots)
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p, 0) != after.get(p, 0))
    assert not changed, f"written, changed or removed: {changed}\n{shown}"


def test_generate_overwrite_replaces_only_what_generate_wrote(runs, tmp_path, capsys):
    out = tmp_path / "images"
    out.mkdir()
    for name in ("00000.png", "00007.png", "grid.png", "index.jsonl"):
        (out / name).write_text("from an earlier run")
    (out / "notes.md").write_text("the user's own file")
    args = ["generate", "--run", str(runs["run"]), "--prompt", "a small red circle", "--out", str(out)]
    assert main([*args, "--device", "cpu", "--quiet"]) == USAGE
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--device", "cpu", "--quiet", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "grid.png", "index.jsonl", "notes.md"]
    assert (out / "notes.md").read_text() == "the user's own file"
    assert (
        Image.open(out / "00000.png").size == (32, 32)
        and len((out / "index.jsonl").read_text().split("\n")) == 2
    )


def test_the_table_covers_every_command():
    from senseflow.cli import COMMANDS

    commands = {c.argv.split()[0] for c in CASES if c.argv}
    assert set(COMMANDS) <= commands
    subcommands = {tuple(c.argv.split()[:2]) for c in CASES}
    assert {("eval", s) for s in ("run", "weights", "build-prompts", "fetch-weights")} <= subcommands
    assert {
        ("toy", s) for s in ("train-teacher", "sample", "report-teacher", "ablate", "curve")
    } <= subcommands
    assert len(CASES) >= 80 and len({c.id for c in CASES}) == len(CASES)


# The real console script, end to end: exit code, one line, and the traceback only when asked for.
SCRIPT_CASES = [
    pytest.param("train toy/distill optim.generator.lr=.nan", {}, False, id="plain"),
    pytest.param("--debug train toy/distill optim.generator.lr=.nan", {}, True, id="debug-flag"),
    pytest.param("train {tmp}/nope.yaml", {"SENSEFLOW_DEBUG": "1"}, True, id="debug-env"),
]


@pytest.mark.skipif(not SENSEFLOW.is_file(), reason="the senseflow console script is not installed here")
@pytest.mark.parametrize(("argv", "env", "traceback"), SCRIPT_CASES)
def test_the_console_script_answers_in_one_line(argv, env, traceback, tmp_path):
    environ = {k: v for k, v in os.environ.items() if k != "SENSEFLOW_DEBUG"}
    done = subprocess.run(
        [str(SENSEFLOW), *shlex.split(fill(argv, {"tmp": tmp_path}))],
        cwd=tmp_path,
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == USAGE, done.stderr
    assert lines and lines[-1].startswith("error: "), done.stderr
    assert ("Traceback" in done.stderr) == traceback, done.stderr
    assert traceback or len(lines) == 1, done.stderr
    assert done.stdout == "" and not any(tmp_path.iterdir())
