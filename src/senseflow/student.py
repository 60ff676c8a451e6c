"""A distilled student loaded from a run: its recipe, its adapter and the generator's weights.

Sampling is the few-step, CFG-free chain of spec §7 (``renoise`` or ``euler``), one network call
per anchor, with per-sample seeds so an image depends only on its prompt and seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from senseflow.config import load_config
from senseflow.config.schema import DistillConfig
from senseflow.devices import resolve_device, to_dtype
from senseflow.models import build_adapter
from senseflow.models.build import build_generator
from senseflow.models.sampling import student_images
from senseflow.train import checkpoint as ckpt


class Student:
    def __init__(
        self,
        cfg: DistillConfig,
        generator_weights: dict[str, Tensor],
        checkpoint: Path | None = None,
        device: str = "cpu",
    ):
        """``device``: ``cpu``, ``cuda[:N]`` or ``auto``; the generator keeps its trained dtype."""
        self.cfg = cfg
        self.checkpoint = checkpoint  # the checkpoint folder the weights came from, if any
        self.device = resolve_device(device, field="device")
        self.adapter = build_adapter(cfg, text_cache=False).to(self.device)  # any prompt, live
        dtype = to_dtype(cfg.precision.param_dtype, "precision.param_dtype")
        if cfg.model.lora is not None:  # the teacher's weights with the generator's adapter
            from senseflow.train.lora_mode import build_lora_roles

            teacher_dtype = to_dtype(cfg.precision.teacher_dtype, "precision.teacher_dtype")
            roles = build_lora_roles(
                self.adapter, cfg, teacher_dtype, dtype, self.device, adapters=("generator",)
            )
            generator = roles["generator"]
            generator.base.eval().requires_grad_(False)
        else:
            generator = build_generator(self.adapter, dtype, self.device).eval().requires_grad_(False)
        self.generator = generator
        self.generator.load_state_dict(generator_weights, strict=True)
        self.anchor_levels = self.adapter.param.anchor_levels(self.adapter.anchors).to(self.device)

    @classmethod
    def from_run(
        cls, run_dir: str | Path, checkpoint: str | Path | None = None, device: str = "cpu"
    ) -> Student:
        """The newest checkpoint of ``run_dir`` (or ``checkpoint``) with the recipe saved inside it."""
        run_dir = Path(run_dir)
        path = Path(checkpoint) if checkpoint else ckpt.latest_checkpoint(run_dir / "checkpoints")
        if path is None or not (path / ckpt.META).is_file():
            raise FileNotFoundError(f"no complete checkpoint in {run_dir / 'checkpoints'} (train first)")
        cfg = load_config(path / ckpt.CONFIG)
        return cls(cfg, ckpt.read_network(path, "generator"), checkpoint=path, device=device)

    @torch.no_grad()
    def sample(
        self, prompts: Sequence[str], seeds: Sequence[int], mode: str = "renoise", batch_size: int = 64
    ) -> Tensor:
        """Decoded images in [-1, 1] (NCHW); ``mode`` is 'renoise' or 'euler'."""
        out = [
            student_images(
                self.adapter,
                self.generator,
                self.anchor_levels,
                self.cfg.data.resolution,
                prompts[i : i + batch_size],
                seeds[i : i + batch_size],
                mode,
            )
            for i in range(0, len(prompts), batch_size)
        ]
        return torch.cat(out).cpu()
