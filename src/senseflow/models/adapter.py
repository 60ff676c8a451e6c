"""The one interface between the generic trainer and a teacher family.

An adapter wraps a family's diffusers classes and answers every family-specific question the loop
would otherwise branch on: how networks are built from the teacher (FLUX drops its guidance
embedding), how prompts are encoded, how a network is called and with which timestep convention,
how guidance is applied (CFG with an unconditional pass, or a guidance embedding), how images map
to the model space (a VAE, or the identity in the toy world) and how modules are wrapped for
parallelism. Adding a family means one adapter, one recipe and tests; the loop stays as it is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from senseflow.core.parameterisation import Parameterisation
from senseflow.core.timesteps import Anchors
from senseflow.sampling import CfgConvention, combine_guidance


@dataclass(frozen=True)
class Conditioning:
    """Encoded prompts of a batch: named tensors whose first dimension is the batch."""

    tensors: dict[str, Tensor]

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def cat(self, other: Conditioning) -> Conditioning:
        return Conditioning({k: torch.cat([v, other.tensors[k]]) for k, v in self.tensors.items()})

    def select(self, index: Tensor | slice) -> Conditioning:
        return Conditioning({k: v[index] for k, v in self.tensors.items()})


@dataclass
class Networks:
    """The teacher (frozen), and the generator and fake score initialised from its weights."""

    teacher: nn.Module
    generator: nn.Module
    fake_score: nn.Module


class FamilyAdapter(ABC):
    param: Parameterisation
    anchors: Anchors
    guidance_kind: str  # "cfg" (unconditional pass) or "embedding" (guidance input)
    cfg_convention: CfgConvention = "uncond_plus"

    @abstractmethod
    def build_networks(self) -> Networks:
        """Load the teacher and initialise generator and fake score from its weights."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Encode prompts with the family's text encoders (frozen, no grad)."""

    @abstractmethod
    def predict(
        self, net: nn.Module, x_t: Tensor, level: Tensor, cond: Conditioning, guidance: Tensor | None = None
    ) -> Tensor:
        """One raw network output at noise level ``level`` (``guidance`` only for embedding kinds)."""

    @abstractmethod
    def sample_shape(self, resolution: int) -> tuple[int, ...]:
        """Shape of one sample in the model space (latent or pixels) at image ``resolution``."""

    def null_conditioning(self, n: int) -> Conditioning:
        """The unconditional branch for CFG (the empty prompt unless a family says otherwise)."""
        return self.encode_prompts([""] * n)

    def encode_images(self, images: Tensor) -> Tensor:
        """Data images in [-1, 1] (NCHW) to the model space; the identity for pixel-space teachers."""
        return images

    def decode(self, x: Tensor) -> Tensor:
        """Model space back to RGB in [-1, 1]; differentiable (the discriminator needs gradients)."""
        return x

    def guided_predict(
        self, net: nn.Module, x_t: Tensor, level: Tensor, cond: Conditioning, scale: Tensor
    ) -> Tensor:
        """The teacher's guided output: CFG in one batched cond+uncond pass, or a guidance input.

        ``scale`` holds one guidance value per sample.
        """
        if self.guidance_kind == "embedding":
            return self.predict(net, x_t, level, cond, guidance=scale)
        both = cond.cat(self.null_conditioning(len(cond)))
        out = self.predict(net, torch.cat([x_t, x_t]), torch.cat([level, level]), both)
        c, u = out.chunk(2)
        w = scale.view(-1, *([1] * (c.ndim - 1))).to(c.dtype)
        return combine_guidance(c, u, w, self.cfg_convention)

    def parallelize(self, module: nn.Module, strategy: str) -> nn.Module:
        """Wrap a trainable module for data parallelism (DDP here; FSDP2 plans per family later)."""
        if strategy == "none" or not torch.distributed.is_initialized():
            return module
        if strategy == "ddp":
            return nn.parallel.DistributedDataParallel(module)
        raise ValueError(f"parallel.strategy {strategy!r} is not supported by {type(self).__name__}")
