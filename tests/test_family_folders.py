"""Bad teacher folders: each is one clear error naming the folder or file and what was expected."""

from __future__ import annotations

import json
import shutil

import pytest

from senseflow.families.diffusers_folder import TeacherFolder, resolve_teacher
from senseflow.teacher_sample import adapter_for_teacher


@pytest.mark.parametrize(
    ("family", "folder_of", "expected"),
    [
        (
            "sdxl",
            "sd3",
            r"StableDiffusion3Pipeline folder .*reads StableDiffusionXLPipeline folders.*missing: unet",
        ),
        (
            "sd3",
            "flux",
            r"FluxPipeline folder whose transformer is a FluxTransformer2DModel.*SD3Transformer2DModel",
        ),
        ("flux", "sd3", r"StableDiffusion3Pipeline folder whose transformer is a SD3Transformer2DModel"),
    ],
)
def test_another_familys_folder_is_named(tiny_folder, family, folder_of, expected):
    with pytest.raises(ValueError, match=expected):
        adapter_for_teacher(family, tiny_folder(folder_of, "a"))


def test_missing_index_component_and_weights_are_named(tiny_folder, tmp_path):
    folder = tmp_path / "teacher"
    shutil.copytree(tiny_folder("sd3", "a"), folder)
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    adapter = adapter_for_teacher("sd3", folder)
    with pytest.raises(FileNotFoundError, match=r"transformer: no diffusion_pytorch_model\.safetensors"):
        adapter.weight_files()
    index = json.loads((folder / "model_index.json").read_text())
    index["vae"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"missing: vae"):
        adapter_for_teacher("sd3", folder)
    (folder / "model_index.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"model_index\.json is missing"):
        TeacherFolder(folder)


def test_a_teacher_that_is_neither_a_folder_nor_a_cached_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"is not an existing folder .* nor a hub id"):
        resolve_teacher("data/models/sdxl-base")  # a mistyped relative path, not an org/name id
    with pytest.raises(
        FileNotFoundError, match=r"neither a local folder nor in the hub cache.*allow_download"
    ):
        resolve_teacher("no-such-org/no-such-model")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        resolve_teacher(str(tmp_path / "file"))
