"""The one interface between the generic trainer and a teacher family.

An adapter wraps a family's diffusers classes and answers every family-specific question the loop
would otherwise branch on:

* **networks**: which class and config each role (teacher, generator, fake score) is built from,
  and which weights it starts from (FLUX's student drops the guidance embedding). Networks are
  built without weights on the meta device; the trainer shards them and only then loads weights
  (:mod:`senseflow.models.build`), so no rank ever holds three whole copies before sharding;
* **conditioning**: prompt encoding with the family's frozen text encoders (or cached encodings);
* **the network call**: the forward signature and the timestep convention;
* **guidance**: CFG with one batched cond+uncond pass, or a guidance input (``guidance_kind``,
  taken from the recipe and checked against the family's registry entry);
* **the codec** (edm2's split): ``encode_pixels`` (pixels to raw latents: the expensive VAE pass,
  run offline into a cache or online when a batch has no latents), ``to_model`` (raw latents to
  the model space: scale and shift, cheap, every step, so a wrong factor never forces a re-encode)
  and ``decode`` (model space to pixels, differentiable, in chunks);
* **the parallel plan**: the units FSDP2 shards one by one, and gradient checkpointing;
* **feature taps**: the blocks a discriminator head may read (a DiT's blocks, a UNet's bottleneck).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn

from senseflow.core.parameterisation import Parameterisation
from senseflow.core.sampling import CfgConvention, combine_guidance
from senseflow.core.timesteps import Anchors
from senseflow.devices import module_dtype
from senseflow.models.batch import Batch, Conditioning

V = TypeVar("V")  # a tensor, or a reference to one (see initial_weights)

Role = Literal["teacher", "generator", "fake_score", "discriminator"]
NETWORK_ROLES: tuple[Role, ...] = ("teacher", "generator", "fake_score")


@dataclass(frozen=True)
class FeatureTap:
    """A block whose output a discriminator head may read, with the width of its features.

    ``image_tokens`` is for single-stream blocks whose sequence also holds caption and padding
    tokens: given the model-space input, how many leading tokens are the image's (None: all are)."""

    module: nn.Module
    width: int
    image_tokens: Callable[[Tensor], int] | None = None


class FamilyAdapter(ABC):
    param: Parameterisation
    anchors: Anchors | None
    guidance_kind: Literal["cfg", "embedding"] = "cfg"
    cfg_convention: CfgConvention = "uncond_plus"
    decode_chunk: int = 8  # samples decoded at once; build_adapter sets the recipe's model.decode_chunk
    vae_dtype: str = "fp32"  # decoder compute dtype; build_adapter sets the recipe's precision.vae_dtype
    # The network has parameters its output never reads (Qwen-Image's last block computes a text
    # stream nothing uses): DDP must then search for them in every backward.
    has_unused_parameters: bool = False

    # ------------------------------------------------------------------ networks

    @abstractmethod
    def network_spec(self, role: Role) -> tuple[type[nn.Module], dict[str, Any]]:
        """The diffusers class and config a role's network is built from (no weights)."""

    @abstractmethod
    def weight_files(self) -> list[Path]:
        """The teacher network's safetensors files (every role starts from them)."""

    def initial_weights(self, role: Role, teacher: dict[str, V]) -> dict[str, V]:
        """Which of the teacher's entries a role starts from, under which names (the identity unless a
        family drops or renames entries for its student). Values are tensors or references to them
        (streamed loading passes each name's reference, and reads later), so select and rename only:
        never compute on a value. Under ``load: rank0`` the ranks other than 0 pass an empty dict and
        must get an empty dict back."""
        return teacher

    # ------------------------------------------------------------------ conditioning and calls

    def conditioning_shapes(self) -> dict[str, tuple[int, ...]]:
        """One sample's conditioning tensors (names and shapes) as ``encode_prompts`` builds them,
        from the folder's configs alone: the memory planner traces the networks with them."""
        raise ValueError(
            f"{type(self).__name__} does not state its conditioning shapes (conditioning_shapes), which "
            "senseflow plan needs"
        )

    # Where encode_prompts reads from instead of the text encoders: any object with
    # ``lookup(prompts) -> Conditioning`` (the offline text cache). None: encode live.
    text_cache: Any = None

    @abstractmethod
    def encode_text(self, prompts: list[str]) -> Conditioning:
        """Encode prompts with the family's text encoders (frozen, no grad). Families load their
        text encoders on the first call, so a run that reads a text cache never holds them."""

    def text_identity(self) -> dict[str, Any]:
        """What decides the encodings besides the prompt text (text-encoder weights, tokenizers, max
        lengths): the key of the offline text cache. Families with text encoders override it."""
        return {"family": type(self).__name__}

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """The prompts' conditioning: from the text cache when the run has one, else encoded now."""
        if self.text_cache is not None:
            return self.text_cache.lookup(list(prompts))
        return self.encode_text(list(prompts))

    def conditioning(self, batch: Batch) -> Conditioning:
        """The batch's cached encodings when it has them, else the prompts encoded now."""
        if batch.conditioning is not None:
            return batch.conditioning
        return self.encode_prompts(batch.prompts)

    @abstractmethod
    def predict(
        self, net: nn.Module, x_t: Tensor, level: Tensor, cond: Conditioning, guidance: Tensor | None = None
    ) -> Tensor:
        """One raw network output at noise level ``level`` (``guidance`` only for embedding kinds)."""

    @abstractmethod
    def sample_shape(self, resolution: int) -> tuple[int, ...]:
        """Shape of one sample in the model space (latent or pixels) at image ``resolution``."""

    def raw_latent_shape(self, resolution: int) -> tuple[int, ...]:
        """One sample's raw latent (what ``encode_pixels`` gives and the autoencoder decodes): the model
        space's shape unless ``to_model`` rearranges it (FLUX.2 cuts it into 2x2 patches)."""
        return self.sample_shape(resolution)

    def null_conditioning(self, n: int) -> Conditioning:
        """The unconditional branch for CFG (the empty prompt unless a family says otherwise)."""
        return self.encode_prompts([""] * n)

    def to(self, device: torch.device) -> FamilyAdapter:
        """Move what the adapter itself holds (text encoders, autoencoder) to ``device``."""
        return self

    def forward(
        self, net: nn.Module, x_t: Tensor, level: Tensor, cond: Conditioning, guidance: Tensor | None = None
    ) -> Tensor:
        """``predict`` with inputs cast to ``net``'s storage dtype and the output in float32.

        The trainer and the samplers call networks through this, so a bfloat16 teacher or generator
        needs no casting anywhere else and every loss is computed in float32.
        """
        dtype = module_dtype(net)
        out = self.predict(net, x_t.to(dtype), level, cond.to(dtype=dtype), guidance)
        return out.float()

    def guided_predict(
        self, net: nn.Module, x_t: Tensor, level: Tensor, cond: Conditioning, scale: Tensor
    ) -> Tensor:
        """The teacher's guided output: CFG in one batched cond+uncond pass, or a guidance input.

        ``scale`` holds one guidance value per sample. The output is float32 (see ``forward``).
        """
        if self.guidance_kind == "embedding":
            return self.forward(net, x_t, level, cond, guidance=scale)
        both = cond.cat(self.null_conditioning(len(cond)))
        out = self.forward(net, torch.cat([x_t, x_t]), torch.cat([level, level]), both)
        c, u = out.chunk(2)
        w = scale.view(-1, *([1] * (c.ndim - 1))).to(c.dtype)
        return self.combine_guidance(c, u, w)

    def combine_guidance(self, cond: Tensor, uncond: Tensor, scale: Tensor) -> Tensor:
        """CFG's combination of the two branches (raw network outputs) in the recipe's convention.
        A family whose stock pipeline changes the combined output (Qwen-Image rescales it to the
        conditional branch's norm) overrides this, so training guides the teacher as inference does."""
        return combine_guidance(cond, uncond, scale, self.cfg_convention)

    @abstractmethod
    def sampling_levels(self, steps: int) -> Tensor:
        """The ``steps + 1`` levels of the teacher's own N-step sampler, ending at the clean level."""

    # The folder's own scheduler, for sampling the teacher exactly as the stock pipeline does
    # (models.sampling.scheduler_sample). Families with a diffusers scheduler override all three.

    def folder_guidance_kind(self) -> Literal["cfg", "embedding", "none"]:
        """How the teacher folder's stock pipeline guides it (a recipe may choose otherwise)."""
        return type(self).guidance_kind

    has_scheduler: bool = False  # True: load_scheduler gives the folder's diffusers scheduler

    def load_scheduler(self) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no diffusers scheduler")

    def timesteps_kwargs(self, steps: int, latent_shape: tuple[int, ...]) -> dict[str, Any]:
        """Extra arguments of the scheduler's ``set_timesteps``, as the stock pipeline passes them."""
        return {}

    def level_of_timestep(self, t: Tensor) -> Tensor:
        """A scheduler timestep in this family's level convention (σ = t / T for flows)."""
        return self.param.level_from_timestep(t)

    # ------------------------------------------------------------------ codec

    def encode_pixels(self, images: Tensor) -> Tensor:
        """Pixels in [-1, 1] (NCHW) to raw latents (the VAE pass; the identity in pixel space)."""
        return images

    def to_model(self, latents: Tensor) -> Tensor:
        """Raw latents to the model space (scale and shift; the identity in pixel space)."""
        return latents

    def decode_model(self, x: Tensor) -> Tensor:
        """Model space to RGB in [-1, 1] for one chunk; differentiable."""
        return x

    def decode(self, x: Tensor) -> Tensor:
        """Model space to RGB in [-1, 1], ``decode_chunk`` samples at a time; differentiable (the
        discriminator's gradient reaches the generator through it)."""
        if x.shape[0] <= self.decode_chunk:
            return self.decode_model(x)
        return torch.cat([self.decode_model(part) for part in x.split(self.decode_chunk)])

    def model_inputs(self, batch: Batch) -> Tensor | None:
        """The batch's real samples in the model space: from cached latents when it has them (None
        for a prompts-only batch)."""
        if batch.prompts_only:
            return None
        latents = batch.latents if batch.latents is not None else self.encode_pixels(batch.images)
        return self.to_model(latents)

    # ------------------------------------------------------------------ parallel plan and features

    # Block lists of diffusers' DiTs and UNets: the units FSDP2 shards one by one before the root.
    SHARD_UNIT_ATTRIBUTES: tuple[str, ...] = (
        "transformer_blocks",
        "single_transformer_blocks",
        "down_blocks",
        "mid_block",
        "up_blocks",
    )

    def shard_units(self, module: nn.Module) -> list[nn.Module]:
        """The submodules FSDP2 wraps separately, so only one unit's full weights exist at a time."""
        units: list[nn.Module] = []
        for name in self.SHARD_UNIT_ATTRIBUTES:
            found = getattr(module, name, None)
            if isinstance(found, nn.ModuleList):
                units.extend(found)
            elif isinstance(found, nn.Module):
                units.append(found)
        return units

    def enable_gradient_checkpointing(self, net: nn.Module) -> None:
        """Recompute ``net``'s activations in the backward pass (diffusers models support it)."""
        enable = getattr(net, "enable_gradient_checkpointing", None)
        if enable is None:
            raise ValueError(
                f"parallel.gradient_checkpointing: {type(net).__name__} has no enable_gradient_checkpointing"
            )
        enable()

    def feature_taps(self, net: nn.Module) -> Sequence[FeatureTap]:
        """Blocks a discriminator head may read: a DiT's (double-stream) ``transformer_blocks`` at its
        inner width, or a UNet's bottleneck (``mid_block``, DMD2's choice on SDXL)."""
        blocks = getattr(net, "transformer_blocks", None)
        width = getattr(net, "inner_dim", None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) and width is not None:
            return [FeatureTap(block, int(width)) for block in blocks]
        mid = getattr(net, "mid_block", None)
        channels = getattr(getattr(net, "config", None), "block_out_channels", None)
        if isinstance(mid, nn.Module) and channels:
            return [FeatureTap(mid, int(channels[-1]))]
        raise ValueError(
            f"{type(net).__name__} has no blocks a discriminator head can read (expected a DiT's "
            "transformer_blocks or a UNet's mid_block); the family's adapter must name them in feature_taps"
        )
