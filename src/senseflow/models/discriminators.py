"""Discriminators: a frozen feature network with small trainable, text-conditioned heads.

``ProjectedDiscriminator`` follows the SenseFlow VFM design (spec §8) at toy scale: features from
several depths of a frozen backbone, one head per depth producing spatial logits, conditioned by
projection on a text embedding (logit = <head(h, w), text> / sqrt(C)). For the shapes world the
backbone is a fixed, seeded random conv network (a different seed from the evaluator's feature
network, so the GAN never optimises the metric's own features); the DINOv2 backbone plugs into
the same class in its own module.

``FakeScoreHeadDiscriminator`` is DMD2's discriminator (spec §8.2, ``gan.type = dmd2_head``): a small
classification head on features of the fake score network, computed on inputs noised at a drawn
level (DMD2's ``--diffusion_gan``).

Every discriminator implements :class:`Discriminator` and is built by name through the registry
(``method.gan.type``, :mod:`senseflow.config.registry`); the trainer never asks which one it has.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import ClassVar, Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from senseflow.config.method import GANConfig
from senseflow.config.registry import discriminator_spec, resolve_builder
from senseflow.models.adapter import FamilyAdapter
from senseflow.models.batch import Conditioning

InputSpace = Literal["pixels", "model"]
LossKind = Literal["hinge", "nonsaturating"]


@runtime_checkable
class Discriminator(Protocol):
    """What the trainer relies on, shared by every discriminator.

    * ``input_space``: ``"pixels"`` (D sees decoded RGB in [-1, 1]: toy, VFM) or ``"model"`` (D sees
      model-space samples, latents for latent teachers: the DMD2 head), so the trainer decodes only
      for a pixel-space D;
    * ``loss``: the GAN loss it is trained with (``hinge``: SenseFlow's VFM; ``nonsaturating``: DMD2);
    * ``noised``: when True, ``forward(x, cond, level, noise)`` noises ``x`` itself with the given
      (drawn) level and noise; otherwise ``forward(x, cond)``;
    * ``shares_fake_update``: when True, D's loss also trains the fake score (one backward of the fake
      loss plus D's loss, both optimisers step), computed inside ``fake_in_graph()``;
    * ``trainable_parameters()``: what D's optimizer holds (a frozen backbone is never in it);
    * ``forward`` returns logits ``[B, ...]`` (averaged per sample by the losses).

    Two optional members: ``conditioning(prompts, cond, real_pixels)`` gives D's own condition for a
    batch (the VFM's text embedding and reference image; without it D gets the networks'
    conditioning), and ``separate_calls = True`` asks the step to pass real and fake as one batch with
    ``groups=2`` that D judges in separate passes (per-batch statistics).
    """

    input_space: InputSpace
    loss: LossKind
    noised: bool
    shares_fake_update: bool

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def fake_in_graph(self) -> contextlib.AbstractContextManager: ...

    def __call__(self, x: Tensor, cond: Conditioning, *draws: Tensor) -> Tensor: ...


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

    input_space: ClassVar[InputSpace] = "pixels"
    loss: ClassVar[LossKind] = "hinge"
    noised: ClassVar[bool] = False
    shares_fake_update: ClassVar[bool] = False

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

    def fake_in_graph(self) -> contextlib.AbstractContextManager:
        return nullcontext()

    def forward(self, images: Tensor, cond: Conditioning) -> Tensor:
        text = cond.tensors[self.text_key].to(images.dtype)
        feats = self.backbone(images)
        return torch.cat([head(f, text) for head, f in zip(self.heads, feats, strict=True)], dim=1)


@contextmanager
def _weights_frozen(module: nn.Module) -> Iterator[None]:
    """Parameters of ``module`` leave the autograd graph (no ``.grad``), activations stay in it.

    Gradient checkpointing is paused meanwhile: its recomputation runs in the backward pass, after the
    weights have been unfrozen, and would not match the frozen forward. FSDP2 swaps a module's
    registered parameters between sharded and gathered tensors (and keeps the root's gathered after a
    forward), so the flags are restored both on the tensors frozen on entry and on those registered
    on exit.
    """
    entry = list(module.named_parameters())
    flags = {name: p.requires_grad for name, p in entry}
    checkpointed = [m for m in module.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for _, p in entry:
        p.requires_grad_(False)
    for m in checkpointed:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for name, p in [*entry, *module.named_parameters()]:
            p.requires_grad_(flags[name])
        for m in checkpointed:
            m.gradient_checkpointing = True


def _tokens(output: Tensor | tuple) -> Tensor:
    """Image tokens [B, N, C] from a block output; diffusers' joint blocks return (text, image)."""
    feat = output[-1] if isinstance(output, tuple) else output
    if feat.ndim == 4:  # a feature map [B, C, H, W]
        feat = feat.flatten(2).transpose(1, 2)
    return feat


# DMD2's convolutional classifier (its SDXL code): stride-2 convolutions from the 32x32 bottleneck of
# a 1024 px SDXL UNet down to 4x4, then a stride-4 one to 1x1, each with GroupNorm(32) and SiLU.
CONV_HEAD_MAP_SIDE = 32
CONV_HEAD_STRIDES = (2, 2, 2, 4)
CONV_HEAD_KERNEL = 4
CONV_HEAD_GROUPS = 32


class ConvClassifierHead(nn.Module):
    """DMD2's classifier on a UNet feature map [B, C, H, W] -> one logit per sample [B, 1]. A map of
    another size than 32x32 is resized to it first (bilinear), so the stack ends at 1x1."""

    def __init__(self, channels: int):
        super().__init__()
        groups = math.gcd(CONV_HEAD_GROUPS, channels)  # 32 for SDXL's 1280 channels
        layers: list[nn.Module] = []
        for stride in CONV_HEAD_STRIDES:
            padding = (CONV_HEAD_KERNEL - stride) // 2
            layers += [
                nn.Conv2d(channels, channels, CONV_HEAD_KERNEL, stride, padding),
                nn.GroupNorm(groups, channels),
                nn.SiLU(),
            ]
        layers.append(nn.Conv2d(channels, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, fmap: Tensor) -> Tensor:
        side = (CONV_HEAD_MAP_SIDE, CONV_HEAD_MAP_SIDE)
        if tuple(fmap.shape[-2:]) != side:
            fmap = F.interpolate(fmap, size=side, mode="bilinear", align_corners=False)
        return self.net(fmap).flatten(1)


class FakeScoreHeadDiscriminator(nn.Module):
    """DMD2's classifier (spec §8.2): a head on the fake score's features at one block, one logit per sample.

    ``x`` (model space) is noised to ``level`` with ``noise`` (both drawn by the trainer), the fake
    score runs on it with the sample's prompt, and a forward hook captures the output of one of the
    blocks the adapter offers (``feature_taps``: a DiT's transformer blocks, a UNet's bottleneck).
    The head is what D's optimiser holds: ``mlp`` (LayerNorm, two Linear+SiLU layers on the block's
    tokens, a mean over tokens, a Linear to one logit) or ``conv`` (DMD2's own convolutional
    classifier on a UNet's feature map, :class:`ConvClassifierHead`). The fake network is held
    by reference, not as a submodule, so it is neither in this module's state dict nor in its DDP
    wrapper. Its weights are kept out of the graph during the forward (the generator's adversarial
    gradient still flows through its activations back to ``x``), except inside ``fake_in_graph()``:
    with ``trains_fake`` (DMD2, where the head is part of the fake network) the trainer computes D's
    loss there and steps the fake score on fake loss + D loss.
    """

    input_space: ClassVar[InputSpace] = "model"
    loss: ClassVar[LossKind] = "nonsaturating"
    noised: ClassVar[bool] = True

    def __init__(
        self,
        adapter: FamilyAdapter,
        fake_score: nn.Module,
        block: int | None = None,
        trains_fake: bool = True,
        head: Literal["mlp", "conv"] = "mlp",
    ):
        super().__init__()
        self.shares_fake_update = trains_fake
        self._fake_weights_in_graph = False
        taps = adapter.feature_taps(fake_score)
        self.feature_block = len(taps) // 2 if block is None else int(block)
        if not 0 <= self.feature_block < len(taps):
            raise ValueError(
                f"gan.feature_blocks: block {self.feature_block} is out of range for a fake score with "
                f"{len(taps)} feature blocks"
            )
        self.adapter = adapter
        self._fake = (fake_score,)  # a tuple, so that nn.Module does not register it as a submodule
        width = taps[self.feature_block].width
        if head == "conv":
            if taps[self.feature_block].module is not getattr(fake_score, "mid_block", None):
                raise ValueError(
                    "method.gan.head: conv reads a UNet's bottleneck feature map (mid_block); "
                    f"{type(fake_score).__name__} offers tokens: use head: mlp"
                )
            self.head = ConvClassifierHead(width)
        else:
            self.head = nn.Sequential(
                nn.LayerNorm(width),
                nn.Linear(width, width),
                nn.SiLU(),
                nn.Linear(width, width),
                nn.SiLU(),
            )
            self.out = nn.Linear(width, 1)
        device = next(fake_score.parameters()).device
        self.to(device)

    @property
    def fake_score(self) -> nn.Module:
        return self._fake[0]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @contextmanager
    def fake_in_graph(self) -> Iterator[None]:
        """Forwards inside keep the fake score's weights in the graph, so D's loss reaches them."""
        self._fake_weights_in_graph = True
        try:
            yield
        finally:
            self._fake_weights_in_graph = False

    def features(self, x_t: Tensor, level: Tensor, cond: Conditioning, as_tokens: bool = True) -> Tensor:
        """Image tokens [B, N, C] of the hooked block of the fake score at ``x_t`` (``as_tokens=False``:
        the block's output as it is, a UNet's map [B, C, H, W])."""
        fake = self.fake_score
        captured: list[Tensor] = []
        tap = self.adapter.feature_taps(fake)[self.feature_block]
        keep = _tokens if as_tokens else lambda output: output
        hook = tap.module.register_forward_hook(
            lambda _module, _inputs, output: captured.append(keep(output))
        )
        weights = nullcontext() if self._fake_weights_in_graph else _weights_frozen(fake)
        try:
            with weights:
                self.adapter.forward(fake, x_t, level, cond)
        finally:
            hook.remove()
        if tap.image_tokens is not None:  # a single-stream block: leave out caption and padding tokens
            return captured[0][:, : tap.image_tokens(x_t)]
        return captured[0]

    def forward(self, x: Tensor, cond: Conditioning, level: Tensor, noise: Tensor) -> Tensor:
        x_t = self.adapter.param.add_noise(x, noise.to(x), level)
        dtype = next(self.head.parameters()).dtype
        if isinstance(self.head, ConvClassifierHead):
            return self.head(self.features(x_t, level, cond, as_tokens=False).to(dtype))  # [B, 1]
        h = self.head(self.features(x_t, level, cond).to(dtype))
        return self.out(h.mean(dim=1))  # [B, 1]


# The toy discriminator's architecture (fixed, like a pretrained backbone's): three stride-2 layers
# of a seeded random conv net (32x32 -> 16, 8, 4), one projected head per layer.
TOY_BACKBONE_CHANNELS = (32, 64, 64)
TOY_BACKBONE_SEED = 1234  # differs from the evaluator's feature network (seed 0)
TOY_HEAD_HIDDEN = 32


def head_block(gan: GANConfig) -> int | None:
    """The fake-score block of the DMD2 head: ``gan.feature_blocks`` when it names exactly one block.

    Where DMD2's head attaches on a DiT is unknown (§12.10). A one-entry ``feature_blocks`` chooses
    the block; any other value (e.g. the VFM's block list, the default) means the middle block,
    ``len(transformer_blocks) // 2``.
    """
    return gan.feature_blocks[0] if len(gan.feature_blocks) == 1 else None


def build_toy_discriminator(gan: GANConfig, adapter: FamilyAdapter, fake_score: nn.Module) -> nn.Module:
    """``gan.type: toy``: the seeded random conv backbone with one projected head per layer."""
    text_dim = adapter.null_conditioning(1).tensors["pooled"].shape[-1]
    backbone = RandomConvBackbone(TOY_BACKBONE_CHANNELS, seed=TOY_BACKBONE_SEED)
    return ProjectedDiscriminator(backbone, TOY_BACKBONE_CHANNELS, TOY_HEAD_HIDDEN, text_dim)


def build_dmd2_head(gan: GANConfig, adapter: FamilyAdapter, fake_score: nn.Module) -> nn.Module:
    """``gan.type: dmd2_head``: DMD2's classifier on the fake score's features."""
    return FakeScoreHeadDiscriminator(adapter, fake_score, head_block(gan), gan.head_trains_fake, gan.head)


def build_discriminator(gan: GANConfig, adapter: FamilyAdapter, fake_score: nn.Module) -> nn.Module | None:
    """The discriminator ``gan.type`` names in the registry (None for 'none')."""
    if gan.type == "none":
        return None
    spec = discriminator_spec(gan.type)
    if spec is None:
        raise ValueError(f"method.gan.type: '{gan.type}' is not registered")
    disc = resolve_builder(spec, "method.gan.type")(gan, adapter, fake_score)
    if not isinstance(disc, Discriminator):
        raise TypeError(
            f"method.gan.type '{gan.type}': the builder returned a {type(disc).__name__}, which lacks the "
            "Discriminator protocol (input_space, loss, noised, shares_fake_update, trainable_parameters, "
            "fake_in_graph)"
        )
    return disc
