import json

import pytest
import torch

from senseflow.cli import main
from senseflow.student import Student
from senseflow.train.trainer import Distiller
from tests.trainer_helpers import toy_cfg as _cfg


@pytest.fixture(scope="module")
def tiny_run(tiny_teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run = Distiller(_cfg(tiny_teacher_dir, out, "schedule.iterations=1"), progress=False)
    run.run()
    return out, run


def test_student_loads_the_trained_generator(tiny_run):
    out, run = tiny_run
    student = Student.from_run(out)
    for key, value in run.generator.state_dict().items():
        assert torch.equal(student.generator.state_dict()[key], value)


@pytest.mark.parametrize("mode", ["renoise", "euler"])
def test_images_depend_only_on_prompt_and_seed(tiny_run, mode):
    student = Student.from_run(tiny_run[0])
    prompts = ["a small red circle", "a large blue square above a small green triangle"]
    both = student.sample(prompts, [3, 4], mode=mode)
    alone = student.sample(prompts[1:], [4], mode=mode)
    assert both.shape == (2, 3, 32, 32) and both.abs().max() <= 1
    torch.testing.assert_close(both[1:], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(student.sample(prompts[:1], [5], mode=mode), both[:1])


def test_generate_command(tiny_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small red circle\n\na large cyan triangle\n")
    out = tmp_path / "images"
    assert main(["generate", "--run", str(tiny_run[0]), "--prompts", str(prompts), "--out", str(out)]) == 0
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert (
        [r["seed"] for r in index] == [0, 1]
        and (out / "00001.png").is_file()
        and (out / "grid.png").is_file()
    )


def test_generate_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--run", str(tmp_path), "--prompt", "a small red circle"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
