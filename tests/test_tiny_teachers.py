"""Tiny random teachers: the stock pipelines load and run them offline, variants differ, writes are
deterministic, weight variants load, and the networks respond to prompt, timestep and guidance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import load_file
from transformers import CLIPTokenizer, T5TokenizerFast

from senseflow.families import tiny
from senseflow.families.tiny import tiny_variants, write_tiny_teacher

# The CLIP/T5 families; the language-model families (Qwen-Image, FLUX.2, Z-Image) test their folders in
# their own test files (tests/test_family_<family>.py).
FAMILIES = ("sdxl", "sd3", "flux")
PIPELINES = {"sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
CASES = [(f, v) for f in FAMILIES for v in tiny_variants(f)]
DENOISER = {"sdxl": "unet", "sd3": "transformer", "flux": "transformer"}
PX = 64


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    torch.set_num_threads(1)
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    yield
    diffusers_logging.set_verbosity(level)
    diffusers_logging.enable_progress_bar()


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("tiny_teachers")
    return {(f, v): write_tiny_teacher(root / f"{f}_{v}", f, v) for f, v in CASES}


@pytest.fixture(scope="module")
def pipes(folders):
    return {
        case: PIPELINES[case[0]].from_pretrained(folder, local_files_only=True)
        for case, folder in folders.items()
    }


def cfg(folder: Path, sub: str, name: str = "config.json") -> dict:
    return json.loads((folder / sub / name).read_text())


def weights(folder: Path, pattern: str = "*.safetensors") -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob(pattern))}


def generate(pipe, family: str, prompt: str, **kw) -> torch.Tensor:
    extra = {} if family == "sdxl" else {"max_sequence_length": 16}
    out = pipe(
        prompt,
        height=PX,
        width=PX,
        num_inference_steps=2,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **extra,
        **kw,
    )
    return out.images


def test_registry_of_variants():
    later = ("qwen_image", "flux2", "flux2_klein", "z_image")
    assert tiny.FAMILIES[: len(FAMILIES)] == FAMILIES and tiny.FAMILIES[len(FAMILIES) :] == later
    assert all(len(tiny_variants(f)) >= 2 for f in tiny.FAMILIES)
    with pytest.raises(ValueError, match="family"):
        tiny_variants("sd15")
    with pytest.raises(ValueError, match="variant"):
        write_tiny_teacher("unused", "flux", "z")


@pytest.mark.parametrize(("family", "variant"), CASES)
def test_stock_pipeline_runs_offline(folders, pipes, family, variant):
    folder, pipe = folders[family, variant], pipes[family, variant]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINES[family].__name__
    vae = cfg(folder, "vae")
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    assert pipe.vae_scale_factor == factor
    latent = vae["latent_channels"]
    side = PX // factor
    images = generate(pipe, family, "a photo of a cat")
    # FLUX returns its latents 2x2-packed into tokens.
    expected = (1, (side // 2) ** 2, 4 * latent) if family == "flux" else (1, latent, side, side)
    assert images.shape == expected
    assert torch.isfinite(images).all()
    if family == "sd3":  # pos_embed_max_size bounds the patch grid
        tr = cfg(folder, "transformer")
        assert tr["pos_embed_max_size"] >= side // tr["patch_size"]


@pytest.mark.parametrize(("family", "variant"), CASES)
def test_components_are_wired_consistently(folders, family, variant):
    folder = folders[family, variant]
    index = json.loads((folder / "model_index.json").read_text())
    for enc in (k for k in index if k.startswith("text_encoder")):
        tok_dir = folder / enc.replace("text_encoder", "tokenizer")
        te = cfg(folder, enc)
        if te["model_type"] == "t5":
            tok = T5TokenizerFast.from_pretrained(tok_dir)
            assert (tok.pad_token, tok.eos_token) == ("<pad>", "</s>")
            assert (te["pad_token_id"], te["eos_token_id"]) == (tok.pad_token_id, tok.eos_token_id)
            assert te["d_model"] == cfg(folder, DENOISER[family])["joint_attention_dim"]
        else:
            tok = CLIPTokenizer.from_pretrained(tok_dir)
            assert tok.model_max_length == te["max_position_embeddings"] == 77
            # CLIP pools at the first eos token: the ids must match the tokenizer's.
            assert (te["bos_token_id"], te["eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)
        assert te["vocab_size"] >= len(tok)
    if family == "sd3":  # CLIP features are zero-padded to the T5 width, never cut
        widths = cfg(folder, "text_encoder")["hidden_size"] + cfg(folder, "text_encoder_2")["hidden_size"]
        assert widths <= cfg(folder, "transformer")["joint_attention_dim"]


def test_clip_tokenizer_has_clip_byte_ids(folders):
    folder = folders["sdxl", "a"]
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    tok_2 = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
    ids = tok("A zebra!").input_ids
    # Byte symbols sit where the real CLIP vocabulary has them: "a</w>" 320, "!</w>" 256.
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok("a").input_ids[1] == 320 and tok("!").input_ids[1] == 256
    assert tok("cat").input_ids[1:-1] == [tok.convert_tokens_to_ids("cat</w>")]
    assert tok.pad_token == "<|endoftext|>" and tok_2.pad_token == "!"
    padded = tok_2("a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[-1] == tok_2.convert_tokens_to_ids("!")


def test_t5_tokenizer_pads_and_truncates(folders):
    tok = T5TokenizerFast.from_pretrained(folders["sd3", "a"] / "tokenizer_3")
    assert isinstance(tok, T5TokenizerFast)
    pad = dict(padding="max_length", max_length=12, truncation=True)
    short = tok("a photo of a cat", **pad).input_ids
    assert len(short) == 12 and short[:6] == tok("a photo of a cat").input_ids
    assert short[5] == tok.eos_token_id and set(short[6:]) == {tok.pad_token_id}
    long = tok("an unusually long caption " * 10, **pad).input_ids
    assert len(long) == 12 and long[-1] == tok.eos_token_id and tok.unk_token_id not in long
    assert tok.model_max_length == 512


# What must differ between a family's variants (component, field); a loader must read each one.
DIFFERING = {
    "sdxl": [
        ("vae", "latent_channels"),
        ("vae", "block_out_channels"),
        ("vae", "scaling_factor"),
        ("text_encoder_2", "hidden_size"),
        ("text_encoder_2", "projection_dim"),
        ("unet", "block_out_channels"),
        ("unet", "addition_time_embed_dim"),
        ("unet", "cross_attention_dim"),
        ("unet", "in_channels"),
        ("scheduler", "timestep_spacing"),
        ("scheduler", "prediction_type"),
        ("scheduler", "beta_schedule"),
        ("", "force_zeros_for_empty_prompt"),
    ],
    "sd3": [
        ("vae", "latent_channels"),
        ("vae", "block_out_channels"),
        ("vae", "scaling_factor"),
        ("vae", "shift_factor"),
        ("text_encoder", "hidden_size"),
        ("text_encoder_2", "hidden_size"),
        ("text_encoder_3", "d_model"),
        ("transformer", "num_layers"),
        ("transformer", "attention_head_dim"),
        ("transformer", "qk_norm"),
        ("transformer", "dual_attention_layers"),
        ("transformer", "pooled_projection_dim"),
        ("scheduler", "shift"),
    ],
    "flux": [
        ("vae", "latent_channels"),
        ("vae", "block_out_channels"),
        ("vae", "scaling_factor"),
        ("vae", "shift_factor"),
        ("text_encoder", "hidden_size"),
        ("text_encoder_2", "d_model"),
        ("transformer", "num_layers"),
        ("transformer", "num_single_layers"),
        ("transformer", "attention_head_dim"),
        ("transformer", "axes_dims_rope"),
        ("transformer", "in_channels"),
        ("scheduler", "use_dynamic_shifting"),
    ],
}


def component_config(folder: Path, component: str) -> dict:
    if not component:
        return json.loads((folder / "model_index.json").read_text())
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return cfg(folder, component, name)


@pytest.mark.parametrize("family", FAMILIES)
def test_variants_differ(folders, family):
    a, b = (folders[family, v] for v in tiny_variants(family)[:2])
    for component, field in DIFFERING[family]:
        va, vb = component_config(a, component)[field], component_config(b, component)[field]
        assert va != vb, (component, field)
    if family == "flux":  # FLUX's dynamic shift reads these four; both variants embed guidance
        sched = component_config(a, "scheduler")
        assert (sched["base_image_seq_len"], sched["max_image_seq_len"]) == (16, 256)
        assert (sched["base_shift"], sched["max_shift"]) == (0.5, 1.15)
        assert all(component_config(folders[family, v], "transformer")["guidance_embeds"] for v in "ab")


@pytest.mark.parametrize(("family", "variant"), CASES)
def test_writes_are_deterministic(tmp_path, folders, family, variant):
    state = torch.random.get_rng_state()
    again = write_tiny_teacher(tmp_path / "again", family, variant, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is untouched
    assert weights(again) == weights(folders[family, variant])
    if variant == "a":
        other = weights(write_tiny_teacher(tmp_path / "other", family, variant, seed=1))
        reference = weights(folders[family, variant])
        assert other.keys() == reference.keys()
        assert all(other[k] != reference[k] for k in other)


@pytest.mark.parametrize("family", FAMILIES)
def test_fp16_weight_variant(tmp_path, folders, family):
    folder = write_tiny_teacher(tmp_path / family, family, "a", weight_variant="fp16")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors"))
    models = [
        k for k, v in json.loads((folder / "model_index.json").read_text()).items() if isinstance(v, list)
    ]
    models = [m for m in models if (folder / m / "config.json").exists()]
    assert files and all(".fp16.safetensors" in f for f in files)
    assert {f.split("/")[0] for f in files} == set(models)
    denoiser = next(p for p in files if p.startswith(DENOISER[family]))
    assert denoiser.endswith("diffusion_pytorch_model.fp16.safetensors")
    stored = load_file(folder / denoiser)
    reference = load_file(folders[family, "a"] / denoiser.replace(".fp16", ""))
    assert all(t.dtype == torch.float16 for t in stored.values())
    assert all(torch.equal(stored[k], reference[k].half()) for k in reference)
    pipe = PIPELINES[family].from_pretrained(
        folder, variant="fp16", dtype=torch.float32, local_files_only=True
    )
    loaded = getattr(pipe, DENOISER[family]).state_dict()
    assert all(torch.equal(loaded[k], stored[k].float()) for k in stored)
    assert torch.isfinite(generate(pipe, family, "a photo of a cat")).all()


def denoiser_inputs(pipe, family: str) -> dict:
    """Random inputs of the right shapes for one call of the denoiser at 64 px."""
    g = torch.Generator().manual_seed(1)
    net = getattr(pipe, DENOISER[family])
    conf = net.config
    side = PX // pipe.vae_scale_factor
    if family == "sdxl":
        width = pipe.text_encoder_2.config.projection_dim
        return dict(
            sample=torch.randn(1, conf.in_channels, side, side, generator=g),
            encoder_hidden_states=torch.randn(1, 77, conf.cross_attention_dim, generator=g),
            added_cond_kwargs={
                "text_embeds": torch.randn(1, width, generator=g),
                "time_ids": torch.tensor([[PX, PX, 0, 0, PX, PX]], dtype=torch.float32),
            },
        )
    inputs = dict(
        encoder_hidden_states=torch.randn(1, 16, conf.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, conf.pooled_projection_dim, generator=g),
    )
    if family == "sd3":
        return dict(hidden_states=torch.randn(1, conf.in_channels, side, side, generator=g), **inputs)
    rows = torch.arange(side // 2).repeat_interleave(side // 2)
    cols = torch.arange(side // 2).repeat(side // 2)
    return dict(
        hidden_states=torch.randn(1, (side // 2) ** 2, conf.in_channels, generator=g),
        img_ids=torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).float(),
        txt_ids=torch.zeros(16, 3),
        guidance=torch.tensor([3.5]),
        **inputs,
    )


def call(pipe, family: str, inputs: dict, level: float) -> torch.Tensor:
    """The denoiser's output at a noise level in [0, 1], in the family's timestep convention."""
    net = getattr(pipe, DENOISER[family])
    if family == "sdxl":
        t = torch.tensor([round(level * 999)])
    elif family == "sd3":
        t = torch.tensor([level * 1000.0])
    else:
        t = torch.tensor([level])
    with torch.no_grad():
        return net(**inputs, timestep=t, return_dict=False)[0]


def moved(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / a.norm()).item()


@pytest.mark.parametrize(("family", "variant"), CASES)
def test_output_depends_on_prompt_timestep_and_guidance(pipes, family, variant):
    pipe = pipes[family, variant]
    inputs = denoiser_inputs(pipe, family)
    base = call(pipe, family, inputs, 0.5)
    assert base.abs().max() > 0
    assert moved(base, call(pipe, family, inputs, 0.8)) > 1e-3
    other = torch.randn(inputs["encoder_hidden_states"].shape, generator=torch.Generator().manual_seed(2))
    text = dict(inputs, encoder_hidden_states=other)
    assert moved(base, call(pipe, family, text, 0.5)) > 1e-3
    if family == "flux":
        assert moved(base, call(pipe, family, dict(inputs, guidance=torch.tensor([7.0])), 0.5)) > 1e-3
        a, b = (generate(pipe, family, "a photo of a cat", guidance_scale=g) for g in (1.0, 5.0))
        assert moved(a, b) > 1e-3
    # End to end, through the tokenizers and text encoders.
    cat, dog = (generate(pipe, family, p) for p in ("a photo of a cat", "a blue dog on a red photo"))
    assert moved(cat, dog) > 1e-3
