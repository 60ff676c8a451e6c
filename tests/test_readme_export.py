"""The README's "Using your student" section runs as written on a tiny SDXL folder: its three
`senseflow export` commands, then each block of stock diffusers code that loads what they wrote.

Only paths are substituted (the run, the export folder and the teacher's hub id, which is a tiny local
folder here); the hub is switched off so nothing can be fetched.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from senseflow.cli import main
from senseflow.train.trainer import Distiller
from tests.family_helpers import family_cfg, write_image_dataset

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Using your student"
TEACHER_ID = "stabilityai/stable-diffusion-xl-base-1.0"


def _blocks(language: str) -> list[str]:
    text = README.read_text()
    section = text[text.index(SECTION) :]
    section = section[: section.index("\n## ", len(SECTION))]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def test_the_readme_export_commands_and_code_run(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    teacher = tiny_folder("sdxl", "b")
    run = tmp_path / "runs" / "sdxl"
    Distiller(family_cfg("sdxl", teacher, write_image_dataset(tmp_path / "data"), run), progress=False).run()
    paths = {"runs/sdxl": str(run), "exports/": f"{tmp_path}/exports/", TEACHER_ID: str(teacher)}

    def substitute(text: str) -> str:
        for old, new in paths.items():
            text = text.replace(old, new)
        return text

    (commands,) = _blocks("bash")
    lines = [shlex.split(substitute(line), comments=True) for line in commands.strip().splitlines()]
    assert len(lines) == 3 and all(words[:2] == ["senseflow", "export"] for words in lines)
    for words in lines:
        assert main(words[1:]) == 0, words
    code = _blocks("python")
    assert len(code) == 3
    for block in code:
        namespace: dict = {}
        exec(compile(substitute(block), str(README), "exec"), namespace)
        image = namespace["image"]
        assert isinstance(image, Image.Image) and np.asarray(image).std() > 0


@pytest.mark.parametrize("language", ["bash", "python"])
def test_the_section_exists(language):
    assert _blocks(language)
