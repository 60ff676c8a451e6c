"""`senseflow export --format lora`: a LoRA-mode run's adapter, loaded by diffusers' own
`load_lora_weights` into the teacher's stock pipeline, gives the student's network; a full fine-tune's
LoRA is extracted by SVD with its reconstruction error reported."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors import safe_open

from senseflow.cli import main
from senseflow.export.formats import COMFY_LORA_FILE, LORA_FILE
from senseflow.export.network import extract_lora, factors_delta, student_network
from senseflow.models.build import TeacherWeights
from senseflow.student import Student
from senseflow.train.trainer import Distiller
from tests.family_helpers import RESOLUTION, family_cfg, write_image_dataset

FAMILIES = ("sdxl", "sd3", "flux")
# alpha != rank: the exported factors must carry peft's alpha / rank scaling
LORA = ("model.lora.rank=4", "model.lora.alpha=8", "method.ida.lam=0.9", "method.gan.type=none")
MORE = {"flux": ("model.lora.student_guidance=2.0",)}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_image_dataset(tmp_path_factory.mktemp("lora_data"))


def _network_output(student: Student, net: torch.nn.Module) -> torch.Tensor:
    """One call of ``net`` as the student's adapter makes it, on fixed inputs."""
    adapter = student.adapter
    shape = (2, *adapter.sample_shape(RESOLUTION))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    cond = adapter.encode_prompts(["a red cat", "a blue dog"])
    level = student.anchor_levels[1].expand(2)
    with torch.no_grad():
        return adapter.forward(net, x, level, cond).float()


@pytest.fixture(scope="module")
def lora_runs(tiny_folder, data, tmp_path_factory):
    """One short LoRA-mode distillation per family."""
    root = tmp_path_factory.mktemp("lora_runs")
    for family in FAMILIES:
        more = (*LORA, *MORE.get(family, ()), "schedule.iterations=3")
        Distiller(
            family_cfg(family, tiny_folder(family, "a"), data, root / family, *more), progress=False
        ).run()
    return root


@pytest.mark.parametrize("family", FAMILIES)
def test_the_lora_on_the_teacher_pipeline_is_the_student(tiny_folder, lora_runs, tmp_path, family):
    teacher = tiny_folder(family, "a")
    run = lora_runs / family
    out = tmp_path / "lora"
    assert (
        main(["export", str(run), "--format", "lora", "--out", str(out), "--dtype", "fp32", "--no-samples"])
        == 0
    )
    with safe_open(str(out / LORA_FILE), "pt") as f:
        settings = json.loads(f.metadata()["senseflow.export"])
        keys = list(f.keys())
    assert settings["num_inference_steps"] == 4 and settings["scheduler"] in (
        "LCMScheduler",
        "FlowMatchEulerDiscreteScheduler",
    )
    network = "unet" if family == "sdxl" else "transformer"
    assert keys and all(k.startswith(f"{network}.") and ".lora_" in k for k in keys)
    assert (out / COMFY_LORA_FILE).is_file() == (family != "sd3")

    student = Student.from_run(run)
    pipe = DiffusionPipeline.from_pretrained(teacher)
    plain = _network_output(student, getattr(pipe, network))
    pipe.load_lora_weights(str(out))
    loaded = _network_output(student, getattr(pipe, network))
    ours = _network_output(student, student.generator)
    moved = (plain - ours).norm()
    assert moved > 0, "training did not move the adapter: the comparison would be vacuous"
    assert (loaded - ours).norm() / moved < 1e-3
    refused = ["export", str(run), "--format", "lora", "--rank", "2", "--out", str(tmp_path / "again")]
    assert main(refused) == 2  # a LoRA run exports its own adapter; --rank is for extraction
    card = (out / "README.md").read_text()
    assert "load_lora_weights" in card and 'subfolder="scheduler"' in card
    if family == "flux":  # the LoRA student runs the teacher's guidance embedder at a constant
        assert "guidance_scale=2.0" in card


def test_a_flux_lora_student_exports_as_a_pipeline_without_guidance_input(lora_runs, tmp_path):
    """The LoRA student runs the teacher's guidance embedder at a constant; the diffusers export
    merges the adapter and folds that constant into the time embedding's bias."""
    out = tmp_path / "pipeline"
    assert (
        main(["export", str(lora_runs / "flux"), "--out", str(out), "--dtype", "fp32", "--no-samples"]) == 0
    )
    pipe = DiffusionPipeline.from_pretrained(out)
    assert pipe.transformer.config.guidance_embeds is False
    student = Student.from_run(lora_runs / "flux")
    exported, ours = _network_output(student, pipe.transformer), _network_output(student, student.generator)
    assert _relative(exported, ours) < 1e-5


def test_a_full_fine_tune_gives_a_lora_by_svd_with_its_error(tiny_folder, data, tmp_path, capsys):
    teacher = tiny_folder("sdxl", "a")
    run = tmp_path / "run"
    Distiller(family_cfg("sdxl", teacher, data, run, "schedule.iterations=3"), progress=False).run()
    student = Student.from_run(run)
    weights = TeacherWeights(student.adapter.weight_files())
    network = student_network(student.generator)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    full = extract_lora(network, weights, 10_000, targets)  # rank above every layer's size: exact
    low = extract_lora(network, weights, 1, targets)
    assert full.relative_error < 1e-5 < low.relative_error < 1
    student_state = network.state_dict()
    for key, delta in factors_delta(full.factors).items():
        exact = student_state[key].float() - weights.read(key).float()
        torch.testing.assert_close(delta, exact, rtol=1e-4, atol=1e-6)
    assert full.outside_tensors and 0 < full.outside_share < 1  # training also moved norms and convs

    out = tmp_path / "lora"
    args = ["export", str(run), "--format", "lora", "--rank", "2", "--out", str(out), "--no-samples"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "extracted rank 2 by SVD: relative error" in printed
    assert "relative error" in (out / "README.md").read_text()
    pipe = DiffusionPipeline.from_pretrained(teacher)
    pipe.load_lora_weights(str(out))  # the stock loader accepts the extracted file
