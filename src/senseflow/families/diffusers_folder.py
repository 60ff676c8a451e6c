"""A teacher folder in the diffusers pipeline layout, and what every diffusers family shares.

:class:`TeacherFolder` reads what a folder states (``model_index.json``, each component's config,
its weight files with their variant) and loads components with the classes ``model_index.json``
names, as ``DiffusionPipeline.from_pretrained`` does, one component at a time. A hub id resolves to
the local hub cache and is downloaded only when the recipe allows it.

:class:`DiffusersAdapter` is the part of the SDXL, SD 3.5 and FLUX adapters that does not depend on
the family: the VAE codec (scale, shift and per-channel statistics from the VAE's config), text
encoders loaded on first use (so a run that reads a text cache never holds them), the folder's own
scheduler for the teacher's sampler, and the identities caches are keyed by.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from senseflow.models.adapter import FamilyAdapter, Role, V
from senseflow.models.build import safetensors_files
from senseflow.models.hub import file_sha256, resolve_pretrained, safetensors_fingerprint

log = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"
# Files a diffusers pipeline needs from the hub: the index, every component's configs, tokenizer
# files and weights inside component folders (not the single-file checkpoints some repositories
# also keep at their root).
CLIP_MAX_LENGTH = 77  # CLIP's token length, the pipelines' fallback when a folder has no tokenizer config
# the root README.md is the teacher's model card (its license goes into an export's card); tokenizers
# keep their chat template in chat_template.jinja
TOKENIZER_SUFFIXES = (".json", ".txt", ".model", ".jinja")
HUB_PATTERNS = ["model_index.json", "README.md", *(f"*/*{s}" for s in TOKENIZER_SUFFIXES), "*/*.safetensors"]


def hub_patterns(variant: str | None) -> list[str]:
    """The files of a pipeline repository to fetch: weights of ``variant`` only (hub repositories
    often hold fp32 and fp16 copies side by side)."""
    weights = "*/*.safetensors" if variant is None else f"*/*.{variant}.safetensors"
    extra = [] if variant is None else [f"*/*.{variant}.safetensors.index.json"]
    return [p for p in HUB_PATTERNS if not p.endswith(".safetensors")] + [weights, *extra]


def resolve_teacher(
    teacher: str, revision: str | None = None, allow_download: bool = False, variant: str | None = None
) -> Path:
    """A local folder as given, or a hub id from the hub cache (downloaded only with ``allow_download``)."""
    patterns = hub_patterns(variant)
    return resolve_pretrained(
        teacher, "model.teacher", revision=revision, allow_download=allow_download, patterns=patterns
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"teacher folder: {path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


class TeacherFolder:
    """The teacher's pipeline folder: what it states, and its components loaded on request."""

    def __init__(self, path: Path, variant: str | None = None):
        self.path = Path(path)
        self.variant = variant
        self.index = _read_json(self.path / MODEL_INDEX)

    @classmethod
    def from_recipe(cls, model_cfg: Any) -> TeacherFolder:
        path = resolve_teacher(
            model_cfg.teacher, model_cfg.revision, model_cfg.allow_download, model_cfg.variant
        )
        return cls(path, model_cfg.variant)

    def has(self, component: str) -> bool:
        entry = self.index.get(component)
        return isinstance(entry, list) and entry[0] is not None and entry[1] is not None

    def component_class(self, component: str) -> type:
        """The class ``model_index.json`` names for a component (diffusers or transformers)."""
        if not self.has(component):
            raise FileNotFoundError(f"teacher folder {self.path}: {MODEL_INDEX} names no '{component}'")
        library, name = self.index[component]
        return getattr(importlib.import_module(library), name)

    def config(self, component: str) -> dict[str, Any]:
        folder = self.path / component
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        return _read_json(folder / name)

    def token_length(self, tokenizer: str, default: int) -> int:
        """A tokenizer's ``model_max_length`` from its config (``default`` when absent or unset)."""
        path = self.path / tokenizer / "tokenizer_config.json"
        if path.is_file():
            value = _read_json(path).get("model_max_length")
            if isinstance(value, int) and value < 100_000:  # transformers' "no limit" is a huge int
                return value
        return default

    def pipeline_flag(self, key: str, default: Any) -> Any:
        """A pipeline-level setting saved in ``model_index.json`` (e.g. force_zeros_for_empty_prompt)."""
        return self.index.get(key, default)

    def weight_files(self, component: str) -> list[Path]:
        stem = "model" if self.index[component][0] == "transformers" else "diffusion_pytorch_model"
        return safetensors_files(self.path / component, stem=stem, variant=self.variant)

    def load(self, component: str, dtype: torch.dtype | None = None) -> Any:
        """A component from its subfolder with its own class (weights in ``dtype`` for networks)."""
        cls = self.component_class(component)
        if issubclass(cls, nn.Module):
            # transformers names the argument dtype, diffusers torch_dtype
            key = "dtype" if self.index[component][0] == "transformers" else "torch_dtype"
            kwargs: dict[str, Any] = {"variant": self.variant}
            if dtype is not None:
                kwargs[key] = dtype
            return cls.from_pretrained(self.path, subfolder=component, **kwargs)
        if self.index[component][0] == "diffusers":  # a scheduler
            return cls.from_pretrained(self.path, subfolder=component)
        try:
            return cls.from_pretrained(self.path / component)  # a tokenizer or processor
        except ImportError as exc:  # e.g. FLUX.2-dev's PixtralProcessor needs torchvision
            missing = " ".join(str(exc).split())[:200]
            raise ImportError(
                f"model.teacher: {self.path / component} is a {cls.__name__}, which needs a package that "
                f"is not installed ({missing}); install it (pip install torchvision for image processors)"
            ) from None

    def fingerprint(self, component: str) -> dict[str, str]:
        """Identity of a component: the weight files this variant loads by
        :func:`safetensors_fingerprint`, configs and tokenizer files by content. Names are relative to
        the component folder, so the identity is the same wherever the folder lives and whichever
        other variants sit beside it."""
        folder = self.path / component
        out = {}
        if self.has(component) and issubclass(self.component_class(component), nn.Module):
            for path in self.weight_files(component):
                out[path.name] = safetensors_fingerprint(path)
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            if path.suffix in TOKENIZER_SUFFIXES and not path.name.endswith(".index.json"):
                out[str(path.relative_to(folder))] = file_sha256(path)
        return out


class DiffusersAdapter(FamilyAdapter):
    """Shared by the diffusers families: set ``NETWORK`` (the denoiser's component) and
    ``TEXT_COMPONENTS`` (tokenizer and encoder pairs, in the pipeline's order)."""

    NETWORK: str = "transformer"
    TEXT_COMPONENTS: tuple[tuple[str, str], ...] = ()
    PIPELINE: str = ""  # the stock pipeline class whose folders the family reads (for messages)
    NETWORK_CLASS: type[nn.Module] = nn.Module  # what the denoiser must be (a subclass will do)

    def __init__(self, folder: TeacherFolder, text_dtype: torch.dtype = torch.float32):
        self._check_layout(folder)
        self.folder = folder
        self.network_config = folder.config(self.NETWORK)
        self.vae_config = folder.config("vae")
        self.text_dtype = text_dtype
        self.device = torch.device("cpu")
        self._vae: nn.Module | None = None
        self._text: dict[str, Any] | None = None
        self._text_pipeline: Any = None
        self._null: Any = None
        self.zero_uncond = False
        self.negative_prompt: str | None = None  # model.negative_prompt (families that read it)

    def _check_layout(self, folder: TeacherFolder) -> None:
        """One clear error when the folder is another family's (or lacks a component)."""
        needed = [self.NETWORK, "vae", "scheduler"]
        missing = [c for c in needed if not folder.has(c)]
        if missing:
            found = sorted(k for k in folder.index if not k.startswith("_") and folder.has(k))
            kind = folder.index.get("_class_name", "an unknown pipeline")
            raise ValueError(
                f"model.teacher: {folder.path} is a {kind} folder (components: {', '.join(found)}); "
                f"model.family reads {self.PIPELINE} folders, which have {', '.join(needed)} "
                f"(missing: {', '.join(missing)})"
            )
        cls = folder.component_class(self.NETWORK)
        if not issubclass(cls, self.NETWORK_CLASS):
            kind = folder.index.get("_class_name", "an unknown pipeline")
            raise ValueError(
                f"model.teacher: {folder.path} is a {kind} folder whose {self.NETWORK} is a {cls.__name__}; "
                f"model.family reads {self.PIPELINE} folders (a {self.NETWORK_CLASS.__name__})"
            )

    # ------------------------------------------------------------------ networks

    def network_spec(self, role: Role) -> tuple[type[nn.Module], dict[str, Any]]:
        return self.folder.component_class(self.NETWORK), dict(self.network_config)

    def weight_files(self) -> list[Path]:
        return self.folder.weight_files(self.NETWORK)

    def to(self, device: torch.device | str) -> DiffusersAdapter:
        self.device = torch.device(device)
        if self._vae is not None:
            self._vae.to(self.device)
        for value in (self._text or {}).values():
            if isinstance(value, nn.Module):
                value.to(self.device)
        if self.text_cache is not None:
            self.text_cache.to(self.device)
        self._null = None
        return self

    # ------------------------------------------------------------------ text encoders, loaded on first use

    @property
    def text(self) -> dict[str, Any]:
        """Tokenizers and frozen text encoders by component name (absent components left out)."""
        if self._text is None:
            text: dict[str, Any] = {}
            for tokenizer, encoder in self.TEXT_COMPONENTS:
                if self.folder.has(encoder):
                    text[tokenizer] = self.folder.load(tokenizer)
                    model = self.folder.load(encoder, self.text_dtype)
                    text[encoder] = model.to(self.device).eval().requires_grad_(False)
            self._text = text
        return self._text

    def text_settings(self) -> dict[str, Any]:
        """Settings besides the files that decide the encodings (max lengths, layer choices)."""
        return {}

    def stock_text_pipeline(self) -> Any:
        """The folder's stock pipeline holding only its tokenizers and text encoders (the other
        components None), for families whose prompt encoding is the pipeline's own ``encode_prompt``:
        chat templates, system messages, dropped template tokens and hidden-layer choices then come
        from diffusers itself, exactly as inference encodes, and are not restated here."""
        if self._text_pipeline is None:
            missing = [c for pair in self.TEXT_COMPONENTS for c in pair if not self.folder.has(c)]
            if missing:
                raise ValueError(
                    f"model.teacher: {self.folder.path} has no {' or '.join(missing)}, which "
                    f"{self.PIPELINE} encodes prompts with; use a complete folder, or a text cache "
                    "written from one (model.text_cache)"
                )
            cls = getattr(importlib.import_module("diffusers"), self.PIPELINE)
            index = self.folder.index
            parts: dict[str, Any] = {c: None for c, v in index.items() if isinstance(v, list)}
            parts.update(self.text)
            self._text_pipeline = cls(**parts)
        return self._text_pipeline

    def check_not_distilled(self, allowed: bool, base_model: str, distilled: bool) -> None:
        """Refuse a teacher folder that is itself a few-step distillation, unless the recipe allows it."""
        if distilled and not allowed:
            raise ValueError(
                f"model.teacher: {self.folder.path} is a distilled few-step model; distil the base model "
                f"({base_model}) instead, or set model.allow_distilled_teacher: true to use this one"
            )

    def text_identity(self) -> dict[str, Any]:
        components = [c for pair in self.TEXT_COMPONENTS for c in pair if self.folder.has(c)]
        return {
            "family": type(self).__name__,
            "files": {c: self.folder.fingerprint(c) for c in components},
            "dtype": str(self.text_dtype),
            **self.text_settings(),
        }

    # ------------------------------------------------------------------ codec

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae_config.get("latent_channels", 4))

    @property
    def vae(self) -> nn.Module:
        """The autoencoder in float32 (decoding the student's samples for D and grids in full precision,
        as the official code does)."""
        if self._vae is None:
            vae = self.folder.load("vae", torch.float32)
            self._vae = vae.to(self.device).eval().requires_grad_(False)
        return self._vae

    def vae_identity(self) -> dict[str, Any]:
        return {"files": self.folder.fingerprint("vae"), "encode": "posterior_mean"}

    def _latent_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """Raw latent = model latent * std / scale + mean, per the VAE's config: per-channel
        ``latents_mean``/``latents_std`` when it states them, else ``shift_factor`` and 1."""
        cfg, n = self.vae_config, like.shape[1]
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        if mean is not None and std is not None:
            m = torch.tensor(mean, dtype=like.dtype, device=like.device).view(1, n, 1, 1)
            s = torch.tensor(std, dtype=like.dtype, device=like.device).view(1, n, 1, 1)
            return m, s
        shift = float(cfg.get("shift_factor") or 0.0)
        return torch.full((), shift, dtype=like.dtype, device=like.device), torch.ones((), device=like.device)

    def encode_pixels(self, images: Tensor) -> Tensor:
        """The VAE posterior's mean: deterministic, so a latent cache and a live run agree. The VAE
        runs in float32 even under the trainer's autocast (an fp16 SDXL VAE overflows)."""
        vae = self.vae
        with torch.autocast(self.device.type, enabled=False):
            return vae.encode(images.to(self.device, torch.float32)).latent_dist.mode()

    def to_model(self, latents: Tensor) -> Tensor:
        mean, std = self._latent_stats(latents)
        return (latents - mean) * float(self.vae_config["scaling_factor"]) / std

    def decode_model(self, x: Tensor) -> Tensor:
        z = x.float()
        mean, std = self._latent_stats(z)
        z = z * std / float(self.vae_config["scaling_factor"]) + mean
        return self.run_decoder(z)

    def run_decoder(self, z: Tensor) -> Tensor:
        """``_decode`` of raw latents in ``precision.vae_dtype`` whatever the trainer's autocast (fp32 as
        the official code decodes D's inputs, or bf16 autocast), float32 out. On the generator's path
        into a pixel-space D the decoder's activations are recomputed in the backward pass (the
        official code checkpoints it; at 1024 px they take GiBs)."""
        bf16 = self.vae_dtype == "bf16"
        with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=bf16):
            if torch.is_grad_enabled() and z.requires_grad:
                return checkpoint(self._decode, z, use_reentrant=False).float()
            return self._decode(z).float()

    def _decode(self, z: Tensor) -> Tensor:
        return self.vae.decode(z, return_dict=False)[0]

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """The latent's (h, w) for an image, as the stock pipeline rounds it."""
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def sample_shape(self, resolution: int) -> tuple[int, ...]:
        return (self.latent_channels, *self.latent_size(resolution, resolution))

    # ------------------------------------------------------------------ the folder's sampler

    has_scheduler = True

    def load_scheduler(self) -> Any:
        return self.folder.load("scheduler")

    def null_conditioning(self, n: int):
        if self._null is None:
            self._null = self.uncond_conditioning()
        return type(self._null)({k: v.expand(n, *v.shape[1:]) for k, v in self._null.tensors.items()})

    # ------------------------------------------------------------------ export (senseflow export)

    DEFAULT_MAX_SEQUENCE_LENGTH: int | None = None  # the stock pipeline's default, for families with T5
    SINGLE_FILE_COMPONENTS: tuple[str, ...] = ()  # what the original single-file checkpoint holds

    def export_network(self, net: nn.Module) -> nn.Module:
        """The student's network as the stock pipeline runs it (unchanged unless a family folds in
        something the student's calls add, as FLUX's constant LoRA-mode guidance)."""
        return net

    def student_call_kwargs(self, resolution: int) -> dict[str, Any]:
        """What a stock pipeline call needs besides the prompt and steps to run the student as trained:
        the trained size, no CFG (guidance 1 turns it off in the CFG pipelines), the trained T5 length."""
        kwargs: dict[str, Any] = {"height": resolution, "width": resolution}
        if self.guidance_kind == "cfg":
            kwargs["guidance_scale"] = 1.0
        length = getattr(self, "max_sequence_length", None)
        if self.DEFAULT_MAX_SEQUENCE_LENGTH is not None and length != self.DEFAULT_MAX_SEQUENCE_LENGTH:
            kwargs["max_sequence_length"] = length
        return kwargs

    def single_file_state_dict(self, states: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        """``states`` (component -> diffusers state dict) in the original single-file key layout."""
        raise ValueError(f"{type(self).__name__} has no single-file layout")

    def kohya_lora_state_dict(self, peft_state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A peft-layout LoRA of the network in the layout ComfyUI loads."""
        raise ValueError(f"{type(self).__name__} has no ComfyUI LoRA layout")

    def uncond_conditioning(self):
        """One sample of CFG's unconditional branch: the encoded ``negative_prompt`` when the recipe sets
        one, else the encoded empty prompt, or zeros of its shapes when ``zero_uncond`` (SDXL's
        ``force_zeros_for_empty_prompt``, or ``model.uncond: zeros``)."""
        if self.negative_prompt is not None:
            return self.encode_prompts([self.negative_prompt])
        empty = self.encode_prompts([""])
        if not self.zero_uncond:
            return empty
        return type(empty)({k: torch.zeros_like(v) for k, v in empty.tensors.items()})


class GuidanceFreeStudent:
    """For a teacher with a guidance embedding (FLUX.1-dev, FLUX.2-dev), mixed in before the family's
    adapter: the generator and fake score are built from the same config with ``guidance_embeds=False``
    and start from the teacher's weights minus the embedder (keys under ``GUIDANCE_EMBEDDER``), which
    are named in ``dropped_keys`` and logged. The teacher keeps its embedding."""

    GUIDANCE_EMBEDDER: str = ""  # the embedder's key prefix in the network's state dict
    GUIDANCE_DEFAULT: bool = False  # the class's guidance_embeds when a config leaves it out
    network_config: dict[str, Any]
    dropped_keys: list[str]

    @property
    def teacher_has_guidance(self) -> bool:
        return bool(self.network_config.get("guidance_embeds", self.GUIDANCE_DEFAULT))

    def folder_guidance_kind(self) -> str:
        # the stock pipeline guides by the embedding, or not at all
        return "embedding" if self.teacher_has_guidance else "none"

    def network_spec(self, role: Role) -> tuple[type[nn.Module], dict[str, Any]]:
        cls, config = super().network_spec(role)  # type: ignore[misc]
        if role != "teacher":
            config["guidance_embeds"] = False
        return cls, config

    def initial_weights(self, role: Role, teacher: dict[str, V]) -> dict[str, V]:
        """The teacher's entries; for the guidance-free roles without the guidance embedder."""
        if role == "teacher" or not self.teacher_has_guidance:
            return teacher
        prefix = self.GUIDANCE_EMBEDDER
        dropped = sorted(k for k in teacher if k.startswith(prefix))
        if dropped:
            self.dropped_keys = dropped
            log.info("%s starts without the guidance embedding; dropped: %s", role, ", ".join(dropped))
        return {k: v for k, v in teacher.items() if not k.startswith(prefix)}
