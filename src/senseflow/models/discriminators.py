"""Discriminators: a frozen feature network with small trainable, text-conditioned heads.

``ProjectedDiscriminator`` follows the SenseFlow VFM design (spec §8) at toy scale: features from
several depths of a frozen backbone, one head per depth producing spatial logits, conditioned by
projection on a text embedding (logit = <head(h, w), text> / sqrt(C)). For the shapes world the
backbone is a fixed, seeded random conv network (a different seed from the evaluator's feature
network, so the GAN never optimises the metric's own features); the DINOv2 backbone plugs into
the same class in its own module.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from senseflow.models.adapter import Conditioning, FamilyAdapter


class RandomConvBackbone(nn.Module):
    """Frozen conv layers with seeded weights; returns the feature map after each layer."""

    def __init__(self, channels: tuple[int, ...], seed: int, in_channels: int = 3):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.layers = nn.ModuleList()
        prev = in_channels
        for c in channels:
            conv = nn.Conv2d(prev, c, 3, stride=2, padding=1)
            w = rng.standard_normal((c, prev, 3, 3)) * math.sqrt(2.0 / (prev * 9))
            conv.weight.data = torch.from_numpy(w).float()
            conv.bias.data.zero_()
            self.layers.append(conv)
            prev = c
        self.requires_grad_(False)
        self.channels = channels

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for conv in self.layers:
            x = F.leaky_relu(conv(x), 0.2)
            feats.append(x)
        return feats


class ProjectedHead(nn.Module):
    def __init__(self, in_channels: int, hidden: int, text_dim: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.GroupNorm(1, hidden),
            nn.LeakyReLU(0.2),
            nn.Conv2d(hidden, hidden, 1),
        )
        self.text = nn.Linear(text_dim, hidden)
        self.hidden = hidden

    def forward(self, feat: Tensor, text: Tensor) -> Tensor:
        out = self.body(feat)  # [B, C, H, W]
        cmap = self.text(text)[:, :, None, None]
        return (out * cmap).sum(1).flatten(1) / math.sqrt(self.hidden)  # [B, H*W]


class ProjectedDiscriminator(nn.Module):
    """Spatial logits from every backbone depth, concatenated: [B, sum of H*W]."""

    def __init__(
        self,
        backbone: nn.Module,
        feature_channels: tuple[int, ...],
        hidden: int,
        text_dim: int,
        text_key: str = "pooled",
    ):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleList(ProjectedHead(c, hidden, text_dim) for c in feature_channels)
        self.text_key = text_key

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.heads.parameters() if p.requires_grad]

    def forward(self, images: Tensor, cond: Conditioning) -> Tensor:
        text = cond.tensors[self.text_key].to(images.dtype)
        feats = self.backbone(images)
        return torch.cat([head(f, text) for head, f in zip(self.heads, feats, strict=True)], dim=1)


# The toy discriminator's architecture (fixed, like a pretrained backbone's): three stride-2 layers
# of a seeded random conv net (32x32 -> 16, 8, 4), one projected head per layer.
TOY_BACKBONE_CHANNELS = (32, 64, 64)
TOY_BACKBONE_SEED = 1234  # differs from the evaluator's feature network (seed 0)
TOY_HEAD_HIDDEN = 32


def build_discriminator(gan_type: str, adapter: FamilyAdapter) -> ProjectedDiscriminator | None:
    """The discriminator named by ``method.gan.type`` (None for 'none')."""
    if gan_type == "none":
        return None
    if gan_type == "toy":
        text_dim = adapter.null_conditioning(1).tensors["pooled"].shape[-1]
        backbone = RandomConvBackbone(TOY_BACKBONE_CHANNELS, seed=TOY_BACKBONE_SEED)
        return ProjectedDiscriminator(backbone, TOY_BACKBONE_CHANNELS, TOY_HEAD_HIDDEN, text_dim)
    raise ValueError(f"method.gan.type: '{gan_type}' is not available in this version (available: toy, none)")
