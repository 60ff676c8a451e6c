"""Qwen-Image against the stock ``QwenImagePipeline`` on two tiny folders: the teacher sampler with true
CFG and its norm rescaling, the prompt encoding and its masks (live and from the text cache), the
folders this family refuses, and the exported student run by the stock pipeline.

The tiny tokenizer spells the pipeline's system prompt in far more tokens than the real one, so the
template tokens the pipeline drops leave the prompt's own tokens from position 100 on: the tests use
text lengths past it (a length of 8 would give every prompt the same encoding).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import DiffusionPipeline, QwenImagePipeline

from senseflow.cli import main
from senseflow.config import ConfigError, load_config
from senseflow.families.flux.adapter import pack, unpack
from senseflow.method import student_sample
from senseflow.models import build_adapter
from senseflow.student import Student
from senseflow.teacher_sample import adapter_for_teacher, teacher_sample
from senseflow.train.trainer import Distiller
from tests.family_helpers import RESOLUTION, family_cfg, write_image_dataset

PROMPTS = ["a red cat on a mat", "two dogs on a beach at sunset"]
NEGATIVE = " "  # the recipe's model.negative_prompt
SIDE, STEPS = RESOLUTION, 3
# variant a cuts the longer prompt (138 tokens after the dropped template tokens); b keeps both whole
LENGTHS = {"a": 128, "b": 144}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _latents(adapter, seed: int = 0) -> torch.Tensor:
    shape = (len(PROMPTS), adapter.latent_channels, *adapter.latent_size(SIDE, SIDE))
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _stock(folder, latents, length, images: bool = True, **call):
    """QwenImagePipeline's final latents (unpacked) and images (None unless ``images``) from ``latents``."""
    pipe = QwenImagePipeline.from_pretrained(folder)
    common = dict(height=SIDE, width=SIDE, num_inference_steps=STEPS, max_sequence_length=length, **call)
    final = pipe(PROMPTS, latents=pack(latents), output_type="latent", **common).images
    decoded = pipe(PROMPTS, latents=pack(latents), output_type="np", **common).images if images else None
    return unpack(final, *latents.shape[-2:]), None if decoded is None else torch.from_numpy(decoded)


def _with_negative(scale: float) -> dict:
    return {"negative_prompt": [NEGATIVE] * len(PROMPTS), "true_cfg_scale": scale}


@pytest.mark.parametrize("variant", ["a", "b"])
def test_teacher_sample_equals_the_stock_pipeline(tiny_folder, variant):
    folder = tiny_folder("qwen_image", variant)
    adapter = adapter_for_teacher("qwen_image", folder, max_sequence_length=LENGTHS[variant])
    latents = _latents(adapter)
    ours = teacher_sample(adapter, PROMPTS, SIDE, SIDE, STEPS, 4.0, latents)
    final, images = _stock(folder, latents, LENGTHS[variant], **_with_negative(4.0))
    assert ours["latents"].shape == final.shape and ours["images"].shape == images.shape
    assert _relative(ours["latents"], final) < 1e-4
    assert _relative(ours["images"], images) < 1e-4
    assert ours["latents"].std() > 0 and ours["images"].std() > 0


def test_true_cfg_scales_differ_and_no_negative_prompt_means_no_cfg(tiny_folder):
    folder = tiny_folder("qwen_image", "a")
    length = LENGTHS["a"]
    adapter = adapter_for_teacher("qwen_image", folder, max_sequence_length=length)
    latents = _latents(adapter, seed=1)
    low = teacher_sample(adapter, PROMPTS, SIDE, SIDE, STEPS, 1.5, latents)["latents"]
    high = teacher_sample(adapter, PROMPTS, SIDE, SIDE, STEPS, 7.0, latents)["latents"]
    assert _relative(low, _stock(folder, latents, length, False, **_with_negative(1.5))[0]) < 1e-4
    assert _relative(low, high) > 1e-3
    # without a negative prompt the stock pipeline does not guide, whatever true_cfg_scale says
    cfg = load_config(
        "qwen_image",
        [f"model.teacher={folder}", f"model.max_sequence_length={length}", "model.negative_prompt=null"],
    )
    plain = build_adapter(cfg)
    assert plain.folder_guidance_kind() == "none"
    plain.guidance_kind = plain.folder_guidance_kind()
    unguided = teacher_sample(plain, PROMPTS, SIDE, SIDE, STEPS, 7.0, latents)["latents"]
    assert _relative(unguided, _stock(folder, latents, length, False, true_cfg_scale=7.0)[0]) < 1e-4


def test_encode_text_is_the_pipelines_encode_prompt_padded_with_its_mask(tiny_folder):
    folder = tiny_folder("qwen_image", "b")
    pipe = QwenImagePipeline.from_pretrained(folder)
    prompts = [*PROMPTS, NEGATIVE, ""]
    masks = {}
    for length in (LENGTHS["a"], LENGTHS["b"]):
        adapter = adapter_for_teacher("qwen_image", folder, max_sequence_length=length)
        cond = adapter.encode_text(prompts).tensors
        assert cond["prompt_embeds"].shape[:2] == cond["prompt_mask"].shape == (len(prompts), length)
        assert cond["prompt_mask"].dtype == torch.long
        assert adapter.text_identity()["max_sequence_length"] == length
        for i, prompt in enumerate(prompts):
            embeds, mask = pipe.encode_prompt(prompt, device="cpu", max_sequence_length=length)
            valid = embeds.shape[1] if mask is None else int(mask.sum())
            assert cond["prompt_mask"][i].tolist() == [1] * valid + [0] * (length - valid)
            ours = cond["prompt_embeds"][i]
            assert _relative(ours[:valid], embeds[0, :valid]) < 1e-5, prompt
            assert not ours[valid:].any()
        masks[length] = cond["prompt_mask"].sum(dim=1).tolist()
    # at 128 tokens the longer prompt is cut (every token valid), the others are padded
    assert masks == {LENGTHS["a"]: [125, 128, 113, 112], LENGTHS["b"]: [125, 138, 113, 112]}


def test_the_text_cache_holds_the_masks_and_gives_the_live_conditioning(tiny_folder, tmp_path):
    folder = tiny_folder("qwen_image", "a")
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    cache = tmp_path / "cache"
    overrides = [
        f"model.teacher={folder}",
        f"model.max_sequence_length={LENGTHS['a']}",
        "method.gan.type=dmd2_head",
    ]
    args = ["cache-text", "qwen_image", *overrides, "--skip-dataset", "--prompts", str(prompts_file)]
    assert main([*args, "--out", str(cache), "--device", "cpu", "--quiet"]) == 0
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["tensors"]["prompt_mask"] == {"shape": [LENGTHS["a"]], "dtype": "int64"}

    live = build_adapter(load_config("qwen_image", overrides))
    cached = build_adapter(load_config("qwen_image", [*overrides, f"model.text_cache={cache}"]))
    got, want = cached.encode_prompts(PROMPTS), live.encode_prompts(PROMPTS)
    null_got, null_want = cached.null_conditioning(2), live.null_conditioning(2)
    assert cached._text is None  # the run never loaded its text encoder
    for a, b in ((got, want), (null_got, null_want)):
        assert torch.equal(a.tensors["prompt_mask"], b.tensors["prompt_mask"])
        torch.testing.assert_close(
            a.tensors["prompt_embeds"], b.tensors["prompt_embeds"], rtol=1e-5, atol=1e-6
        )
    assert not got.tensors["prompt_mask"].all()  # padded rows: the masks came through
    negative = live.encode_text([NEGATIVE] * 2).tensors  # CFG's branch is the negative prompt, cached too
    assert torch.equal(null_want.tensors["prompt_mask"], negative["prompt_mask"])
    torch.testing.assert_close(null_want.tensors["prompt_embeds"], negative["prompt_embeds"])


def test_folders_and_settings_this_family_refuses(tiny_folder, tmp_path):
    folder = tiny_folder("qwen_image", "a")
    with pytest.raises(ValueError, match=r"model\.max_sequence_length: 2048 .* 1024"):
        build_adapter(
            load_config("qwen_image", [f"model.teacher={folder}", "model.max_sequence_length=2048"])
        )
    distilled = tmp_path / "distilled"
    shutil.copytree(folder, distilled)
    config = distilled / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "guidance_embeds": True}))
    with pytest.raises(ValueError, match=r"guidance_embeds: True.*\(guidance_embeds: False\)"):
        build_adapter(load_config("qwen_image", [f"model.teacher={distilled}"]))
    edit = tmp_path / "edit"
    shutil.copytree(folder, edit)
    index = edit / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": "QwenImageEditPipeline"}))
    with pytest.raises(ValueError, match=r"QwenImageEditPipeline folder .* reads QwenImagePipeline folders"):
        build_adapter(load_config("qwen_image", [f"model.teacher={edit}"]))
    # without its text encoder, live encoding names the folder, the component and the text cache
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    index = bare / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "text_encoder": [None, None]}))
    adapter = build_adapter(load_config("qwen_image", [f"model.teacher={bare}"]))
    with pytest.raises(ValueError, match=r"model\.teacher: .* has no text_encoder.*model\.text_cache"):
        adapter.encode_prompts(["a red cat"])
    # a family that does not read model.negative_prompt refuses it in the recipe
    with pytest.raises(ConfigError, match=r"negative_prompt: family 'sd3' does not read it"):
        load_config("sd35_large", ["model.negative_prompt=ugly"])


def _student_chain(student: Student, latents: torch.Tensor, mode: str):
    """senseflow's few-step chain; renoising draws its fresh noise as the stock flow scheduler does:
    from torch's global generator, in the packed layout."""
    adapter = student.adapter
    cond = adapter.encode_prompts(PROMPTS)
    fresh = lambda like: unpack(torch.randn(pack(like).shape), *like.shape[-2:])  # noqa: E731
    fn = lambda x, level: adapter.forward(student.generator, x, level, cond)  # noqa: E731
    with torch.no_grad():
        noise = fresh if mode == "renoise" else None
        x0 = student_sample(fn, latents, student.anchor_levels, adapter.param, mode, generator=noise)
        images = (adapter.decode(x0).float().clamp(-1, 1) + 1) / 2
    return x0, images.permute(0, 2, 3, 1)


def test_the_exported_student_runs_in_the_stock_pipeline_as_in_senseflow(tiny_folder, tmp_path):
    run, length = tmp_path / "run", 120
    data = write_image_dataset(tmp_path / "data")
    cfg = family_cfg(
        "qwen_image", tiny_folder("qwen_image", "b"), data, run, f"model.max_sequence_length={length}"
    )
    Distiller(cfg, progress=False).run()
    student = Student.from_run(run)
    latents = _latents(student.adapter, seed=3)
    for mode in ("renoise", "euler"):
        out = tmp_path / f"export_{mode}"
        assert (
            main(
                ["export", str(run), "--out", str(out), "--dtype", "fp32", "--sampler", mode, "--no-samples"]
            )
            == 0
        )
        manifest = json.loads((out / "senseflow" / "export.json").read_text())
        assert manifest["call"]["true_cfg_scale"] == 1.0 and manifest["call"]["max_sequence_length"] == length
        assert "guidance_scale" not in manifest["call"]
        pipe = DiffusionPipeline.from_pretrained(out)
        assert isinstance(pipe, QwenImagePipeline)
        call = {"num_inference_steps": manifest["num_inference_steps"], **manifest["call"]}
        stock = []
        for output_type in ("latent", "np"):
            torch.manual_seed(5)  # the renoising noise
            images = pipe(PROMPTS, latents=pack(latents), output_type=output_type, **call).images
            stock.append(torch.as_tensor(images))
        torch.manual_seed(5)
        x0, images = _student_chain(student, latents, mode)
        final = unpack(stock[0], *latents.shape[-2:])
        assert _relative(final, x0) < 1e-4, mode
        assert _relative(stock[1], images) < 1e-4, mode
        assert final.std() > 0
