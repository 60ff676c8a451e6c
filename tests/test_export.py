"""`senseflow export --format diffusers`: the stock pipeline class loads the folder and its stock
scheduler walks the student's chain, equal to senseflow's own sampler on tiny folders of every family.

The reference is senseflow's few-step chain (`method.student_sample` through the adapter, the code
`senseflow generate` runs), fed the same initial latents and the same fresh noise as the pipeline:
SDXL's LCMScheduler draws it from the `generator` the pipeline passes; the flow pipelines do not
pass theirs to the scheduler, so it comes from torch's global generator (packed 2x2 for FLUX).
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from diffusers import DiffusionPipeline

from senseflow.cli import main
from senseflow.export.card import front_matter
from senseflow.families.flux.adapter import pack, unpack
from senseflow.method import student_sample
from senseflow.student import Student
from senseflow.train.trainer import Distiller
from tests.family_helpers import RESOLUTION, family_cfg, write_image_dataset
from tests.test_single_file_flow import flux_width  # noqa: F401  (a fixture)

FAMILIES = ("sdxl", "sd3", "flux")
PROMPTS = ["a red cat on a mat", "two dogs on a beach"]
STOCK = {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def runs(tiny_folder, tmp_path_factory):
    """One short distillation per family on the variant with unusual shapes and schedules."""
    root = tmp_path_factory.mktemp("export_runs")
    data = write_image_dataset(root / "data")
    out = {}
    for family in FAMILIES:
        cfg = family_cfg(family, tiny_folder(family, "b"), data, root / family)
        Distiller(cfg, progress=False).run()
        out[family] = root / family
    return out


def export(run, out, *args: str) -> dict:
    assert main(["export", str(run), "--out", str(out), "--dtype", "fp32", *args]) == 0
    return json.loads((out / "senseflow" / "export.json").read_text())


def senseflow_chain(student: Student, latents: torch.Tensor, mode: str, fresh):
    """senseflow's few-step chain from ``latents`` with fresh noise from ``fresh(like)``."""
    adapter, generator = student.adapter, student.generator
    cond = adapter.encode_prompts(PROMPTS)
    fn = lambda x, level: adapter.forward(generator, x, level, cond)  # noqa: E731
    with torch.no_grad():
        x0 = student_sample(fn, latents, student.anchor_levels, adapter.param, mode, generator=fresh)
        images = (adapter.decode(x0).float().clamp(-1, 1) + 1) / 2
    return x0, images.permute(0, 2, 3, 1)


def stock_chain(family: str, folder, latents: torch.Tensor, call: dict, noise_seed: int):
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe).__name__ == STOCK[family]
    given = pack(latents) if family == "flux" else latents
    results = []
    for output_type in ("latent", "np"):
        torch.manual_seed(noise_seed)  # the flow schedulers' renoising noise
        out = pipe(
            PROMPTS,
            latents=given.clone(),
            generator=torch.Generator().manual_seed(noise_seed),  # LCM's renoising noise
            output_type=output_type,
            **call,
        ).images
        results.append(torch.as_tensor(out))
    final, images = results
    if family == "flux":
        final = unpack(final, *latents.shape[-2:])
    return final, images


def _fresh(family: str, noise_seed: int, mode: str):
    """senseflow's noise source drawing what the stock scheduler draws, in its order and layout."""
    if mode == "euler":
        return None
    if family == "sdxl":
        g = torch.Generator().manual_seed(noise_seed)
        return lambda like: torch.randn(like.shape, generator=g)
    torch.manual_seed(noise_seed)
    if family == "flux":
        return lambda like: unpack(torch.randn(pack(like).shape), *like.shape[-2:])
    return lambda like: torch.randn(like.shape)


@pytest.mark.parametrize("mode", ["renoise", "euler"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_stock_pipeline_runs_the_exported_student_as_senseflow_does(runs, tmp_path, family, mode):
    out = tmp_path / "export"
    manifest = export(runs[family], out, "--sampler", mode, "--no-samples")
    student = Student.from_run(runs[family])
    side = RESOLUTION // student.adapter.vae_scale_factor
    latents = torch.randn(
        2, student.adapter.latent_channels, side, side, generator=torch.Generator().manual_seed(0)
    )
    call = {"num_inference_steps": manifest["num_inference_steps"], **manifest["call"]}
    final, images = stock_chain(family, out, latents, call, noise_seed=5)
    x0, ours = senseflow_chain(student, latents, mode, _fresh(family, 5, mode))
    assert final.shape == x0.shape and images.shape == ours.shape
    assert _relative(final, x0) < 1e-4
    assert _relative(images, ours) < 1e-4
    assert final.std() > 0


def test_an_sdxl_image_is_the_same_from_senseflow_generate_and_the_plain_pipeline_call(runs, tmp_path):
    """SDXL's default anchors are LCM's own 4-step walk, and LCM renoises with the pipeline's
    generator: one prompt and one seed give the same image with no extra arguments."""
    out = tmp_path / "export"
    manifest = export(runs["sdxl"], out, "--no-samples")
    assert manifest["exact_call"] == {} and manifest["default_walk_max_difference"] == 0
    pipe = DiffusionPipeline.from_pretrained(out)
    seed = 11
    image = pipe(
        PROMPTS[0],
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        num_inference_steps=4,
        **manifest["call"],
    ).images
    ours = Student.from_run(runs["sdxl"]).sample([PROMPTS[0]], [seed])
    assert _relative(torch.as_tensor(image), ((ours + 1) / 2).permute(0, 2, 3, 1)) < 1e-4


def test_flux_export_has_no_guidance_embedding_and_records_the_default_walk(runs, tmp_path):
    out = tmp_path / "export"
    manifest = export(runs["flux"], out, "--no-samples")
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert config["guidance_embeds"] is False
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["stochastic_sampling"]
    assert scheduler["use_dynamic_shifting"] is False
    # the recipe's anchors are rounded σ: the plain call walks the fitted shift's grid, close to them
    assert 0 < manifest["default_walk_max_difference"] < 1e-3
    assert len(manifest["exact_call"]["sigmas"]) == 4


def test_the_model_card_parses_and_names_the_settings(runs, tmp_path):
    records = tmp_path / "eval" / "records"
    records.mkdir(parents=True)
    for name, fid in (("student", 12.345), ("teacher", None)):  # the layout `senseflow eval` writes
        metrics = {"fid_t": {"value": fid}} if fid else {}
        model = {"name": name, "kind": name, "sampler": "renoise", "nfe": 4}
        record = {"model": model, "reference": {"name": "teacher"}, "metrics": metrics}
        (records / f"{name}.json").write_text(json.dumps(record))
    out = tmp_path / "export"
    manifest = export(runs["sd3"], out, "--eval", str(tmp_path / "eval"))
    text = (out / "README.md").read_text()
    meta = front_matter(text)
    assert meta["pipeline_tag"] == "text-to-image" and meta["library_name"] == "diffusers"
    assert meta["license"] == "other" and "senseflow" in meta["tags"]
    body = text.split("---", 2)[2]
    assert "num_inference_steps=4" in body and "FlowMatchEulerDiscreteScheduler" in body
    assert "guidance_scale=1.0" in body and "max_sequence_length=8" in body
    assert "torch.manual_seed" in body  # renoise noise of the flow pipelines: torch's global generator
    # SD 3's plain walk ends near σ = 0; the fitted shift and the stretch to the last anchor make it
    # walk the anchors, so the card's call needs no σ list
    assert manifest["exact_call"] == {} and manifest["default_walk_max_difference"] < 1e-6
    assert "sigmas=" not in body
    assert (out / "samples.png").is_file() and "![samples](samples.png)" in body
    evaluation = body[body.index("## Evaluation") :]
    assert "| student | renoise | 4 | 12.35 |" in evaluation
    assert evaluation.index("| teacher") < evaluation.index("| student")
    recipe = yaml.safe_load((out / "senseflow" / "recipe.yaml").read_text())
    assert recipe["model"]["anchors"]["units"] == "sigma"
    assert manifest["step"] == 2


def test_export_refuses_a_non_empty_folder_and_keeps_it(runs, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main(["export", str(runs["sdxl"]), "--out", str(out), "--no-samples"])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine" and not list(tmp_path.glob("taken.*"))
    assert main(["export", str(runs["sdxl"]), "--out", str(out), "--no-samples", "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model_index.json").is_file()
    assert not list(tmp_path.glob("taken.*"))  # neither the staging folder nor the old one is left


def test_export_errors_name_the_flag(runs, tmp_path, capsys):
    assert main(["export", str(runs["sdxl"]), "--out", str(tmp_path / "x"), "--step", "7"]) == 2
    assert "--step 7" in capsys.readouterr().err
    assert main(["export", str(runs["sdxl"]), "--out", str(tmp_path / "y"), "--format", "lora"]) == 2
    assert "--rank" in capsys.readouterr().err
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob("y.*"))


def _same(loaded: dict, original: dict) -> None:
    assert loaded.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_round_trips_through_diffusers_own_converters(
    runs,
    tiny_folder,
    tmp_path,
    family,
    flux_width,  # noqa: F811 (the fixture imported above)
):
    """The exported file read back by `from_single_file` (diffusers' original-layout converters)
    equals the student's network and, for SDXL's whole checkpoint, the teacher's other components."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusionXLPipeline
    from safetensors import safe_open

    out = tmp_path / "single"
    manifest_free = ["--format", "single-file", "--no-samples"]
    assert main(["export", str(runs[family]), "--out", str(out), "--dtype", "fp32", *manifest_free]) == 0
    (path,) = out.glob("*.safetensors")
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["senseflow.export"])["num_inference_steps"] == 4
    student = Student.from_run(runs[family])
    network = {k: v.float() for k, v in student.generator.state_dict().items()}
    teacher = tiny_folder(family, "b")
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline.from_single_file(
            str(path), config=str(teacher), local_files_only=True
        )
        _same(pipe.unet.state_dict(), network)
        reference = DiffusionPipeline.from_pretrained(teacher)
        for component in ("vae", "text_encoder", "text_encoder_2"):
            _same(getattr(pipe, component).state_dict(), getattr(reference, component).state_dict())
        return
    cls = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
    config = json.loads((out / "transformer" / "config.json").read_text())
    if family == "flux":
        assert config["guidance_embeds"] is False
        flux_width(config["num_attention_heads"] * config["attention_head_dim"])
    loaded = cls.from_single_file(str(path), config=str(out), subfolder="transformer", local_files_only=True)
    _same(loaded.state_dict(), network)


def test_a_toy_run_is_refused_with_one_message(tiny_teacher_dir, tmp_path, capsys):
    from tests.trainer_helpers import toy_cfg

    run = tmp_path / "toy"
    Distiller(
        toy_cfg(tiny_teacher_dir, run, "schedule.iterations=1", checkpoint_every=1), progress=False
    ).run()
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no stock diffusers pipeline" in err and "sdxl, sd3 or flux" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.*"))


def test_the_eval_student_source_takes_an_exported_folder(runs, tmp_path):
    from senseflow.eval.config import ModelEntry
    from senseflow.eval.sources import build_source

    out = tmp_path / "export"
    export(runs["flux"], out, "--no-samples")
    exported = build_source(ModelEntry(name="exported", kind="student", path=str(out)), device="cpu")
    trained = build_source(ModelEntry(name="run", kind="student", path=str(runs["flux"])), device="cpu")
    assert exported.identity()["checkpoint_sha256"] == trained.identity()["checkpoint_sha256"]
    assert exported.identity()["export_dtype"] == "fp32"
    torch.testing.assert_close(
        exported.generate(PROMPTS, [0, 1]), trained.generate(PROMPTS, [0, 1]), rtol=1e-5, atol=1e-5
    )


def test_staging_replaces_a_file_or_a_folder_only_once_complete(tmp_path):
    from senseflow.export.cli import staged

    target = tmp_path / "out"
    target.write_text("an old file")
    with pytest.raises(RuntimeError), staged(target, overwrite=True) as tmp:
        (tmp / "half.bin").write_text("x")
        raise RuntimeError("killed mid-export")
    assert target.read_text() == "an old file" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with staged(target, overwrite=True) as tmp:
        (tmp / "model_index.json").write_text("{}")
    assert (target / "model_index.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
