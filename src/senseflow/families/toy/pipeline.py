"""The toy teacher as a sampler: its folder's transformer, N Euler steps and classifier-free guidance.

The transformer is read with the stock ``SD3Transformer2DModel.from_pretrained`` (as a real SD3
teacher would be); the calls, the guidance and the Euler steps are the family adapter's and the
shared :func:`~senseflow.models.sampling.teacher_sample`, the same code every family samples with.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from diffusers import SD3Transformer2DModel
from torch import Tensor

from senseflow.config.loader import load_config
from senseflow.core.sampling import CfgConvention
from senseflow.families.toy.adapter import ToyAdapter
from senseflow.families.toy.folder import RECIPE_FILE
from senseflow.families.toy.recipe import ToyTeacherConfig
from senseflow.families.toy.render import IMAGE_SIZE
from senseflow.models.sampling import teacher_sample


class ToyTeacher:
    def __init__(self, folder: str | Path | None = None, cfg_convention: CfgConvention = "uncond_plus"):
        self.adapter = ToyAdapter(folder, cfg_convention=cfg_convention)
        self.folder = self.adapter.folder
        self.recipe = load_config(self.folder / RECIPE_FILE, schema=ToyTeacherConfig)
        self.transformer = SD3Transformer2DModel.from_pretrained(self.folder, subfolder="transformer").eval()
        self.transformer.requires_grad_(False)
        self.image_shape = self.adapter.sample_shape(IMAGE_SIZE)

    @property
    def encoder(self):
        return self.adapter.encoder

    @property
    def schedule(self):
        return self.adapter.schedule

    def sample(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        steps: int | None = None,
        guidance: float | None = None,
        batch_size: int = 64,
        progress: bool = False,
    ) -> Tensor:
        """Images in [-1, 1], NCHW, from ``steps`` Euler steps of the teacher's own sigma schedule.

        ``steps`` and ``guidance`` default to the teacher recipe's ``sampling`` section.
        """
        steps = self.recipe.sampling.steps if steps is None else steps
        guidance = self.recipe.sampling.guidance if guidance is None else guidance
        return teacher_sample(
            self.adapter,
            self.transformer,
            prompts,
            seeds,
            steps,
            guidance,
            self.image_shape[-1],
            batch_size=batch_size,
            progress=progress,
        )
