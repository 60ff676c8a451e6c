"""Exact byte counts for ``senseflow plan``, from networks built on the meta device.

A meta tensor has a shape and a dtype but no storage, so a network built from its config costs no
memory and its weights, gradients, optimiser states and shards can be counted exactly:

* weights: every parameter and buffer, ``numel * element_size`` in the dtype the trainer stores it;
* a shard: FSDP2 splits each parameter on its first dimension into ``ceil(rows / ranks)`` rows per
  rank (padded, so every rank holds the first rank's size); buffers stay whole on every rank;
* gradients: one per trained parameter (or shard), in the parameter's dtype;
* optimiser states: torch's AdamW keeps ``exp_avg`` and ``exp_avg_sq`` in the parameter's dtype and
  a 4-byte step counter per tensor; bitsandbytes' 8-bit AdamW keeps two 1-byte states plus a float32
  scale per block of 256 values for tensors of at least 4096 values, two float32 states for
  smaller ones, and two shared 256-entry float32 tables;
* LoRA adapters: rank ``r`` matrices ``A [r, in]`` and ``B [out, r]`` beside every layer that
  ``model.lora.target_modules`` selects (the attention projections by default).

The frozen parts (text encoders, VAE, the VFM discriminator's backbone and heads) are built here
from their folders' configs, as the trainer would load them, and :func:`analyse` gathers
everything that does not depend on the number of GPUs: the counts, and one iteration's passes
measured on meta (:mod:`senseflow.train.plan_trace`).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import Tensor, nn

from senseflow.config.method import GANConfig
from senseflow.config.schema import DistillConfig
from senseflow.devices import to_dtype
from senseflow.models import build_adapter
from senseflow.models.adapter import FamilyAdapter
from senseflow.models.build import build_empty
from senseflow.models.discriminators import build_discriminator
from senseflow.models.hub import resolve_pretrained
from senseflow.train import plan_trace as pt

GIB = 1024**3
ADAMW_STEP_BYTES = 4  # torch AdamW's float32 step counter, one per parameter tensor
BNB_MIN_8BIT = 4096  # bitsandbytes keeps float32 states for tensors smaller than this
BNB_BLOCK = 256  # values per float32 absmax scale of its blockwise quantisation
BNB_TABLES = 2 * 256 * 4  # the two shared quantisation maps
DEFAULT_LORA_RANK = 64
_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def shard_numel(t: Tensor, ranks: int) -> int:
    """Elements of the first rank's FSDP2 shard of ``t`` (its padded size, the largest)."""
    if ranks == 1 or t.ndim == 0:
        return t.numel()
    return math.ceil(t.shape[0] / ranks) * math.prod(t.shape[1:])


def weight_bytes(net: nn.Module, ranks: int = 1) -> int:
    """Parameters (sharded over ``ranks``) and buffers (whole) of ``net``."""
    params = sum(shard_numel(p, ranks) * p.element_size() for p in net.parameters())
    return params + sum(b.numel() * b.element_size() for b in net.buffers())


def trained(net: nn.Module) -> list[Tensor]:
    return [p for p in net.parameters() if p.requires_grad]


def grad_bytes(params: Iterable[Tensor], ranks: int = 1) -> int:
    return sum(shard_numel(p, ranks) * p.element_size() for p in params)


def optimiser_bytes(params: Iterable[Tensor], name: str, ranks: int = 1) -> int:
    """The states ``optim.*.name`` keeps for ``params`` (their shards over ``ranks``)."""
    params = list(params)
    if name == "adamw":
        return sum(2 * shard_numel(p, ranks) * p.element_size() + ADAMW_STEP_BYTES for p in params)
    if name == "adamw8bit":
        total = BNB_TABLES if params else 0
        for p in params:
            n = shard_numel(p, ranks)
            total += 8 * n if n < BNB_MIN_8BIT else 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK)
        return total
    raise ValueError(f"optim.*.name: senseflow plan does not know optimiser {name!r} (adamw, adamw8bit)")


def lora_parameters(net: nn.Module, rank: int, targets: Iterable[str], dtype: torch.dtype) -> list[Tensor]:
    """Meta stand-ins of one adapter's matrices, as peft makes them for the modules ``targets``
    selects (LoRA mode's matching): A [r, in] and B [out, r] per ``Linear``; for a convolution A
    has its kernel and B is 1x1."""
    from senseflow.models.lora import matching_modules

    modules = dict(net.named_modules())
    out = []
    for name in matching_modules(net, tuple(targets)):
        m = modules[name]
        if isinstance(m, nn.Linear):
            shapes = [(rank, m.in_features), (m.out_features, rank)]
        elif isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            shapes = [(rank, m.in_channels // m.groups, *m.kernel_size), (m.out_channels, rank)]
        else:
            continue  # peft adapts Linear and convolution layers of these networks
        out += [torch.empty(shape, device="meta", dtype=dtype) for shape in shapes]
    if not out:
        raise ValueError(f"model.lora.target_modules: {list(targets)} match no layer of {type(net).__name__}")
    return out


def shard_unit_sizes(adapter: FamilyAdapter, net: nn.Module) -> tuple[list[int], int]:
    """Elements of each FSDP2 unit the adapter names, and of the root's own parameters."""
    units = adapter.shard_units(net)
    sizes = [sum(p.numel() for p in u.parameters()) for u in units]
    inside = {id(p) for u in units for p in u.parameters()}
    return sizes, sum(p.numel() for p in net.parameters() if id(p) not in inside)


def linear_and_conv_numel(net: nn.Module) -> int:
    """Parameters of the layers autocast casts (linear and convolution weights and biases)."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return sum(p.numel() for m in net.modules() if isinstance(m, kinds) for p in m.parameters(recurse=False))


# ---------------------------------------------------------------------------------------------- components


def _cast_like_transformers(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Storage dtype as transformers' ``from_pretrained(dtype=...)`` sets it: the class's
    ``_keep_in_fp32_modules`` stay float32 under float16 only, ``_keep_in_fp32_modules_strict``
    under float16 and bfloat16. Tied parameters (T5's shared embedding) stay one tensor."""
    keep = list(getattr(net, "_keep_in_fp32_modules_strict", None) or [])
    if dtype == torch.float16:
        keep += list(getattr(net, "_keep_in_fp32_modules", None) or [])
    cast: dict[int, nn.Parameter] = {}
    for name, module in net.named_modules(remove_duplicate=False):
        target = torch.float32 if any(part in keep for part in name.split(".")) else dtype
        for key, p in list(module._parameters.items()):
            if p is not None and p.is_floating_point() and p.dtype != target:
                if id(p) not in cast:
                    cast[id(p)] = nn.Parameter(p.to(target), requires_grad=p.requires_grad)
                module._parameters[key] = cast[id(p)]
        for key, b in list(module._buffers.items()):
            if b is not None and b.is_floating_point() and key not in module._non_persistent_buffers_set:
                module._buffers[key] = b.to(target)
    return net


def config_dtype(config: dict[str, Any]) -> torch.dtype:
    """The dtype transformers' default ``dtype="auto"`` loads a checkpoint in: its config's."""
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return _DTYPE_NAMES.get(str(name), torch.float32)


def transformers_on_meta(cls: type[nn.Module], config: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """A transformers model from its config on the meta device, stored as loading it would."""
    cfg = cls.config_class.from_dict(dict(config))
    with init_empty_weights(include_buffers=True):
        net = cls(cfg)
    return _cast_like_transformers(net, dtype).eval().requires_grad_(False)


def diffusers_on_meta(cls: type[nn.Module], config: dict[str, Any]) -> nn.Module:
    with init_empty_weights(include_buffers=True):
        net = cls.from_config(dict(config))
    return net.eval().requires_grad_(False)


def text_encoders(adapter: FamilyAdapter, dtype: torch.dtype) -> dict[str, nn.Module]:
    """The family's text encoders on meta (in ``dtype``, as the adapter loads them)."""
    from transformers import CLIPTextModelWithProjection

    folder = getattr(adapter, "folder", None)
    if hasattr(adapter, "TEXT_COMPONENTS") and folder is not None:
        return {
            encoder: transformers_on_meta(folder.component_class(encoder), folder.config(encoder), dtype)
            for _, encoder in adapter.TEXT_COMPONENTS
            if folder.has(encoder)
        }
    config = Path(folder) / "text_encoder" / "config.json"  # the toy teacher's CLIP tower
    if isinstance(folder, Path) and config.is_file():
        loaded = json.loads(config.read_text())
        return {
            "text_encoder": transformers_on_meta(CLIPTextModelWithProjection, loaded, config_dtype(loaded))
        }
    return {}


def vae(adapter: FamilyAdapter) -> nn.Module | None:
    """The autoencoder on meta, float32 (the codec's dtype); None in pixel space."""
    folder = getattr(adapter, "folder", None)
    if not hasattr(adapter, "vae_config") or folder is None:
        return None
    return diffusers_on_meta(folder.component_class("vae"), adapter.vae_config)


def _folder_config(name: str, field: str) -> tuple[Path, dict[str, Any]]:
    folder = resolve_pretrained(name, field, allow_field=None)
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{field}: {folder} has no config.json")
    return folder, json.loads(path.read_text())


@contextlib.contextmanager
def _no_power_iterations_on_meta() -> Iterator[None]:
    """Spectral norm's constructor runs 15 power iterations to set its two vectors; on meta tensors
    they compute nothing (and are slow), so they are skipped while heads are built on meta."""
    from torch.nn.utils.parametrizations import _SpectralNorm

    original = _SpectralNorm._power_method

    def power_method(self, weight_mat: Tensor, n_power_iterations: int) -> None:
        if not weight_mat.is_meta:
            original(self, weight_mat, n_power_iterations)

    _SpectralNorm._power_method = power_method
    try:
        yield
    finally:
        _SpectralNorm._power_method = original


def vfm_parts(gan: GANConfig, text_cached: bool) -> tuple[nn.Module, nn.Module | None, list[str]]:
    """The VFM discriminator on meta (DINOv2 from ``gan.backbone``'s config, its heads in float32)
    and D's CLIP tower (None when the run's text cache holds D's text features), with notes."""
    from transformers import CLIPModel, CLIPTextModelWithProjection, Dinov2Model

    from senseflow.models.vfm import CLIPTextEmbedder, DinoFeatures, VFMDiscriminator, image_statistics

    notes: list[str] = []
    folder, config = _folder_config(gan.backbone, "method.gan.backbone")
    backbone = transformers_on_meta(Dinov2Model, config, config_dtype(config))
    mean, std = image_statistics(folder)
    features = DinoFeatures(backbone, list(gan.feature_blocks), mean, std, gan.backbone_checkpointing)
    try:
        clip_folder, clip = _folder_config(gan.text_encoder, "method.gan.text_encoder")
    except FileNotFoundError:
        if not text_cached:
            raise
        clip_folder, clip = None, {"projection_dim": 768}
        notes.append("D's text width taken as 768 (CLIP ViT-L/14): method.gan.text_encoder is not here")
    text_dim = int(clip.get("projection_dim") or clip["text_config"]["projection_dim"])
    with init_empty_weights(include_buffers=True), _no_power_iterations_on_meta():
        disc = VFMDiscriminator(
            features, CLIPTextEmbedder(clip_folder or Path(".")), text_dim, gan.input_size
        )
    tower = None
    if not text_cached:
        cls = CLIPModel if clip.get("model_type") == "clip" else CLIPTextModelWithProjection
        tower = transformers_on_meta(cls, clip, config_dtype(clip))
    return disc, tower, notes


class _Delegate:
    """An object's attributes, some replaced."""

    def __init__(self, inner: Any, **replaced: Any):
        self._inner = inner
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _meta_noise(x0: torch.Tensor, eps: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Noising as the schedule does it (scaled sample plus scaled noise), without reading the level's
    value, which a meta tensor does not have (a DDPM schedule checks its range)."""
    return x0 * 1.0 + eps * 1.0


def discriminator_on_meta(cfg: DistillConfig, adapter: FamilyAdapter, notes: list[str]):
    """D on meta, the networks it holds by reference (for its passes), its condition for a batch,
    and the bytes it holds by reference apart from the run's networks."""
    gan = cfg.method.gan
    if gan.type == "none":
        return None, [], None, 0
    if gan.type == "vfm":
        from senseflow.models.vfm import REFERENCE_KEY, TEXT_KEY

        disc, tower, more = vfm_parts(gan, text_cached=cfg.model.text_cache != "live")
        notes.extend(more)
        res, width = cfg.data.resolution, disc.heads[0].cmapper.weight.shape[1]
        extra = weight_bytes(disc.backbone) + (weight_bytes(tower) if tower is not None else 0)

        def cond(b: int) -> pt.Conditioning:
            text = torch.empty(b, width, device=pt.META)
            return pt.Conditioning(
                {TEXT_KEY: text, REFERENCE_KEY: torch.empty(b, 3, res, res, device=pt.META)}
            )

        return disc, [disc.backbone], cond, extra
    fake = build_empty(
        adapter, "fake_score", to_dtype(cfg.precision.autocast_dtype, "precision.autocast_dtype")
    ).to(pt.META)
    with init_empty_weights(include_buffers=True):
        disc = build_discriminator(gan, adapter, fake)
    if disc.noised and hasattr(disc, "adapter"):  # this meta copy noises without the schedule's values
        disc.adapter = _Delegate(adapter, param=_Delegate(adapter.param, add_noise=_meta_noise))
    shapes = pt.conditioning_shapes(adapter)
    held = [fake] if getattr(disc, "fake_score", None) is fake else []  # the run's own fake score
    return disc, held, lambda b: pt.meta_conditioning(shapes, b), 0


@dataclass
class Analysis:
    """What does not depend on the number of GPUs: the networks on meta and the measured passes."""

    cfg: DistillConfig
    nets: dict[str, nn.Module]  # teacher, generator, fake score on meta, in their storage dtypes
    units: dict[str, tuple[list[int], int]]  # per role: each FSDP2 unit's elements, the root's own
    text_bytes: int
    vae_bytes: int
    disc_weights: int  # D's weights and what it holds by reference (DINOv2, a CLIP tower)
    disc_trained: list[torch.Tensor]  # meta stand-ins of D's trained parameters
    lora: list[torch.Tensor]  # meta stand-ins of one LoRA adapter's matrices (precision.param_dtype)
    copies_numel: dict[str, int]  # linear and conv parameters (what autocast casts), per role
    activations: pt.Activations
    lora_activations: pt.Activations  # the same iteration with LoRA mode's trained passes
    notes: list[str] = field(default_factory=list)


def lora_settings(cfg: DistillConfig, rank: int | None) -> tuple[int, list[str]]:
    """LoRA mode's rank (``rank``, else ``model.lora.rank``, else 64) and target modules."""
    from senseflow.config.schema import LORA_TARGET_MODULES

    lora = cfg.model.lora
    targets = list(lora.target_modules) if lora is not None else list(LORA_TARGET_MODULES)
    return rank or (lora.rank if lora is not None else DEFAULT_LORA_RANK), targets


def analyse(cfg: DistillConfig, lora_rank: int | None = None, activations: bool = True) -> Analysis:
    """Build the recipe's networks on meta, count them and (``activations``) measure one
    iteration's passes; ``lora_rank`` (default: the recipe's ``model.lora.rank``, else 64) sizes the
    LoRA strategy's adapters."""
    if lora_rank is not None and lora_rank < 1:
        raise ValueError(f"--lora-rank: expected a positive whole number, got {lora_rank}")
    rank, targets = lora_settings(cfg, lora_rank)
    adapter = build_adapter(cfg, text_cache=False)
    p = cfg.precision
    train = to_dtype(p.param_dtype, "precision.param_dtype")
    dtypes = {
        "teacher": to_dtype(p.teacher_dtype, "precision.teacher_dtype"),
        "generator": train,
        "fake_score": train,
    }
    nets = {role: build_empty(adapter, role, dtype).to(pt.META) for role, dtype in dtypes.items()}
    notes: list[str] = []
    text = 0
    if cfg.model.text_cache == "live":
        text_dtype = getattr(adapter, "text_dtype", dtypes["teacher"])
        text = sum(weight_bytes(m) for m in text_encoders(adapter, text_dtype).values())
    autoencoder = vae(adapter)
    disc, held, disc_cond, extra = discriminator_on_meta(cfg, adapter, notes)
    trained = [torch.empty_like(q, device=pt.META) for q in disc.trainable_parameters()] if disc else []
    disc_weights = weight_bytes(disc) + extra if disc is not None else 0
    measured = lora_measured = pt.Activations.none()
    if activations:
        compute = to_dtype(cfg.precision.autocast_dtype, "precision.autocast_dtype")
        checkpointing = cfg.parallel.gradient_checkpointing
        gen = build_empty(adapter, "generator", compute).to(pt.META)
        lora = pt.with_lora(build_empty(adapter, "teacher", compute).to(pt.META), rank, targets)
        for net in (gen, lora) if checkpointing else ():
            adapter.enable_gradient_checkpointing(net)
        teacher = build_empty(adapter, "teacher", compute).to(pt.META)
        if disc is not None:  # eval: no power iteration of spectral norm (slow on meta, holds nothing)
            disc.to(device=pt.META, dtype=compute).eval()
        res, chunk = cfg.data.resolution, cfg.model.decode_chunk
        measured = pt.measure_iteration(adapter, gen, teacher, autoencoder, res, chunk, disc, held, disc_cond)
        lora_passes = pt.fit_pass(lambda b: pt.network_pass(adapter, lora, res, b, train=True))
        lora_measured = measured.with_passes(*lora_passes)
    return Analysis(
        cfg=cfg,
        nets=nets,
        units={role: shard_unit_sizes(adapter, net) for role, net in nets.items()},
        text_bytes=text,
        vae_bytes=weight_bytes(autoencoder) if autoencoder is not None else 0,
        disc_weights=disc_weights,
        disc_trained=trained,
        lora=lora_parameters(nets["teacher"], rank, targets, train),
        copies_numel={role: linear_and_conv_numel(net) for role, net in nets.items()},
        activations=measured,
        lora_activations=lora_measured,
        notes=notes,
    )
