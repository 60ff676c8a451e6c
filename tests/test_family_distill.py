"""SDXL, SD 3.5 and FLUX through the one trainer on tiny folders: every shipped recipe trains, N + N
iterations resume to the same weights as 2N, FSDP2 on two CPU ranks equals one process, the FLUX
student is the teacher without its guidance embedding, and a trained student generates."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from senseflow.models import build_adapter
from senseflow.models.build import build_networks
from senseflow.student import Student
from senseflow.train import checkpoint as ckpt
from senseflow.train.trainer import Distiller
from tests.family_helpers import RECIPES, SMALL, family_cfg, write_image_dataset

ROOT = Path(__file__).resolve().parents[1]
# The whole method at once: DMD + IDA + ISG + backward simulation + the DMD2 head (gan.type in SMALL).
FULL = ["method.ida.enabled=true", "method.ida.lam=0.97", "method.backward_sim_prob=0.5"]


def _weights(run: Path, step: int) -> dict[str, dict[str, torch.Tensor]]:
    folder = run / "checkpoints" / f"step-{step:08d}"
    return {m: ckpt.read_network(folder, m) for m in ("generator", "fake_score", "discriminator")}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_image_dataset(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("family", list(RECIPES))
def test_resume_is_bit_exact_and_the_student_generates(tiny_folder, dataset, tmp_path, family):
    folder = tiny_folder(family, "b")  # the variants with unusual widths, latent channels and schedules

    def run(out, iterations, *more):
        cfg = family_cfg(family, folder, dataset, out, *FULL, f"schedule.iterations={iterations}", *more)
        return Distiller(cfg, progress=False).run()

    logs = run(tmp_path / "straight", 4, "checkpoint.every=2", "logging.sample_every=4")
    run(tmp_path / "split", 2, "checkpoint.every=2")
    run(tmp_path / "split", 4, "checkpoint.every=2", "checkpoint.resume=latest")
    assert all(torch.isfinite(torch.tensor(v)) for k, v in logs.items() if k.startswith("loss_"))
    straight, split = _weights(tmp_path / "straight", 4), _weights(tmp_path / "split", 4)
    for module, tensors in straight.items():
        for key, value in tensors.items():
            assert torch.equal(value, split[module][key]), f"{module}.{key} differs after resume"
    initial = build_networks(build_adapter(family_cfg(family, folder, dataset, tmp_path / "x")))
    moved = [
        k for k, v in initial.generator.state_dict().items() if not torch.equal(v, straight["generator"][k])
    ]
    assert moved, "training did not change the generator"
    assert (tmp_path / "straight" / "samples" / "step-00000004.png").is_file()  # decoded through the VAE

    student = Student.from_run(tmp_path / "straight", device="cpu")
    images = student.sample(["a red cat", "a blue dog"], [0, 1], mode="renoise")
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
    again = student.sample(["a blue dog"], [1], mode="renoise")
    torch.testing.assert_close(
        again[0], images[1], rtol=1e-4, atol=1e-4
    )  # an image depends on (prompt, seed)


@pytest.mark.parametrize("recipe", ["sd35_medium", "dmd2_sdxl"])
def test_the_other_shipped_recipes_train(tiny_folder, dataset, tmp_path, recipe):
    family = "sd3" if recipe.startswith("sd35") else "sdxl"
    cfg = family_cfg(
        family, tiny_folder(family, "a"), dataset, tmp_path, "schedule.iterations=2", recipe=recipe
    )
    logs = Distiller(cfg, progress=False).run()
    assert torch.isfinite(torch.tensor(logs["loss_fake"]))
    assert (tmp_path / "checkpoints" / "step-00000002").is_dir()


def test_prompts_only_data_trains_by_backward_simulation(tiny_folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\ntwo birds\n")
    cfg = family_cfg(
        "flux",
        tiny_folder("flux", "a"),
        prompts,
        tmp_path / "run",
        "data.kind=prompts",
        "method.backward_sim_prob=1.0",
        "method.gan.type=none",
        "method.gan.weight=0",
        "schedule.iterations=2",
    )
    logs = Distiller(cfg, progress=False).run()
    assert "loss_dmd" in logs or "loss_fake" in logs


def test_flux_student_drops_exactly_the_guidance_embedding(tiny_folder, dataset, tmp_path):
    cfg = family_cfg("flux", tiny_folder("flux", "a"), dataset, tmp_path)
    adapter = build_adapter(cfg)
    nets = build_networks(adapter)
    teacher_keys = set(nets.teacher.state_dict())
    student_keys = set(nets.generator.state_dict())
    assert adapter.dropped_keys and all(
        k.startswith("time_text_embed.guidance_embedder.") for k in adapter.dropped_keys
    )
    assert teacher_keys - student_keys == set(adapter.dropped_keys)
    assert student_keys <= teacher_keys
    assert not nets.generator.config.guidance_embeds and nets.teacher.config.guidance_embeds
    # With the guidance embedder's output layer zeroed the teacher adds nothing for guidance: it must then
    # equal the guidance-free student, whatever guidance value it is given.
    with torch.no_grad():
        last = nets.teacher.time_text_embed.guidance_embedder.linear_2
        last.weight.zero_()
        last.bias.zero_()
    x = torch.randn(2, *adapter.sample_shape(64), generator=torch.Generator().manual_seed(0))
    cond = adapter.encode_prompts(["a red cat", "a blue dog"])
    level = torch.tensor([0.7, 0.3])
    student = adapter.forward(nets.generator, x, level, cond)
    teacher = adapter.forward(nets.teacher, x, level, cond, guidance=torch.tensor([3.5, 6.0]))
    torch.testing.assert_close(teacher, student, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs a guidance value"):
        adapter.forward(nets.teacher, x, level, cond)


def _train_cli(family: str, *args: str, ranks: int = 1) -> None:
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*launcher, "-m", "senseflow.cli", "train", "--quiet", RECIPES[family], *SMALL, *args]
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "sdxl"])
def test_fsdp2_on_two_ranks_equals_one_process(tiny_folder, dataset, tmp_path, family):
    common = [f"model.teacher={tiny_folder(family, 'a')}", f"data.path={dataset}", *FULL]
    common += ["schedule.iterations=4", "checkpoint.every=4"]
    if family != "sdxl":
        common.append("model.max_sequence_length=8")
    _train_cli(family, *common, "data.batch_size=2", f"output_dir={tmp_path / 'one'}")
    _train_cli(
        family,
        *common,
        "data.batch_size=1",
        "parallel.strategy=fsdp",
        f"output_dir={tmp_path / 'two'}",
        ranks=2,
    )
    one, two = _weights(tmp_path / "one", 4), _weights(tmp_path / "two", 4)
    for module, tensors in one.items():
        assert tensors.keys() == two[module].keys()
        for key, value in tensors.items():
            torch.testing.assert_close(value, two[module][key], rtol=1e-4, atol=1e-4, msg=f"{module}.{key}")


def test_generate_and_the_eval_student_source_take_a_real_familys_run(tiny_folder, dataset, tmp_path):
    from senseflow.cli import main
    from senseflow.eval.config import ModelEntry
    from senseflow.eval.sources import build_source

    run = tmp_path / "run"
    Distiller(family_cfg("sdxl", tiny_folder("sdxl", "a"), dataset, run), progress=False).run()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n")
    out = tmp_path / "images"
    assert (
        main(["generate", "--run", str(run), "--prompts", str(prompts), "--out", str(out), "--device", "cpu"])
        == 0
    )
    assert (out / "00000.png").is_file() and (out / "00001.png").is_file() and (out / "grid.png").is_file()
    source = build_source(ModelEntry(name="student", kind="student", path=str(run)), device="cpu")
    images = source.generate(["a red cat"], [0])
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
    assert source.identity()["kind"] == "student"
