"""FLUX.2-dev (``flux2``) and FLUX.2 klein base (``flux2_klein``) on tiny folders of the real classes.

The stock ``Flux2Pipeline`` / ``Flux2KleinPipeline`` are the references: the teacher sampler, the prompt
encoding, the VAE codec and the exported student all equal them, on two folders per family with
different configurations (VAE depth and latent channels, batch-norm eps, dynamic or static shift,
transformer depth and rope).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import DiffusionPipeline, Flux2KleinPipeline, Flux2Pipeline

from senseflow.cli import main
from senseflow.config import load_config
from senseflow.method import student_sample
from senseflow.models import build_adapter
from senseflow.models.build import build_networks
from senseflow.student import Student
from senseflow.teacher_sample import adapter_for_teacher, teacher_sample
from senseflow.train.plan import analyse, plan_for
from senseflow.train.trainer import Distiller
from tests.family_helpers import RESOLUTION, family_cfg, write_image_dataset

PIPELINES = {"flux2": Flux2Pipeline, "flux2_klein": Flux2KleinPipeline}
# dev's system message takes 30 tokens of the tiny tokenizer: a longer length keeps the prompts apart
LENGTH = {"flux2": 40, "flux2_klein": 16}
PROMPTS = ["a red cat on a mat", "two dogs on a beach at sunset"]
STEPS = 3
CASES = [(f, v) for f in PIPELINES for v in ("a", "b")]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _raw(pipe, x: torch.Tensor) -> torch.Tensor:
    """Model-space latents to the VAE's latent as the pipelines de-normalise them before decoding."""
    bn = pipe.vae.bn
    std = torch.sqrt(bn.running_var + pipe.vae.config.batch_norm_eps).view(1, -1, 1, 1)
    return pipe._unpatchify_latents(x * std + bn.running_mean.view(1, -1, 1, 1))


def _stock(pipe, latents, **call):
    """The pipeline's final latents (packed tokens for Flux2Pipeline, the VAE latent for klein) and images."""
    out = []
    for output_type in ("latent", "np"):
        torch.manual_seed(5)  # the flow scheduler's renoising noise (torch's global generator)
        out.append(
            torch.as_tensor(
                pipe(prompt=PROMPTS, latents=latents.clone(), output_type=output_type, **call).images
            )
        )
    return out


def _as_stock_latent(family, pipe, x):
    """Model-space latents in the layout the pipeline's ``output_type="latent"`` returns."""
    return Flux2Pipeline._pack_latents(x) if family == "flux2" else _raw(pipe, x)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks gain nothing from a second thread, and on a busy machine every op's thread barrier
    can wait a scheduler tick (the 30-layer text encoders make hundreds of ops per prompt batch)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_image_dataset(tmp_path_factory.mktemp("data"), n=4)


@pytest.mark.parametrize(("family", "variant"), CASES, ids=[f"{f}-{v}" for f, v in CASES])
def test_teacher_sample_and_prompts_equal_the_stock_pipeline(tiny_folder, family, variant):
    folder = tiny_folder(family, variant)
    adapter = adapter_for_teacher(family, folder, max_sequence_length=LENGTH[family])
    shape = (2, adapter.latent_channels, *adapter.latent_size(RESOLUTION, RESOLUTION))
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))  # the pipelines' `latents=`
    ours = teacher_sample(adapter, PROMPTS, RESOLUTION, RESOLUTION, STEPS, 4.0, latents)
    pipe = PIPELINES[family].from_pretrained(folder)
    call = dict(height=RESOLUTION, width=RESOLUTION, num_inference_steps=STEPS, guidance_scale=4.0)
    final, images = _stock(pipe, latents, max_sequence_length=LENGTH[family], **call)
    assert _relative(_as_stock_latent(family, pipe, ours["latents"]), final) < 1e-4
    assert ours["images"].shape == images.shape and _relative(ours["images"], images) < 1e-4
    assert ours["latents"].std() > 0 and images.std() > 0

    embeds, _ = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=LENGTH[family])
    mine = adapter.encode_text(PROMPTS).tensors
    assert list(mine) == ["prompt_embeds"]  # padded to the length, no mask: the pipelines pass none
    torch.testing.assert_close(mine["prompt_embeds"], embeds, rtol=0, atol=0)
    assert _relative(embeds[0], embeds[1]) > 1e-2  # the prompts reach the encoding
    if variant == "a":  # the guidance path (embedding or CFG) is exercised, not skipped
        low = teacher_sample(adapter, PROMPTS, RESOLUTION, RESOLUTION, STEPS, 1.5, latents)["latents"]
        assert _relative(low, ours["latents"]) > 1e-3


@pytest.mark.parametrize("family", list(PIPELINES))
def test_the_codec_is_the_pipelines_vae_encoding_and_decoding(tiny_folder, family):
    folder = tiny_folder(family, "b")  # batch-norm eps 1e-3, no quant convs, 4x VAE
    adapter = adapter_for_teacher(family, folder)
    pipe = PIPELINES[family].from_pretrained(folder)
    images = torch.rand(2, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(3)) * 2 - 1
    x = adapter.to_model(adapter.encode_pixels(images))
    assert tuple(x.shape[1:]) == adapter.sample_shape(RESOLUTION)
    with torch.no_grad():
        reference = pipe._encode_vae_image(images, generator=None)  # patchified, normalised, argmax
        torch.testing.assert_close(x, reference, rtol=1e-5, atol=1e-5)
        decoded = pipe.vae.decode(_raw(pipe, x)).sample
    torch.testing.assert_close(adapter.decode_model(x), decoded, rtol=1e-5, atol=1e-5)


def test_the_memory_planner_decodes_the_raw_latent(tiny_folder, dataset, tmp_path):
    """The model space is 2x2 patches; the VAE decodes the unpatchified latent (what encode_pixels gives)."""
    cfg = family_cfg("flux2_klein", tiny_folder("flux2_klein", "b"), dataset, tmp_path)
    adapter = build_adapter(cfg, text_cache=False)
    raw = adapter.raw_latent_shape(RESOLUTION)
    assert tuple(adapter.encode_pixels(torch.zeros(1, 3, RESOLUTION, RESOLUTION)).shape[1:]) == raw
    assert raw != adapter.sample_shape(RESOLUTION)
    terms = plan_for(analyse(cfg)).strategy("none").terms  # traces the decoder on the raw latent
    vae = adapter.vae
    assert terms["vae"] == sum(t.numel() * t.element_size() for t in (*vae.parameters(), *vae.buffers()))


def test_the_flux2_student_drops_exactly_the_guidance_embedding(tiny_folder, dataset, tmp_path):
    cfg = family_cfg("flux2", tiny_folder("flux2", "a"), dataset, tmp_path)
    adapter = build_adapter(cfg)
    nets = build_networks(adapter)
    teacher_keys, student_keys = set(nets.teacher.state_dict()), set(nets.generator.state_dict())
    assert adapter.dropped_keys and teacher_keys - student_keys == set(adapter.dropped_keys)
    assert all(k.startswith("time_guidance_embed.guidance_embedder.") for k in adapter.dropped_keys)
    assert nets.generator.time_guidance_embed.guidance_embedder is None
    assert not nets.fake_score.config.guidance_embeds and nets.teacher.config.guidance_embeds
    with torch.no_grad():  # a teacher whose guidance embedder adds nothing is the guidance-free student
        nets.teacher.time_guidance_embed.guidance_embedder.linear_2.weight.zero_()
    x = torch.randn(2, *adapter.sample_shape(RESOLUTION), generator=torch.Generator().manual_seed(0))
    cond, level = adapter.encode_prompts(PROMPTS), torch.tensor([0.7, 0.3])
    student = adapter.forward(nets.generator, x, level, cond)
    teacher = adapter.forward(nets.teacher, x, level, cond, guidance=torch.tensor([3.5, 6.0]))
    torch.testing.assert_close(teacher, student, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs a guidance value"):
        adapter.forward(nets.teacher, x, level, cond)
    with pytest.raises(ValueError, match="no guidance embedding"):
        adapter.forward(nets.generator, x, level, cond, guidance=torch.tensor([3.5, 6.0]))


def test_a_distilled_klein_folder_is_refused_unless_allowed(tiny_folder, tmp_path):
    folder = shutil.copytree(tiny_folder("flux2_klein", "a"), tmp_path / "klein")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    overrides = [f"model.teacher={folder}", f"data.resolution={RESOLUTION}"]
    with pytest.raises(
        ValueError, match=r"distilled few-step.*FLUX\.2-klein-base-4B.*allow_distilled_teacher"
    ):
        build_adapter(load_config("flux2_klein", overrides))
    adapter = build_adapter(load_config("flux2_klein", [*overrides, "model.allow_distilled_teacher=true"]))
    assert adapter.folder_guidance_kind() == "none"  # its pipeline runs it without CFG
    dev = [f"model.teacher={tiny_folder('flux2', 'a')}", f"data.resolution={RESOLUTION}"]
    with pytest.raises(ValueError, match=r"Flux2Pipeline folder, which model\.family 'flux2' reads"):
        build_adapter(load_config("flux2_klein", dev))


def _chain(student: Student, latents: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """senseflow's few-step chain from ``latents``, its fresh noise drawn as the stock scheduler draws
    it: torch's global generator, in the packed token layout."""
    adapter, (b, c, h, w) = student.adapter, latents.shape
    torch.manual_seed(5)

    def fresh(like):
        return torch.randn(b, h * w, c).transpose(1, 2).reshape(like.shape)

    cond = adapter.encode_prompts(PROMPTS)
    fn = lambda x, level: adapter.forward(student.generator, x, level, cond)  # noqa: E731
    with torch.no_grad():
        x0 = student_sample(fn, latents, student.anchor_levels, adapter.param, mode, generator=fresh)
        images = (adapter.decode(x0).float().clamp(-1, 1) + 1) / 2
    return x0, images.permute(0, 2, 3, 1)


def _check_export(family: str, run, out, modes=("renoise", "euler")) -> dict:
    student = Student.from_run(run)
    adapter = student.adapter
    shape = (2, adapter.latent_channels, *adapter.latent_size(RESOLUTION, RESOLUTION))
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    for mode in modes:
        folder = out / mode
        assert (
            main(
                [
                    "export",
                    str(run),
                    "--out",
                    str(folder),
                    "--dtype",
                    "fp32",
                    "--sampler",
                    mode,
                    "--no-samples",
                ]
            )
            == 0
        )
        manifest = json.loads((folder / "senseflow" / "export.json").read_text())
        pipe = DiffusionPipeline.from_pretrained(folder)
        assert type(pipe) is PIPELINES[family]
        call = {"num_inference_steps": manifest["num_inference_steps"], **manifest["call"]}
        final, images = _stock(pipe, latents, **call)
        x0, ours = _chain(student, latents, mode)
        assert _relative(_as_stock_latent(family, pipe, x0), final) < 1e-4, mode
        assert _relative(ours, images) < 1e-4, mode
    return manifest


@pytest.mark.parametrize("family", list(PIPELINES))
def test_the_exported_pipeline_runs_the_student_as_senseflow_does(tiny_folder, dataset, tmp_path, family):
    run = tmp_path / "run"
    more = [f"model.max_sequence_length={LENGTH[family]}"]
    Distiller(family_cfg(family, tiny_folder(family, "b"), dataset, run, *more), progress=False).run()
    manifest = _check_export(family, run, tmp_path / "export")
    assert manifest["call"]["max_sequence_length"] == LENGTH[family]
    assert manifest["call"].get("guidance_scale") == (1.0 if family == "flux2_klein" else None)
    config = json.loads((tmp_path / "export" / "euler" / "transformer" / "config.json").read_text())
    assert config["guidance_embeds"] is False


def test_a_lora_flux2_student_exports_with_its_guidance_value(tiny_folder, dataset, tmp_path):
    """FLUX.2's time and guidance embedders have no bias to fold a constant into: the exported LoRA
    student keeps the teacher's guidance embedder and the card's call passes the trained value."""
    run = tmp_path / "run"
    lora = ["model.lora.rank=4", "model.lora.alpha=8", "model.lora.student_guidance=2.0"]
    more = [*lora, "method.gan.type=none", f"model.max_sequence_length={LENGTH['flux2']}"]
    Distiller(family_cfg("flux2", tiny_folder("flux2", "a"), dataset, run, *more), progress=False).run()
    manifest = _check_export("flux2", run, tmp_path / "export", modes=("euler",))
    assert manifest["call"]["guidance_scale"] == 2.0
    config = json.loads((tmp_path / "export" / "euler" / "transformer" / "config.json").read_text())
    assert config["guidance_embeds"] is True
