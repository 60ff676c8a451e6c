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
from typing import Literal

import torch
from torch import Tensor, nn

from senseflow.core.parameterisation import Parameterisation
from senseflow.core.timesteps import Anchors
from senseflow.devices import module_device, module_dtype
from senseflow.sampling import CfgConvention, combine_guidance

Role = Literal["teacher", "generator", "fake_score", "discriminator"]


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

    def parallelize(self, module: nn.Module, strategy: str, role: Role) -> nn.Module:
        """Prepare one network for data parallelism; returns what the trainer calls.

        ``ddp``: the trainable networks in DistributedDataParallel, the frozen teacher as it is.
        ``fsdp``: FSDP2 (``fully_shard``, FULL_SHARD) on every shard unit and the root for generator,
        fake score and teacher (the official "G and guidance model"), the discriminator in DDP, as
        in the official code. FSDP2 shards in place, so the returned module is ``module`` itself.
        """
        if strategy == "none" or not torch.distributed.is_initialized():
            return module
        if strategy == "fsdp" and role != "discriminator":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            world = torch.distributed.get_world_size()
            mesh = init_device_mesh(module_device(module).type, (world,))  # the device the module is on
            for unit in self.shard_units(module):
                fully_shard(unit, mesh=mesh)
            fully_shard(module, mesh=mesh)
            return module
        if strategy in ("ddp", "fsdp"):
            if role == "teacher":  # frozen: nothing to synchronise
                return module
            return nn.parallel.DistributedDataParallel(module)
        raise ValueError(f"parallel.strategy {strategy!r} is not supported by {type(self).__name__}")
