"""SenseFlow's VFM discriminator (spec §8.1): a frozen DINOv2 with trained, conditioned heads.

The backbone is transformers' ``Dinov2Model`` from a local folder (any size), frozen and always in
eval mode. Its hidden states are read at ``gan.feature_blocks`` plus the embedding output (patch
tokens with position embeddings and the CLS token): eight maps for ViT-L. Each map adds the CLS
token to every patch token and becomes a 2-D grid; position embeddings are resized bilinearly to
the input's grid, as the official code does (transformers' own interpolation is bicubic), so
1024 px images give a 73x73 grid at the native input policy.

One head per map (StyleGAN-T's projected head at 2-D): spectral-normalised convolutions with
circular padding, ``BatchNormLocal`` (statistics over groups of at most 8 samples and all
positions), LeakyReLU 0.2, three stride-2 downsamplings with two residual blocks between them, and
a 1x1 projection to 64 channels. The reference image's map goes through a parallel stack to 64
channels, the CLIP text embedding through a linear layer to 64, and the logit at each position is
<out, cmap + refmap> / sqrt(64). The logits of all heads are concatenated.

Real and fake batches are judged in separate passes (``groups``): batch statistics are never
shared between them, as in the official code, which calls D once per batch.
"""

from __future__ import annotations

import contextlib
import json
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm
from torch.utils.checkpoint import checkpoint

from senseflow.config.method import GANConfig
from senseflow.models.batch import Conditioning
from senseflow.models.hub import file_sha256, resolve_pretrained, safetensors_fingerprint

TEXT_GROUP = "vfm"  # the text cache group of D's text embedding
TEXT_KEY = f"{TEXT_GROUP}.text"
REFERENCE_KEY = "reference"
VIRTUAL_BATCH = 8  # BatchNormLocal's group size (official value)
CMAP_DIM = 64  # width of the projection the logits are taken in (official value)
LEAKY_SLOPE = 0.2


class BatchNormLocal(nn.Module):
    """Batch norm with statistics per group of samples (ceil(B / 8) groups) over channels' positions,
    always from the current batch (no running statistics), with a learnt affine."""

    def __init__(self, channels: int, virtual_batch: int = VIRTUAL_BATCH, eps: float = 1e-5):
        super().__init__()
        self.virtual_batch, self.eps = virtual_batch, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[:2]
        groups = math.ceil(b / self.virtual_batch)
        flat = x.reshape(b, c, -1)
        # equal groups when b allows (the official layout), else consecutive groups of virtual_batch
        parts = flat.split(self.virtual_batch) if b % groups else flat.chunk(groups)
        out = []
        for part in parts:
            mean = part.mean(dim=(0, 2), keepdim=True)
            var = part.var(dim=(0, 2), keepdim=True, unbiased=False)
            out.append((part - mean) / torch.sqrt(var + self.eps))
        y = torch.cat(out) * self.weight[None, :, None] + self.bias[None, :, None]
        return y.view_as(x)


def sn_conv(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Module:
    """A spectral-normalised conv with circular padding (one power iteration per training forward)."""
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, padding_mode="circular")
    return spectral_norm(conv, n_power_iterations=1, eps=1e-12, dim=0)


def conv_block(channels: int, kernel: int) -> nn.Module:
    return nn.Sequential(
        sn_conv(channels, channels, kernel), BatchNormLocal(channels), nn.LeakyReLU(LEAKY_SLOPE)
    )


class Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return (self.fn(x) + x) / math.sqrt(2)


class EqualLinear(nn.Module):
    """A linear layer with StyleGAN's equalised learning rate: weights ~ N(0, 1) scaled by
    1/sqrt(fan-in) at run time (the official text mapper)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.gain = 1 / math.sqrt(c_in)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.gain, self.bias)


def _trunk(channels: int, downsamplings: int) -> list[nn.Module]:
    """1x1 block, then (down, residual 3x3 block) repeated, ending on a down: the head's body."""
    layers: list[nn.Module] = [conv_block(channels, 1)]
    for i in range(downsamplings):
        layers.append(sn_conv(channels, channels, 3, stride=2))
        if i < downsamplings - 1:
            layers.append(Residual(conv_block(channels, 3)))
    return layers


class VFMHead(nn.Module):
    def __init__(self, channels: int, text_dim: int, downsamplings: int = 3):
        super().__init__()
        self.main = nn.Sequential(*_trunk(channels, downsamplings))
        self.cls = sn_conv(channels, CMAP_DIM, 1)
        self.refmapper = nn.Sequential(*_trunk(channels, downsamplings), sn_conv(channels, CMAP_DIM, 1))
        self.cmapper = EqualLinear(text_dim, CMAP_DIM)

    def forward(self, feat: Tensor, text: Tensor, ref: Tensor) -> Tensor:
        out = self.cls(self.main(feat))
        cmap = self.cmapper(text)[:, :, None, None]
        refmap = self.refmapper(ref)
        return ((out * (cmap + refmap)).sum(1) / math.sqrt(CMAP_DIM)).flatten(1)


def image_statistics(folder: Path) -> tuple[list[float], list[float]]:
    """The backbone's input normalisation from its ``preprocessor_config.json`` (ImageNet's otherwise)."""
    from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    path = folder / "preprocessor_config.json"
    if path.is_file():
        cfg = json.loads(path.read_text())
        return list(cfg.get("image_mean", IMAGENET_DEFAULT_MEAN)), list(
            cfg.get("image_std", IMAGENET_DEFAULT_STD)
        )
    return list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)


class DinoFeatures(nn.Module):
    """The frozen backbone's maps: the embedding output and the hooked blocks' outputs, CLS added,
    as [B, C, h, w] grids."""

    def __init__(self, model: nn.Module, blocks: list[int], mean: list[float], std: list[float], ckpt: bool):
        super().__init__()
        depth = len(model.encoder.layer)
        if not blocks or len(set(blocks)) != len(blocks):
            raise ValueError(f"method.gan.feature_blocks: expected distinct block indices, got {blocks}")
        bad = [b for b in blocks if not 0 <= b < depth]
        if bad:
            raise ValueError(
                f"method.gan.feature_blocks: {bad} out of range for a backbone of {depth} blocks"
            )
        self.model = model.eval().requires_grad_(False)
        self.blocks = sorted(blocks)
        self.patch = int(model.config.patch_size)
        self.width = int(model.config.hidden_size)
        self.checkpointing = ckpt
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> DinoFeatures:
        return super().train(False)  # always eval: no dropout, whatever the trainer sets

    @property
    def maps(self) -> int:
        return len(self.blocks) + 1

    def position_embeddings(self, h: int, w: int) -> Tensor:
        table = self.model.embeddings.position_embeddings  # [1, 1 + n*n, C]
        cls, grid = table[:, :1], table[:, 1:]
        n = math.isqrt(grid.shape[1])
        grid = grid.reshape(1, n, n, -1).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
        return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, h * w, -1).to(table.dtype)], dim=1)

    def forward(self, images: Tensor) -> list[Tensor]:
        """``images`` RGB in [-1, 1] -> one [B, C, h, w] map per hooked depth (embeddings first)."""
        x = ((images + 1) / 2 - self.mean) / self.std
        emb = self.model.embeddings
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        tokens = emb.patch_embeddings(x)
        tokens = torch.cat([emb.cls_token.expand(len(x), -1, -1).to(tokens.dtype), tokens], dim=1)
        tokens = tokens + self.position_embeddings(h, w).to(tokens.dtype)
        maps = [tokens]
        for i, layer in enumerate(self.model.encoder.layer[: self.blocks[-1] + 1]):
            if self.checkpointing and torch.is_grad_enabled():
                out = checkpoint(layer, tokens, use_reentrant=False)
            else:
                out = layer(tokens)
            tokens = out[0] if isinstance(out, tuple) else out  # older transformers return a tuple
            if i in self.blocks:
                maps.append(tokens)
        return [(t[:, 1:] + t[:, :1]).transpose(1, 2).reshape(len(x), self.width, h, w) for t in maps]


class CLIPTextEmbedder:
    """D's text condition: CLIP's projected text features, L2-normalised (open_clip's ViT-L-14
    ``openai`` model is these weights; ``get_text_features`` pools at the end token like it)."""

    group = TEXT_GROUP

    def __init__(self, folder: Path, device: torch.device | str = "cpu"):
        self.folder = Path(folder)
        self.device = torch.device(device)
        self._model: nn.Module | None = None
        self._tokenizer: Any = None

    def _load(self) -> None:
        from transformers import AutoTokenizer, CLIPModel, CLIPTextModelWithProjection

        # a full CLIP folder (openai/clip-vit-large-patch14) or a text tower with its projection; used
        # only when the text cache does not hold D's text features
        config = json.loads((self.folder / "config.json").read_text())
        cls = CLIPModel if config.get("model_type") == "clip" else CLIPTextModelWithProjection
        self._model = cls.from_pretrained(self.folder).to(self.device).eval().requires_grad_(False)
        self._tokenizer = AutoTokenizer.from_pretrained(self.folder)

    def _text_config(self):
        config = self._model.config
        return getattr(config, "text_config", config)

    def identity(self) -> dict[str, Any]:
        """Configs and tokenizer files by content, weights by their cheap fingerprint."""
        out = {}
        for path in sorted(p for p in self.folder.iterdir() if p.is_file()):
            if path.suffix == ".safetensors":
                out[path.name] = safetensors_fingerprint(path)
            elif path.suffix in (".json", ".txt"):
                out[path.name] = file_sha256(path)
        return {"model": "clip_text_features_l2", "files": out}

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        if self._model is None:
            self._load()
        ids = self._tokenizer(
            prompts,
            padding="max_length",
            max_length=self._text_config().max_position_embeddings,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        if hasattr(self._model, "get_text_features"):
            out = self._model.get_text_features(input_ids=ids)
            features = out if isinstance(out, Tensor) else out.pooler_output
        else:
            features = self._model(input_ids=ids).text_embeds
        return Conditioning({"text": F.normalize(features.float(), dim=-1)})

    def to(self, device: torch.device | str) -> CLIPTextEmbedder:
        self.device = torch.device(device)
        if self._model is not None:
            self._model.to(self.device)
        return self


class VFMDiscriminator(nn.Module):
    """``gan.type: vfm``: logits [B, sum of the heads' positions] for images in [-1, 1]."""

    input_space: ClassVar[str] = "pixels"
    loss: ClassVar[str] = "hinge"
    noised: ClassVar[bool] = False
    shares_fake_update: ClassVar[bool] = False
    separate_calls: ClassVar[bool] = True  # real and fake in separate passes (per-batch statistics)

    def __init__(self, backbone: DinoFeatures, text: CLIPTextEmbedder, text_dim: int, input_size: int | None):
        super().__init__()
        # Held by reference, not as a submodule: the frozen backbone is loaded from its folder, so it
        # stays out of checkpoints, of DDP's start-up broadcast and of D's optimiser.
        self._backbone = (backbone,)
        self.heads = nn.ModuleList(VFMHead(backbone.width, text_dim) for _ in range(backbone.maps))
        self.text = text
        self.text_cache: Any = None  # the run's text cache, when its VFM group was written
        self.input_size = input_size

    @property
    def backbone(self) -> DinoFeatures:
        return self._backbone[0]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.heads.parameters() if p.requires_grad]

    def fake_in_graph(self) -> contextlib.AbstractContextManager:
        return nullcontext()

    def _apply(self, fn, recurse=True):  # .to / .cuda / .float: the backbone and the text tower follow
        out = super()._apply(fn, recurse)
        self.backbone._apply(fn, recurse)
        device = next(self.heads.parameters()).device
        self.text.to(device)
        if self.text_cache is not None:
            self.text_cache.to(device)
        return out

    def conditioning(self, prompts: list[str], cond: Conditioning, real_pixels) -> Conditioning:
        """D's condition for a batch: the prompts' text embeddings (from the text cache when it holds
        them) and the real images, the reference for real and fake alike."""
        if self.text_cache is not None:
            text = self.text_cache.lookup_group(TEXT_GROUP, prompts).tensors[TEXT_KEY]
        else:
            text = self.text.encode(prompts).tensors["text"]
        return Conditioning({TEXT_KEY: text, REFERENCE_KEY: real_pixels().detach()})

    def _resize(self, x: Tensor) -> Tensor:
        if self.input_size is None or x.shape[-1] == self.input_size == x.shape[-2]:
            return x
        return F.interpolate(x, size=(self.input_size, self.input_size), mode="area")

    def _judge(self, x: Tensor, text: Tensor, ref: Tensor) -> Tensor:
        feats = self.backbone(self._resize(x))
        with torch.no_grad():
            refs = self.backbone(self._resize(ref))
        text = text.to(feats[0].dtype)
        return torch.cat(
            [head(f, text, r) for head, f, r in zip(self.heads, feats, refs, strict=True)], dim=1
        )

    def forward(self, x: Tensor, cond: Conditioning, groups: int = 1) -> Tensor:
        """Logits for ``x``; with ``groups`` > 1 each of its equal chunks (real, fake) is judged in
        its own pass, so no statistic is shared between them."""
        text, ref = cond.tensors[TEXT_KEY], cond.tensors[REFERENCE_KEY].to(x.dtype)
        parts = zip(x.chunk(groups), text.chunk(groups), ref.chunk(groups), strict=True)
        return torch.cat([self._judge(*part) for part in parts])


def load_backbone(gan: GANConfig, allow_download: bool = False) -> tuple[nn.Module, Path]:
    from transformers import Dinov2Model

    folder = resolve_pretrained(
        gan.backbone, "method.gan.backbone", allow_download=allow_download, allow_field=None
    )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"method.gan.backbone: {folder} has no config.json (expected a DINOv2 folder as "
            "`huggingface-cli download facebook/dinov2-large` writes it)"
        )
    return Dinov2Model.from_pretrained(folder), folder


def build_vfm(gan: GANConfig, adapter, fake_score: nn.Module) -> VFMDiscriminator:
    """``gan.type: vfm``: the registry's builder."""
    if gan.reference_encoder != "dinov2":
        raise ValueError(
            f"method.gan.reference_encoder: '{gan.reference_encoder}' (the paper's v1 CLIP reference) is "
            "not in this version; use dinov2 (the official code's)"
        )
    model, folder = load_backbone(gan)
    mean, std = image_statistics(folder)
    backbone = DinoFeatures(model, list(gan.feature_blocks), mean, std, gan.backbone_checkpointing)
    cache = getattr(adapter, "text_cache", None)
    cached = cache is not None and TEXT_GROUP in cache.groups
    try:
        text_folder = resolve_pretrained(gan.text_encoder, "method.gan.text_encoder", allow_field=None)
    except FileNotFoundError:
        if not cached:
            raise
        text_folder = None  # the cache holds D's text features: the CLIP folder is not needed
    if text_folder is not None and not (text_folder / "config.json").is_file():
        raise FileNotFoundError(
            f"method.gan.text_encoder: {text_folder} has no config.json (expected a CLIP folder as "
            "`huggingface-cli download openai/clip-vit-large-patch14` writes it)"
        )
    if cached:
        text_dim = int(cache.tensor_specs(TEXT_GROUP)[TEXT_KEY]["shape"][-1])
    else:
        config = json.loads((text_folder / "config.json").read_text())
        text_dim = int(config.get("projection_dim") or config["text_config"]["projection_dim"])
    text = CLIPTextEmbedder(text_folder or Path(gan.text_encoder))
    disc = VFMDiscriminator(backbone, text, text_dim, gan.input_size)
    if cached:
        if text_folder is not None:
            cache.check_identity(TEXT_GROUP, text.identity())
        disc.text_cache = cache
    return disc


def build_vfm_text_encoder(gan: GANConfig) -> CLIPTextEmbedder:
    """What ``senseflow cache-text`` runs to add D's text embeddings to the cache."""
    return CLIPTextEmbedder(resolve_pretrained(gan.text_encoder, "method.gan.text_encoder", allow_field=None))
