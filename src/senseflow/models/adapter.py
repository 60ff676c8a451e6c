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
from senseflow.devices import module_dtype
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

    def to(self, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Moved to ``device``; floating tensors (not token ids or masks) cast to ``dtype``."""
        return Conditioning(
            {
                k: v.to(device=device, dtype=dtype if v.is_floating_point() else None)
                for k, v in self.tensors.items()
            }
        )


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
    def build_networks(
        self, teacher_dtype: torch.dtype = torch.float32, train_dtype: torch.dtype = torch.float32
    ) -> Networks:
        """Load the teacher and initialise generator and fake score from its weights.

        The dtypes are storage dtypes, passed to ``from_pretrained`` (so modules a model keeps in
        float32 stay there): ``train_dtype`` for generator and fake score.
        """

    def build_generator(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The generator network alone (to load a student's weights into); families may avoid
        loading the teacher and fake score for it."""
        return self.build_networks(dtype, dtype).generator

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

    def to(self, device: torch.device) -> FamilyAdapter:
        """Move what the adapter itself holds (text encoders, autoencoder) to ``device``."""
        return self

    def enable_gradient_checkpointing(self, net: nn.Module) -> None:
        """Recompute ``net``'s activations in the backward pass (diffusers models support it)."""
        enable = getattr(net, "enable_gradient_checkpointing", None)
        if enable is None:
            raise ValueError(
                f"parallel.gradient_checkpointing: {type(net).__name__} has no enable_gradient_checkpointing"
            )
        enable()

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

        ``scale`` holds one guidance value per sample. The output is float32 (see ``forward``).
        """
        if self.guidance_kind == "embedding":
            return self.forward(net, x_t, level, cond, guidance=scale)
        both = cond.cat(self.null_conditioning(len(cond)))
        out = self.forward(net, torch.cat([x_t, x_t]), torch.cat([level, level]), both)
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
