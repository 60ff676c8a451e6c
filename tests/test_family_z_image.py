"""Z-Image (``model.family: z_image``) against the stock ``ZImagePipeline`` on tiny folders of the real
classes: the teacher sampler, prompt encoding, the offline text cache, the Turbo refusal, the network's
parallel plan and ``senseflow export``.

The stock pipeline writes its chat-templated prompts into the lists it is given, so every call here
gets fresh lists. Its ``guidance_scale`` w is ``pos + w (pos − neg)``: senseflow's guidance w + 1.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import ZImagePipeline

from senseflow.cli import main
from senseflow.config import load_config
from senseflow.method import student_sample
from senseflow.models import build_adapter
from senseflow.models.batch import Batch
from senseflow.models.build import build_networks
from senseflow.student import Student
from senseflow.teacher_sample import teacher_sample
from senseflow.train.trainer import Distiller
from tests.family_helpers import RESOLUTION, family_cfg, write_image_dataset

PROMPTS = ["a red cat on a mat", "two dogs on a beach at sunset"]
STEPS = 3
LENGTH = 48  # long enough for prompts of different lengths after the chat template
TURBO_CARD = "---\nbase_model: Tongyi-MAI/Z-Image-Turbo\nlicense: apache-2.0\n---\n# a fine-tune\n"


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _adapter(folder, *more: str):
    overrides = [
        f"model.teacher={folder}",
        f"data.resolution={RESOLUTION}",
        f"model.max_sequence_length={LENGTH}",
    ]
    overrides += ["precision.teacher_dtype=fp32", "method.gan.type=dmd2_head", *more]
    return build_adapter(load_config("z_image", overrides))


def _latents(adapter, seed: int) -> torch.Tensor:
    side = RESOLUTION // adapter.vae_scale_factor
    return torch.randn(2, adapter.latent_channels, side, side, generator=torch.Generator().manual_seed(seed))


def _stock(folder, latents, guidance: float, negative: str | None):
    """ZImagePipeline's final latents and images for PROMPTS."""
    pipe = ZImagePipeline.from_pretrained(folder)
    out = []
    for output_type in ("latent", "np"):
        result = pipe(
            list(PROMPTS),
            negative_prompt=None if negative is None else [negative] * len(PROMPTS),
            latents=latents.clone(),
            height=RESOLUTION,
            width=RESOLUTION,
            num_inference_steps=STEPS,
            guidance_scale=guidance,
            max_sequence_length=LENGTH,
            output_type=output_type,
        )
        out.append(torch.as_tensor(result.images))
    return out


CASES = [("a", 4.0, None), ("b", 2.5, "blurry, low quality")]  # variant, pipeline guidance, negative prompt


@pytest.mark.parametrize(("variant", "guidance", "negative"), CASES)
def test_teacher_sample_equals_the_stock_pipeline(tiny_folder, variant, guidance, negative):
    folder = tiny_folder("z_image", variant)
    more = [] if negative is None else [f"model.negative_prompt={negative}"]
    adapter = _adapter(folder, *more)
    latents = _latents(adapter, 0)
    ours = teacher_sample(adapter, PROMPTS, RESOLUTION, RESOLUTION, STEPS, guidance + 1.0, latents)
    final, images = _stock(folder, latents, guidance, negative)
    assert ours["latents"].shape == final.shape and ours["images"].shape == images.shape
    assert _relative(ours["latents"], final) < 1e-4
    assert _relative(ours["images"], images) < 1e-4
    assert ours["latents"].std() > 0


def test_guidance_and_no_guidance_are_the_pipelines(tiny_folder):
    """Pipeline guidance 0 (no CFG: one conditional pass) and 6: each the pipeline's, and different."""
    folder = tiny_folder("z_image", "a")
    adapter = _adapter(folder, "model.negative_prompt=a grey sky")
    latents = _latents(adapter, 1)
    results = {}
    for guidance in (0.0, 6.0):
        ours = teacher_sample(adapter, PROMPTS, RESOLUTION, RESOLUTION, STEPS, guidance + 1.0, latents)
        final, _ = _stock(folder, latents, guidance, "a grey sky")
        assert _relative(ours["latents"], final) < 1e-4
        results[guidance] = ours["latents"]
    assert _relative(results[0.0], results[6.0]) > 1e-3


def test_encode_text_is_the_pipelines_encode_prompt_on_the_valid_tokens(tiny_folder):
    folder = tiny_folder("z_image", "b")
    adapter = _adapter(folder)
    prompts = ["", PROMPTS[0], " ".join([PROMPTS[1]] * 4)]  # the last is cut at LENGTH, as the pipeline cuts
    cond = adapter.encode_text(prompts)
    pipe = ZImagePipeline.from_pretrained(folder)
    reference, _ = pipe.encode_prompt(
        list(prompts), device="cpu", do_classifier_free_guidance=False, max_sequence_length=LENGTH
    )
    embeds, mask = cond.tensors["prompt_embeds"], cond.tensors["prompt_mask"]
    width = pipe.text_encoder.config.hidden_size
    assert embeds.shape == (3, LENGTH, width) and mask.shape == (3, LENGTH) and mask.dtype == torch.int64
    lengths = [len(r) for r in reference]
    assert lengths[0] < lengths[1] < lengths[2] == LENGTH
    for i, (ref, n) in enumerate(zip(reference, lengths, strict=True)):
        assert mask[i].tolist() == [1] * n + [0] * (LENGTH - n)
        assert torch.equal(embeds[i, :n], ref)
        assert not embeds[i, n:].any()
    assert adapter.conditioning_shapes() == {"prompt_embeds": (LENGTH, width), "prompt_mask": (LENGTH,)}


def test_cache_text_stores_the_masks_and_a_cached_run_conditions_as_live(tiny_folder, tmp_path):
    data = write_image_dataset(tmp_path / "data", n=3)
    overrides = [
        f"model.teacher={tiny_folder('z_image', 'a')}",
        f"data.path={data}",
        f"data.resolution={RESOLUTION}",
        f"model.max_sequence_length={LENGTH}",
        "model.negative_prompt=a grey sky",
        "precision.teacher_dtype=fp32",
        "method.gan.type=dmd2_head",
        "parallel.device=cpu",
        f"output_dir={tmp_path / 'run'}",
    ]
    cache = tmp_path / "cache"
    assert main(["cache-text", "z_image", *overrides, "--out", str(cache), "--quiet"]) == 0
    tensors = json.loads((cache / "manifest.json").read_text())["tensors"]
    assert tensors["prompt_mask"] == {"shape": [LENGTH], "dtype": "int64"}
    assert tensors["prompt_embeds"]["shape"][0] == LENGTH

    live = build_adapter(load_config("z_image", overrides))
    cached = build_adapter(load_config("z_image", [*overrides, f"model.text_cache={cache}"]))
    batch = Batch(["a photo of thing number 2", "a photo of thing number 0"])
    pairs = [(cached.conditioning(batch), live.conditioning(batch))]
    pairs.append((cached.null_conditioning(2), live.null_conditioning(2)))
    for got, want in pairs:
        assert torch.equal(got.tensors["prompt_mask"], want.tensors["prompt_mask"])
        torch.testing.assert_close(
            got.tensors["prompt_embeds"], want.tensors["prompt_embeds"], rtol=1e-5, atol=1e-6
        )
    # the unconditional branch is the negative prompt (cached by cache-text), not the empty prompt
    empty = live.encode_prompts([""]).tensors["prompt_mask"].sum()
    assert cached.null_conditioning(1).tensors["prompt_mask"].sum() != empty
    assert cached._text is None  # the cached run never loaded its text encoder


def _copy(folder, to):
    shutil.copytree(folder, to)
    return to


def test_z_image_turbo_folders_are_refused_unless_allowed(tiny_folder, tmp_path):
    base = tiny_folder("z_image", "a")
    hub = _copy(base, tmp_path / "models--Tongyi-MAI--Z-Image-Turbo" / "snapshots" / "0123abc")
    carded = _copy(base, tmp_path / "carded")
    (carded / "README.md").write_text(TURBO_CARD)
    shifted = _copy(base, tmp_path / "renamed")
    config = json.loads((shifted / "scheduler" / "scheduler_config.json").read_text())
    config.update(shift=3.0, use_dynamic_shifting=False)  # Z-Image-Turbo's scheduler
    (shifted / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    for folder, signal in ((hub, "hub id or path"), (carded, "base_model"), (shifted, "static shift 3.0")):
        with pytest.raises(ValueError, match="distilled") as refused:
            _adapter(folder)
        message = str(refused.value)
        assert "(Tongyi-MAI/Z-Image)" in message and "model.allow_distilled_teacher" in message, message
        assert signal in message and str(folder) in message, message
        assert _adapter(folder, "model.allow_distilled_teacher=true").anchors is not None
    # the base model's card speaks of Turbo in its text and its scheduler has shift 6: accepted
    plain = _copy(base, tmp_path / "base")
    (plain / "README.md").write_text("---\nlicense: apache-2.0\n---\nThe foundation of Z-Image-Turbo.\n")
    assert _adapter(plain).anchors is not None


def test_the_recipe_anchors_and_the_student_call(tiny_folder):
    """On Z-Image's scheduler (static shift 6, as tiny variant a) the recipe's table indices are the
    sigmas its comment states; the exported student runs with the pipeline's CFG off."""
    adapter = build_adapter(load_config("z_image", [f"model.teacher={tiny_folder('z_image', 'a')}"]))
    expected = torch.tensor([1.0, 0.947, 0.857, 0.667])
    torch.testing.assert_close(adapter.anchors.sigmas_tensor(), expected, rtol=0, atol=5e-4)
    assert adapter.negative_prompt == "" and adapter.max_sequence_length == 512
    assert adapter.student_call_kwargs(1024) == {"height": 1024, "width": 1024, "guidance_scale": 0.0}


def test_blocks_shard_checkpoint_and_ignore_the_batchs_other_captions(tiny_folder):
    adapter = _adapter(tiny_folder("z_image", "b"))
    net = build_networks(adapter).generator
    assert adapter.shard_units(net) == [*net.noise_refiner, *net.context_refiner, *net.layers]
    taps = adapter.feature_taps(net)
    assert [t.module for t in taps] == list(net.layers) and {t.width for t in taps} == {net.config.dim}
    x = _latents(adapter, 2)
    level = torch.tensor([0.8, 0.3])
    cond = adapter.encode_prompts(["a cat", PROMPTS[1]])  # captions of different lengths

    def run():
        net.zero_grad()
        out = adapter.forward(net, x, level, cond)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    plain, plain_grads = run()
    adapter.enable_gradient_checkpointing(net)
    assert net.gradient_checkpointing
    checked, checked_grads = run()
    torch.testing.assert_close(checked, plain)
    assert plain_grads.keys() == checked_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # a sample alone equals itself beside a longer caption (padding is masked)
        alone = adapter.forward(net, x[:1], level[:1], cond.select(slice(0, 1)))
    torch.testing.assert_close(alone, plain[:1], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def run(tiny_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("z_image_run")
    cfg = family_cfg("z_image", tiny_folder("z_image", "b"), write_image_dataset(root / "data"), root / "run")
    Distiller(cfg, progress=False).run()
    return root / "run"


@pytest.mark.parametrize("mode", ["renoise", "euler"])
def test_the_exported_folder_runs_the_student_in_the_stock_pipeline(run, tmp_path, mode):
    out = tmp_path / "export"
    args = ["export", str(run), "--out", str(out), "--dtype", "fp32", "--sampler", mode, "--no-samples"]
    assert main(args) == 0
    manifest = json.loads((out / "senseflow" / "export.json").read_text())
    assert manifest["call"]["guidance_scale"] == 0.0 and manifest["call"]["max_sequence_length"] == 8
    pipe = ZImagePipeline.from_pretrained(out)
    assert type(pipe) is ZImagePipeline
    student = Student.from_run(run)
    latents = _latents(student.adapter, 3)
    call = {"num_inference_steps": manifest["num_inference_steps"], **manifest["call"]}
    stock = []
    for output_type in ("latent", "np"):
        torch.manual_seed(5)  # the flow scheduler's renoising noise comes from torch's global generator
        images = pipe(list(PROMPTS), latents=latents.clone(), output_type=output_type, **call).images
        stock.append(torch.as_tensor(images))
    torch.manual_seed(5)
    fresh = None if mode == "euler" else (lambda like: torch.randn(like.shape))
    adapter, generator = student.adapter, student.generator
    cond = adapter.encode_prompts(PROMPTS)
    with torch.no_grad():
        fn = lambda x, level: adapter.forward(generator, x, level, cond)  # noqa: E731
        x0 = student_sample(fn, latents, student.anchor_levels, adapter.param, mode, generator=fresh)
        ours = ((adapter.decode(x0).float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
    assert _relative(stock[0], x0) < 1e-4 and _relative(stock[1], ours) < 1e-4
    assert x0.std() > 0
    if mode == "euler":  # the folder loads as a student again and samples what the run's student does
        again = Student.from_export(out).sample(PROMPTS[:1], [7], mode=mode)
        torch.testing.assert_close(again, student.sample(PROMPTS[:1], [7], mode=mode), rtol=1e-4, atol=1e-4)


def test_the_dmd2_head_reads_the_image_tokens_only(tiny_folder):
    """Z-Image's blocks hold the caption and padding after the image: a head on them must not make a
    sample's logit depend on the other captions of its batch."""
    from senseflow.models.discriminators import FakeScoreHeadDiscriminator

    adapter = _adapter(tiny_folder("z_image", "a"))
    fake = build_networks(adapter).fake_score
    torch.manual_seed(0)
    head = FakeScoreHeadDiscriminator(adapter, fake)
    prompts = ["a red cat", "a photo of the dog on the green blue and the red cat with a dog in the photo"]
    cond = adapter.encode_prompts(prompts)
    assert len(set(cond.tensors["prompt_mask"].sum(1).tolist())) == 2  # captions of different lengths
    x = torch.randn(2, *adapter.sample_shape(RESOLUTION), generator=torch.Generator().manual_seed(3))
    level, noise = torch.tensor([0.5, 0.5]), torch.randn_like(x)
    with torch.no_grad():
        both = head(x, cond, level, noise)
        alone = head(x[:1], cond.select(slice(0, 1)), level[:1], noise[:1])
        tokens = head.features(adapter.param.add_noise(x, noise, level), level, cond)
    assert tokens.shape[1] == (x.shape[-2] // 2) * (x.shape[-1] // 2)
    torch.testing.assert_close(both[:1], alone, rtol=1e-5, atol=1e-5)
