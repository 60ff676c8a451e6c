"""What flows from a data stream into the trainer: a :class:`Batch`, with optional cached parts.

A batch always has its prompts. It may also carry the images (pixels), the raw latents an offline
``encode_pixels`` pass wrote (the VAE posterior's sample or mean before scale and shift), the
cached text conditioning and per-sample metadata (SDXL's original size and crop). The trainer
uses whatever is cached and computes only what is missing, so a cache never changes a result,
only the time it takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


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

    @classmethod
    def padded_prompts(cls, valid: Sequence[Tensor], length: int) -> Conditioning:
        """Each prompt's valid tokens ([L_i, D], L_i <= ``length``) zero-padded to ``length`` as
        ``prompt_embeds`` [B, length, D], with the 0/1 ``prompt_mask`` [B, length] (int64) of the valid
        ones: fixed shapes for a text cache and a batch, from variable-length encodings."""
        embeds = valid[0].new_zeros(len(valid), length, valid[0].shape[-1])
        mask = torch.zeros(len(valid), length, dtype=torch.int64, device=embeds.device)
        for i, tokens in enumerate(valid):
            embeds[i, : len(tokens)] = tokens
            mask[i, : len(tokens)] = 1
        return cls({"prompt_embeds": embeds, "prompt_mask": mask})

    def trimmed(self, mask: str, names: tuple[str, ...]) -> Conditioning:
        """Sequences padded to a fixed length (a text cache's rows) cut to the batch's longest valid
        length. ``mask`` names the [B, L] 0/1 mask of the tensors ``names`` ([B, L, ...]). A masked
        transformer gives the same output either way; the cut only saves the padded tokens' compute."""
        valid = self.tensors[mask].bool()
        length = int(valid.any(dim=0).nonzero().max()) + 1 if valid.any() else 1
        cut = {k: v[:, :length] if k in names or k == mask else v for k, v in self.tensors.items()}
        return Conditioning(cut)

    def to(self, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Moved to ``device``; floating tensors (not token ids or masks) cast to ``dtype``."""
        return Conditioning(
            {
                k: v.to(device=device, dtype=dtype if v.is_floating_point() else None)
                for k, v in self.tensors.items()
            }
        )


@dataclass(frozen=True)
class Batch:
    """One rank's share of an iteration's samples.

    A batch without images and latents is *prompts only*: it serves runs whose generator inputs all
    come from backward simulation and that need no real sample (the data kind ``prompts``).
    """

    prompts: list[str]
    images: Tensor | None = None  # RGB in [-1, 1], [B, 3, H, W]
    latents: Tensor | None = None  # raw latents from the codec's encode_pixels (no scale/shift)
    conditioning: Conditioning | None = None  # cached prompt encodings
    meta: dict[str, Tensor] = field(default_factory=dict)  # per-sample metadata, first dim = batch
    keys: list[str] | None = None  # per-sample identity (file and crop) for caches keyed by sample

    @property
    def prompts_only(self) -> bool:
        return self.images is None and self.latents is None

    def __post_init__(self) -> None:
        n = len(self.prompts)
        parts = {"images": self.images, "latents": self.latents, "keys": self.keys, **self.meta}
        if self.conditioning is not None:
            parts["conditioning"] = self.conditioning
        for name, value in parts.items():
            if value is not None and len(value) != n:
                raise ValueError(f"batch: {name} holds {len(value)} samples for {n} prompts")

    def __len__(self) -> int:
        return len(self.prompts)

    def to(self, device: torch.device) -> Batch:
        return Batch(
            prompts=self.prompts,
            images=None if self.images is None else self.images.to(device),
            latents=None if self.latents is None else self.latents.to(device),
            conditioning=None if self.conditioning is None else self.conditioning.to(device),
            meta={k: v.to(device) for k, v in self.meta.items()},
            keys=self.keys,
        )
