"""``senseflow generate`` made fast: batches, compute dtype, VAE switches, compile, the text cache, the
exported diffusers folder as a source, and the benchmark that times it (benchmarks/generate.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from senseflow.cli import main
from senseflow.method import student_sample
from senseflow.student import StageTimer, Student
from senseflow.train.trainer import Distiller
from tests.family_helpers import family_cfg, write_image_dataset
from tests.trainer_helpers import toy_cfg

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cat", "a blue dog", "a photo of the cat"]
SEEDS = [3, 4, 5]


def _benchmark():
    spec = importlib.util.spec_from_file_location("generate_benchmark", ROOT / "benchmarks" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks on a shared CPU: several threads spin against other processes' (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tiny_folder, tmp_path_factory):
    """``runs(family)``: a 2-iteration run on the family's tiny folder, trained once per module."""
    made: dict[str, Path] = {}
    data = write_image_dataset(tmp_path_factory.mktemp("data"))

    def get(family: str) -> Path:
        if family not in made:
            out = tmp_path_factory.mktemp(f"run_{family}")
            Distiller(family_cfg(family, tiny_folder(family, "a"), data, out), progress=False).run()
            made[family] = out
        return made[family]

    return get


@pytest.fixture(scope="module")
def toy_run(tiny_teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_run")
    Distiller(toy_cfg(tiny_teacher_dir, out, "schedule.iterations=1"), progress=False).run()
    return out


@torch.no_grad()
def _old_student_images(student: Student, prompts, seeds, mode: str) -> torch.Tensor:
    """``models.sampling.student_images`` as it was before batching, dtypes and timing came in."""
    adapter = student.adapter
    streams = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def fresh(like):
        return torch.stack([torch.randn(tuple(like.shape[1:]), generator=g) for g in streams]).to(like)

    noise = fresh(torch.empty(len(seeds), *adapter.sample_shape(student.cfg.data.resolution)))
    cond = adapter.encode_prompts(list(prompts))
    fn = lambda x, level: adapter.forward(student.generator, x, level, cond)  # noqa: E731
    x0 = student_sample(fn, noise, student.anchor_levels, adapter.param, mode, generator=fresh)
    return adapter.decode(x0).float().clamp(-1, 1)


def _pngs(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p), dtype=np.int16) for p in sorted(folder.glob("0*.png"))]


def test_fp32_images_are_the_old_paths_at_any_batch_size(runs):
    student = Student.from_run(runs("sdxl"), dtype="fp32")
    timer = StageTimer()
    three = student.sample(PROMPTS, SEEDS, mode="renoise", batch_size=3, timer=timer)
    ones = student.sample(PROMPTS, SEEDS, mode="renoise", batch_size=1)
    assert torch.equal(three, _old_student_images(student, PROMPTS, SEEDS, "renoise"))
    for i in range(len(PROMPTS)):
        assert torch.equal(
            ones[i : i + 1], _old_student_images(student, PROMPTS[i : i + 1], SEEDS[i : i + 1], "renoise")
        )
    # across batch sizes only float rounding differs (CPU kernels block by batch size)
    torch.testing.assert_close(ones, three, rtol=1e-5, atol=1e-5)
    assert set(timer.seconds) == {"text", "denoise", "decode"} and min(timer.seconds.values()) > 0


def test_generate_switches_keep_the_images(runs, tmp_path, capsys):
    run = runs("sdxl")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    base = ["generate", "--run", str(run), "--prompts", str(prompts), "--device", "cpu", "--dtype", "fp32"]
    assert main([*base, "--out", str(tmp_path / "plain"), "--quiet"]) == 0
    switches = ["--batch-size", "2", "--decode-batch-size", "1", "--vae-tiling", "--vae-slicing"]
    assert main([*base, "--out", str(tmp_path / "fast"), *switches]) == 0
    out = capsys.readouterr().out
    assert all(stage in out for stage in ("text encoding", "network forwards", "VAE decode", "total"))
    plain, fast = _pngs(tmp_path / "plain"), _pngs(tmp_path / "fast")
    assert len(plain) == len(fast) == 3
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(plain, fast, strict=True))  # float rounding only
    index = [json.loads(line) for line in (tmp_path / "fast" / "index.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in index] == PROMPTS and [r["seed"] for r in index] == [0, 1, 2]


def test_bf16_casts_the_generator_and_stays_close(runs):
    student = Student.from_run(runs("flux"), dtype="bf16")
    reference = Student.from_run(runs("flux"), dtype="fp32").sample(PROMPTS[:2], SEEDS[:2])
    assert next(student.generator.parameters()).dtype == torch.bfloat16
    images = student.sample(PROMPTS[:2], SEEDS[:2])
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert (images - reference).abs().mean() < 0.05


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_an_exported_folder_samples_as_its_run(runs, tmp_path, family):
    run, out = runs(family), tmp_path / "export"
    sampler = "euler" if family == "flux" else "renoise"  # the export's own sampler is the default
    exported = _benchmark().export_folder(run, out, sampler=sampler)
    student = Student.from_export(exported)
    assert student.source == exported and student.default_sampler == sampler
    expected = Student.from_run(run).sample(PROMPTS, SEEDS, mode=sampler)
    torch.testing.assert_close(student.sample(PROMPTS, SEEDS), expected, rtol=1e-5, atol=1e-5)


def test_generate_takes_an_exported_folder(runs, tmp_path, capsys):
    exported = _benchmark().export_folder(runs("sdxl"), tmp_path / "export")
    out = tmp_path / "images"
    args = ["generate", "--run", str(exported), "--prompt", "a red cat", "--device", "cpu", "--quiet"]
    assert main([*args, "--out", str(out)]) == 0
    assert (out / "00000.png").is_file() and (out / "grid.png").is_file()
    assert main([*args, "--checkpoint", str(tmp_path)]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match=r"export\.json"):
        Student.from_export(runs("sdxl"))


def test_the_runs_text_cache_is_read_for_the_prompts_it_holds(runs, tmp_path):
    from senseflow.models.text_cache_write import write_text_cache

    live = Student.from_run(runs("sdxl"))
    write_text_cache(live.adapter, PROMPTS[:2], tmp_path / "cache", progress=False)
    cfg = live.cfg.model_copy(
        update={"model": live.cfg.model.model_copy(update={"text_cache": str(tmp_path / "cache")})}
    )
    cached = Student(cfg, live.generator.state_dict())
    assert cached.text_source.startswith("text cache")
    encode = cached.adapter.encode_text
    cached.adapter.encode_text = lambda prompts: pytest.fail(f"encoded {prompts} live")
    torch.testing.assert_close(cached.sample(PROMPTS[:2], SEEDS[:2]), live.sample(PROMPTS[:2], SEEDS[:2]))
    cached.adapter.encode_text = encode  # a prompt the cache lacks is encoded live
    torch.testing.assert_close(cached.sample(PROMPTS, SEEDS), live.sample(PROMPTS, SEEDS))
    missing = cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"text_cache": str(tmp_path / "none")})}
    )
    assert Student(missing, live.generator.state_dict()).text_source.startswith("live (")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--vae-tiling"], "--vae-tiling: the toy family has no diffusers VAE"),
        (["--vae-slicing"], "--vae-slicing: the toy family has no diffusers VAE"),
        (["--batch-size", "0"], "--batch-size: must be at least 1"),
        (["--decode-batch-size", "0"], "--decode-batch-size: must be at least 1"),
    ],
)
def test_a_bad_switch_is_one_error_naming_it(toy_run, tmp_path, capsys, flags, message):
    args = ["generate", "--run", str(toy_run), "--prompt", "a small red circle", "--out", str(tmp_path)]
    assert main([*args, "--device", "cpu", *flags]) == 2
    assert message in capsys.readouterr().err


def test_compile_compiles_the_generator_or_is_refused(toy_run, tmp_path, capsys, monkeypatch):
    """torch.compile itself is replaced here (on a CPU its first batch takes minutes); the real compile
    of the tiny SDXL student on a CPU was run by hand."""
    compiled = []

    def fake_compile(fn, *args, **kwargs):
        compiled.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    args = [
        "generate",
        "--run",
        str(toy_run),
        "--prompt",
        "a small red circle",
        "--device",
        "cpu",
        "--compile",
    ]
    assert main([*args, "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert len(compiled) == 1 and (tmp_path / "a" / "00000.png").is_file()
    monkeypatch.setattr("senseflow.generate._has_cxx", lambda: False)
    assert main([*args, "--out", str(tmp_path / "b")]) == 2
    assert "--compile: torch.compile on the CPU" in capsys.readouterr().err


def test_the_benchmark_reports_three_rows(tmp_path, capsys):
    args = ["--tiny", "flux", "--images", "1", "--batch-size", "1", "--repeats", "1", "--warmup", "0"]
    result = _benchmark().main([*args, "--device", "cpu", "--work", str(tmp_path)])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    names = [row.strip("|").split("|")[0].strip() for row in rows]
    assert names == ["senseflow generate", "sum of parts", "stock pipeline"]
    assert all(float(row.strip("|").split("|")[1]) > 0 for row in rows)
    assert result["overhead"] > 0 and result["steps"] == 4
