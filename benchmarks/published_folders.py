"""Config-only teacher folders of the real networks, and `senseflow plan` run on them.

The real teachers cannot be downloaded here, but their published configs are known. This script
writes, for SDXL base, SD 3.5 Large, SD 3.5 Medium and FLUX.1-dev, a folder in the diffusers
pipeline layout that holds ``model_index.json`` and each component's config (the network, text
encoders, VAE, scheduler, the tokenizers' lengths) and no weights, plus DINOv2 ViT-L/14 and CLIP
ViT-L/14 folders for the VFM discriminator. It then runs the memory planner
(:func:`senseflow.train.plan.analyse`) on the shipped recipes pointed at those folders, at 1024 px
and each recipe's batch size, and prints one markdown table per machine.

    python benchmarks/published_folders.py --out /tmp/published                         # 1x80, 8x80, 8x141 GB
    python benchmarks/published_folders.py --out /tmp/published --gpus 8 --gpu-memory 78   # one machine
    python benchmarks/published_folders.py --out /tmp/published --write-only            # just the folders

The planner's own command on one of them, e.g.
``senseflow plan flux_dev model.teacher=/tmp/published/flux_dev
method.gan.backbone=/tmp/published/dinov2-large method.gan.text_encoder=/tmp/published/clip-vit-large-patch14
--gpus 8 --gpu-memory 78``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from published_llm_teachers import LLM_TEACHERS, text_config

# Published configs of the real teachers' components (the numbers of their config.json files).
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SD35_LARGE = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=38,
    attention_head_dim=64,
    num_attention_heads=38,
    joint_attention_dim=4096,
    caption_projection_dim=2432,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
    qk_norm="rms_norm",
)
SD35_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    qk_norm="rms_norm",
    dual_attention_layers=tuple(range(13)),
)
FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
CLIP_L = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768
)
CLIP_G = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    projection_dim=1280,
)
T5_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    feed_forward_proj="gated-gelu",
)
VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
)
# What differs between the published VAEs (SDXL's four latent channels; SD 3.5's and FLUX's sixteen,
# with a shift and without the quant convolutions).
VAE_SDXL = dict(latent_channels=4, sample_size=1024, scaling_factor=0.13025)
VAE_SD3 = dict(
    latent_channels=16, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
    use_quant_conv=False, use_post_quant_conv=False,
)  # fmt: skip
VAE_FLUX = dict(
    latent_channels=16, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
    use_quant_conv=False, use_post_quant_conv=False,
)  # fmt: skip
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
)  # fmt: skip
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
FLUX_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
    max_image_seq_len=4096, base_shift=0.5, max_shift=1.15,
)  # fmt: skip
# The VFM discriminator's folders: DINOv2 ViT-L/14 and CLIP ViT-L/14 (its text tower feeds D).
DINOV2_LARGE = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
    patch_size=14, image_size=518,
)  # fmt: skip
CLIP_VIT_L_VISION = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    patch_size=14, image_size=224,
)  # fmt: skip

CLIP_L_TOKENS = ("CLIPTokenizer", 77)
T5_TOKENS = ("T5TokenizerFast", 512)
SD3_TEXT = {
    "text_encoder": ("CLIPTextModelWithProjection", CLIP_L, CLIP_L_TOKENS),
    "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_G, CLIP_L_TOKENS),
    "text_encoder_3": ("T5EncoderModel", T5_XXL, T5_TOKENS),
}
# One pipeline folder per recipe: its class, the network (component, class, config), the VAE's
# extras, the scheduler, and the text encoders (class, config, and their tokenizer's class and length).
TEACHERS: dict[str, dict[str, Any]] = {
    "sdxl": dict(
        pipeline="StableDiffusionXLPipeline",
        network=("unet", "UNet2DConditionModel", SDXL_UNET),
        vae=VAE_SDXL,
        scheduler=("EulerDiscreteScheduler", SDXL_SCHEDULER),
        text={
            "text_encoder": ("CLIPTextModel", CLIP_L, CLIP_L_TOKENS),
            "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_G, CLIP_L_TOKENS),
        },
    ),
    "sd35_large": dict(
        pipeline="StableDiffusion3Pipeline",
        network=("transformer", "SD3Transformer2DModel", SD35_LARGE),
        vae=VAE_SD3,
        scheduler=("FlowMatchEulerDiscreteScheduler", SD3_SCHEDULER),
        text=SD3_TEXT,
    ),
    "sd35_medium": dict(
        pipeline="StableDiffusion3Pipeline",
        network=("transformer", "SD3Transformer2DModel", SD35_MEDIUM),
        vae=VAE_SD3,
        scheduler=("FlowMatchEulerDiscreteScheduler", SD3_SCHEDULER),
        text=SD3_TEXT,
    ),
    "flux_dev": dict(
        pipeline="FluxPipeline",
        network=("transformer", "FluxTransformer2DModel", FLUX_DEV),
        vae=VAE_FLUX,
        scheduler=("FlowMatchEulerDiscreteScheduler", FLUX_SCHEDULER),
        text={
            "text_encoder": ("CLIPTextModel", CLIP_L, CLIP_L_TOKENS),
            "text_encoder_2": ("T5EncoderModel", T5_XXL, T5_TOKENS),
        },
    ),
}
DINO_FOLDER, CLIP_FOLDER = "dinov2-large", "clip-vit-large-patch14"
# (label, GPUs per node, nodes, GiB the planner may use per GPU: the usable memory of an 80 GB and
# a 141 GB card, ../shared/spec/environment.md)
MACHINES = [("1 x 80 GB", 1, 1, 78.0), ("8 x 80 GB", 8, 1, 78.0), ("8 x 141 GB", 8, 1, 139.0)]


def _diffusers_config(folder: Path, class_name: str, config: dict[str, Any]) -> None:
    """``config.json`` as the class itself writes it (every default filled in), built on meta."""
    import diffusers

    with init_empty_weights(include_buffers=True):
        model = getattr(diffusers, class_name)(**config)
    model.save_config(folder)


def _transformers_config(folder: Path, class_name: str, config: Any) -> None:
    config.architectures = [class_name]
    config.save_pretrained(folder)


def _text_config(class_name: str, config: dict[str, Any]):
    from transformers import CLIPTextConfig, T5Config

    return T5Config(**config) if class_name.startswith("T5") else CLIPTextConfig(**config)


def write_teacher(root: Path, name: str) -> Path:
    """One config-only pipeline folder (no weight file) named after its recipe."""
    import diffusers

    spec = TEACHERS[name]
    folder = root / name
    index: dict[str, Any] = {"_class_name": spec["pipeline"], "_diffusers_version": diffusers.__version__}
    component, network_class, network_cfg = spec["network"]
    _diffusers_config(folder / component, network_class, network_cfg)
    index[component] = ["diffusers", network_class]
    _diffusers_config(folder / "vae", "AutoencoderKL", {**VAE, **spec["vae"]})
    index["vae"] = ["diffusers", "AutoencoderKL"]
    scheduler_class, scheduler_cfg = spec["scheduler"]
    getattr(diffusers, scheduler_class)(**scheduler_cfg).save_config(folder / "scheduler")
    index["scheduler"] = ["diffusers", scheduler_class]
    for encoder, (encoder_class, encoder_cfg, (tokenizer_class, length)) in spec["text"].items():
        tokenizer = encoder.replace("text_encoder", "tokenizer")
        (folder / tokenizer).mkdir(parents=True, exist_ok=True)
        (folder / tokenizer / "tokenizer_config.json").write_text(json.dumps({"model_max_length": length}))
        index[tokenizer] = ["transformers", tokenizer_class]
        _transformers_config(folder / encoder, encoder_class, _text_config(encoder_class, encoder_cfg))
        index[encoder] = ["transformers", encoder_class]
    if spec["pipeline"] == "StableDiffusionXLPipeline":
        index["force_zeros_for_empty_prompt"] = True
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def write_llm_teacher(root: Path, name: str) -> Path:
    """A config-only folder of a language-model teacher (published_llm_teachers.py)."""
    import diffusers

    spec = LLM_TEACHERS[name]
    folder = root / name
    index: dict[str, Any] = {"_class_name": spec["pipeline"], "_diffusers_version": diffusers.__version__}
    component, network_class, network_cfg = spec["network"]
    _diffusers_config(folder / component, network_class, network_cfg)
    index[component] = ["diffusers", network_class]
    vae_class, vae_cfg = spec["vae"]
    _diffusers_config(folder / "vae", vae_class, {**VAE, **VAE_FLUX} if vae_cfg == "flux" else vae_cfg)
    index["vae"] = ["diffusers", vae_class]
    scheduler_class, scheduler_cfg = spec["scheduler"]
    getattr(diffusers, scheduler_class)(**scheduler_cfg).save_config(folder / "scheduler")
    index["scheduler"] = ["diffusers", scheduler_class]
    encoder_class, kind, (tokenizer_class, length) = spec["text"]
    (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": length}))
    index["tokenizer"] = ["transformers", tokenizer_class]
    _transformers_config(folder / "text_encoder", encoder_class, text_config(kind))
    index["text_encoder"] = ["transformers", encoder_class]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def write_discriminator_folders(root: Path) -> tuple[Path, Path]:
    from transformers import CLIPConfig, Dinov2Config

    dino = root / DINO_FOLDER
    _transformers_config(dino, "Dinov2Model", Dinov2Config(**DINOV2_LARGE))
    clip = root / CLIP_FOLDER
    text = {k: v for k, v in CLIP_L.items() if k != "projection_dim"}
    config = CLIPConfig(text_config=text, vision_config=CLIP_VIT_L_VISION, projection_dim=768)
    _transformers_config(clip, "CLIPModel", config)
    return dino, clip


def write_all(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    folders = {name: write_teacher(root, name) for name in TEACHERS}
    folders.update({name: write_llm_teacher(root, name) for name in LLM_TEACHERS})
    folders["dino"], folders["clip"] = write_discriminator_folders(root)
    return folders


def overrides(folders: dict[str, Path], recipe: str, extra: list[str]) -> list[str]:
    return [
        f"model.teacher={folders[recipe]}",
        f"method.gan.backbone={folders['dino']}",
        f"method.gan.text_encoder={folders['clip']}",
        *extra,
    ]


def table(analyses: dict[str, Any], label: str, gpus: int, nodes: int, memory: float) -> str:
    """Markdown: one row per strategy, one column per recipe; total GiB per GPU, whether it fits
    and the largest batch per GPU that fits."""
    from senseflow.train.plan import STRATEGY_LABELS, plan_for

    plans = {name: plan_for(a, gpus=gpus, nodes=nodes, gpu_memory=memory) for name, a in analyses.items()}
    lines = [
        f"**{label}** ({gpus * nodes} GPU{'s' if gpus * nodes > 1 else ''}, {memory:g} GiB usable each): "
        "GiB per GPU at each recipe's batch; fits? (largest batch per GPU that fits)",
        "",
        "| strategy | " + " | ".join(plans) + " |",
        "|---|" + "---|" * len(plans),
    ]
    for strategy in STRATEGY_LABELS:
        cells = []
        for p in plans.values():
            s = p.strategy(strategy)
            cells.append(f"{s.total_gib:.1f}, {'yes' if s.fits else 'no'} ({s.max_batch})")
        lines.append(f"| {STRATEGY_LABELS[strategy]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def decoder_check(folders: dict[str, Path], side: int = 1024) -> None:
    """The decode pass the generator's adversarial gradient goes through (float32, one sample), as
    the codec runs it (one checkpoint around the whole decode: its backward recomputes every decoder
    activation at once) and with the decoder's own block checkpointing on top."""
    from senseflow.config import load_config
    from senseflow.models import build_adapter
    from senseflow.train import plan_counts, plan_trace

    print(
        "| VAE (recipe) | latent | decoder backward as the codec runs it | with decoder block checkpointing |"
    )
    print("|---|---|---|---|")
    for recipe in ("sdxl", "flux_dev"):
        adapter = build_adapter(load_config(recipe, overrides(folders, recipe, [])), text_cache=False)
        shape = adapter.sample_shape(side)
        plain = plan_trace.decode_pass(plan_counts.vae(adapter), shape, 1, True).peak
        vae = plan_counts.vae(adapter)
        vae.enable_gradient_checkpointing()
        blocks = plan_trace.decode_pass(vae, shape, 1, True).peak
        latent = "x".join(map(str, shape))
        print(f"| {recipe} | {latent} | {plain / 2**30:.2f} GiB | {blocks / 2**30:.2f} GiB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="folder to write the config-only folders into"
    )
    parser.add_argument("--write-only", action="store_true", help="write the folders, plan nothing")
    parser.add_argument("--gpus", type=int, help="one machine: GPUs per node (default: the three machines)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpu-memory", type=float, default=78.0, help="GiB per GPU (with --gpus)")
    parser.add_argument(
        "--recipes", nargs="*", default=list(TEACHERS), help="recipes to plan (also: qwen_image ...)"
    )
    parser.add_argument(
        "--breakdown", action="store_true", help="also print each recipe's terms per strategy"
    )
    parser.add_argument(
        "--accuracy",
        action="store_true",
        help="the activation passes against the CPU allocator on tiny folders (docs/scale.md's error table)",
    )
    parser.add_argument(
        "--decoder-check",
        action="store_true",
        help="print the VAE decoder's backward at 1024 px with and without its own block checkpointing",
    )
    parser.add_argument("overrides", nargs="*", help="dotted recipe overrides for every recipe")
    args = parser.parse_args()
    folders = write_all(args.out)
    print(f"wrote {', '.join(str(f) for f in folders.values())}", file=sys.stderr)
    if args.write_only:
        return
    if args.decoder_check:
        decoder_check(folders)
        return
    if args.accuracy:
        from plan_accuracy import accuracy_check

        accuracy_check(args.out / "tiny")
        return
    from senseflow.config import load_config
    from senseflow.train.plan import analyse, format_plan, plan_for

    torch.set_num_threads(1)
    analyses = {r: analyse(load_config(r, overrides(folders, r, args.overrides))) for r in args.recipes}
    machines = MACHINES if args.gpus is None else [("this machine", args.gpus, args.nodes, args.gpu_memory)]
    for label, gpus, nodes, memory in machines:
        print(table(analyses, label, gpus, nodes, memory))
        print()
        if args.breakdown:
            for name, a in analyses.items():
                print(f"### {name}, {label}\n")
                print(format_plan(plan_for(a, gpus=gpus, nodes=nodes, gpu_memory=memory)))
                print()


if __name__ == "__main__":
    main()
