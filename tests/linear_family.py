"""A teacher family, a data kind and a discriminator whose outputs are known in closed form.

Every network is a per-pixel linear map of its input, its noise level and a prompt embedding, so a
test can write the whole SenseFlow iteration out by hand and compare it with what the real
``Distiller`` computes. The family is registered through the real registries and built by the real
build path (meta device, safetensors weights, ``initial_weights``):

* network (teacher, generator, fake score): ``v = mix·x + level_gain·σ + cond_proj·emb``, per pixel
  (``mix`` [C, C], ``level_gain`` [C], ``cond_proj`` [C, E]); the teacher starts from other weights
  than the generator and the fake score (``teacher.*`` vs ``student.*`` in the weight file), so the
  teacher and the student are different maps;
* prompts are E numbers written as text; the embedding is those numbers (the empty prompt: zeros);
* data: per iteration, seeded Gaussian samples in the model space (the codec is the identity);
* discriminator: spatial logits ``weight·x + bias + cond_weight·emb`` per pixel, hinge loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

import senseflow.config.registry as registry
from senseflow.config import load_config
from senseflow.config.registry import DataKindSpec, DiscriminatorSpec, FamilySpec
from senseflow.core.flow import FlowSchedule
from senseflow.models.adapter import FamilyAdapter
from senseflow.models.batch import Batch, Conditioning
from senseflow.models.schedules import parameterisation_and_anchors
from tests.trainer_helpers import RECIPE

NAME = "linear"
CHANNELS = 3
EMB_DIM = 2
WEIGHTS = "weights.safetensors"
PARAM_NAMES = ("mix", "level_gain", "cond_proj")


class LinearNet(nn.Module):
    """``v = mix·x + level_gain·σ + cond_proj·emb`` at every pixel."""

    def __init__(self, channels: int, emb_dim: int):
        super().__init__()
        self.mix = nn.Parameter(torch.zeros(channels, channels))
        self.level_gain = nn.Parameter(torch.zeros(channels))
        self.cond_proj = nn.Parameter(torch.zeros(channels, emb_dim))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LinearNet:
        return cls(**config)

    def forward(self, x: Tensor, level: Tensor, emb: Tensor) -> Tensor:
        out = torch.einsum("oc,bchw->bohw", self.mix, x)
        out = out + self.level_gain[None, :, None, None] * level.to(x.dtype)[:, None, None, None]
        return out + (emb.to(x.dtype) @ self.cond_proj.T)[:, :, None, None]


def write_teacher(folder: Path, seed: int = 0) -> Path:
    """A weight file with different teacher and student maps (the student starts as neither)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(CHANNELS)
    tensors = {}
    for role, scale in (("teacher", 1.0), ("student", 0.6)):
        tensors[f"{role}.mix"] = scale * eye + 0.3 * torch.randn(CHANNELS, CHANNELS, generator=g)
        tensors[f"{role}.level_gain"] = 0.5 * torch.randn(CHANNELS, generator=g)
        tensors[f"{role}.cond_proj"] = 0.7 * torch.randn(CHANNELS, EMB_DIM, generator=g)
    save_file(tensors, str(folder / WEIGHTS))
    return folder


class LinearAdapter(FamilyAdapter):
    guidance_kind = "cfg"

    def __init__(self, folder: str | Path, anchors):
        self.folder = Path(folder)
        self.schedule = FlowSchedule(num_train_timesteps=1000, shift=1.0)
        self.param, self.anchors = parameterisation_and_anchors(self.schedule, anchors)
        self._device = torch.device("cpu")

    def to(self, device) -> LinearAdapter:
        self._device = torch.device(device)
        return self

    def network_spec(self, role):
        return LinearNet, {"channels": CHANNELS, "emb_dim": EMB_DIM}

    def weight_files(self) -> list[Path]:
        return [self.folder / WEIGHTS]

    def initial_weights(self, role, teacher):
        source = "teacher" if role == "teacher" else "student"
        return {name: teacher[f"{source}.{name}"] for name in PARAM_NAMES if f"{source}.{name}" in teacher}

    def conditioning_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"emb": (EMB_DIM,)}

    def encode_text(self, prompts: list[str]) -> Conditioning:
        rows = []
        for prompt in prompts:
            values = [float(v) for v in prompt.split()]
            rows.append(values + [0.0] * (EMB_DIM - len(values)))
        return Conditioning({"emb": torch.tensor(rows, dtype=torch.float32, device=self._device)})

    def predict(self, net, x_t, level, cond, guidance=None):
        if guidance is not None:
            raise ValueError("the linear family has no guidance input")
        return net(x_t, level, cond.tensors["emb"])

    def sample_shape(self, resolution: int) -> tuple[int, ...]:
        return (CHANNELS, resolution, resolution)

    def sampling_levels(self, steps: int) -> Tensor:
        return self.schedule.inference_sigmas(steps)


def build_linear_adapter(cfg) -> LinearAdapter:
    return LinearAdapter(cfg.model.teacher, cfg.model.anchors)


def batch_at(seed: int, index: int, size: int, resolution: int) -> Batch:
    """Iteration ``index``'s samples and prompts (a pure function of seed and index)."""
    g = torch.Generator().manual_seed(seed * 100_003 + index)
    samples = 0.8 * torch.randn(size, CHANNELS, resolution, resolution, generator=g)
    numbers = torch.randn(size, EMB_DIM, generator=g)
    prompts = [" ".join(f"{v:.3f}" for v in row.tolist()) for row in numbers]
    return Batch(prompts=prompts, images=samples)


class LinearStream:
    identity = "tests.linear_family.LinearStream"

    def __init__(self, cfg, rank: int = 0, world: int = 1):
        self.seed, self.size, self.resolution = cfg.seed + rank, cfg.data.batch_size, cfg.data.resolution

    def batch(self, index: int) -> Batch:
        return batch_at(self.seed, index, self.size, self.resolution)


class LinearDiscriminator(nn.Module):
    """Spatial logits ``weight·x + bias + cond_weight·emb`` [B, H·W], hinge loss, model space."""

    input_space: ClassVar[str] = "model"
    loss: ClassVar[str] = "hinge"
    noised: ClassVar[bool] = False
    shares_fake_update: ClassVar[bool] = False

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(-0.4, 0.5, CHANNELS))
        self.bias = nn.Parameter(torch.tensor(0.1))
        self.cond_weight = nn.Parameter(torch.linspace(0.3, -0.2, EMB_DIM))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def fake_in_graph(self):
        from contextlib import nullcontext

        return nullcontext()

    def forward(self, x: Tensor, cond: Conditioning) -> Tensor:
        logits = torch.einsum("c,bchw->bhw", self.weight, x) + self.bias
        logits = logits + (cond.tensors["emb"].to(x.dtype) @ self.cond_weight)[:, None, None]
        return logits.flatten(1)


def build_linear_discriminator(gan, adapter, fake_score) -> LinearDiscriminator:
    return LinearDiscriminator()


def register(monkeypatch) -> None:
    """Register the family, data kind and discriminator ``linear`` for one test only."""
    for table in ("_FAMILIES", "_DATA_KINDS", "_DISCRIMINATORS"):
        monkeypatch.setattr(registry, table, dict(getattr(registry, table)))
    registry.register_family(
        FamilySpec(
            NAME,
            builder=build_linear_adapter,
            anchor_units=("t",),
            guidance_kinds=("cfg",),
            hub=False,
            data_kinds=(NAME,),
            reads=frozenset(),
        )
    )
    registry.register_data_kind(
        DataKindSpec(NAME, builder=LinearStream, reads=frozenset({"num_workers"}), needs_path=False)
    )
    registry.register_discriminator(DiscriminatorSpec(NAME, builder=build_linear_discriminator))


def linear_cfg(teacher: Path, out: Path, *extra: str):
    """``configs/toy/distill.yaml`` on the linear family: float32, no clipping, no augmentation, every
    network on its own AdamW, batch 8 of 3x4x4 samples."""
    return load_config(
        RECIPE,
        [
            f"model.family={NAME}",
            f"model.teacher={teacher}",
            f"data.kind={NAME}",
            "data.resolution=4",
            "data.batch_size=8",
            f"output_dir={out}",
            "method.randomness=per_sample",
            "method.isg.weight=0.5",  # SD 3.5 Medium's: not 1, so that a dropped weight shows
            f"method.gan.type={NAME}",
            "method.gan.diffaug=[]",
            "precision.param_dtype=fp32",
            "precision.autocast_dtype=fp32",
            "precision.teacher_dtype=fp32",
            "parallel.strategy=none",
            "parallel.device=cpu",
            "logging.every=1",
            "logging.sample_every=null",
            "checkpoint.every=1000",
            *(f"optim.{net}.clip_grad=null" for net in ("generator", "fake", "discriminator")),
            *(f"optim.{net}.lr=1e-2" for net in ("generator", "fake", "discriminator")),
            *extra,
        ],
    )
