"""Loading the toy teacher from its folder and sampling it with N Euler steps and CFG.

The folder is read with the same ``from_pretrained`` calls used for real SD3-family teachers:
``SD3Transformer2DModel`` from ``transformer/``, the scheduler's shift from ``scheduler/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch import Tensor

from senseflow.config.loader import load_config
from senseflow.core.flow import FlowSchedule
from senseflow.sampling import CfgConvention, combine_guidance, flow_euler_sample, seeded_noise
from senseflow.toy.render import IMAGE_SIZE
from senseflow.toy.teacher import ToyTeacherConfig
from senseflow.toy.text import PromptEncoder

REQUIRED_SUBFOLDERS = ("transformer", "scheduler", "text_encoder", "tokenizer")
RECIPE_FILE = "recipe.yaml"


def shipped_teacher_path() -> Path:
    """The trained toy teacher that ships inside the package."""
    return Path(str(resources.files("senseflow") / "assets" / "toy_teacher"))


def resolve_teacher_folder(folder: str | Path | None, what: str = "teacher folder") -> Path:
    """The teacher folder (the shipped one for None), checked for the pipeline layout."""
    folder = Path(folder) if folder is not None else shipped_teacher_path()
    missing = [s for s in REQUIRED_SUBFOLDERS if not (folder / s).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{what} {folder} lacks {', '.join(missing)}/ (expected a pipeline layout with "
            f"{', '.join(REQUIRED_SUBFOLDERS)}; `senseflow toy train-teacher` writes one)"
        )
    return folder


def load_flow_schedule(folder: Path) -> FlowSchedule:
    """The teacher's noise schedule, read from its diffusers scheduler config."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    return FlowSchedule(
        num_train_timesteps=scheduler.config.num_train_timesteps, shift=scheduler.config.shift
    )


class ToyTeacher:
    def __init__(self, folder: str | Path | None = None, cfg_convention: CfgConvention = "uncond_plus"):
        folder = resolve_teacher_folder(folder)
        self.folder = folder
        self.recipe = load_config(folder / RECIPE_FILE, schema=ToyTeacherConfig)
        self.transformer = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer").eval()
        self.transformer.requires_grad_(False)
        self.schedule = load_flow_schedule(folder)
        self.encoder = PromptEncoder(folder)
        self.cfg_convention = cfg_convention
        self.image_shape = (self.transformer.config.in_channels, IMAGE_SIZE, IMAGE_SIZE)

    def velocity(self, x: Tensor, sigma: Tensor, tokens: Tensor, pooled: Tensor) -> Tensor:
        return self.transformer(
            hidden_states=x,
            encoder_hidden_states=tokens,
            pooled_projections=pooled,
            timestep=self.schedule.model_timestep(sigma),
            return_dict=False,
        )[0]

    def guided_velocity_fn(self, prompts: Sequence[str], guidance: float):
        """A velocity function with classifier-free guidance (one batched cond+uncond pass)."""
        tokens, pooled = self.encoder(list(prompts))
        if guidance == 1.0:
            return lambda x, s: self.velocity(x, s, tokens, pooled)
        null_tokens, null_pooled = self.encoder([""] * len(prompts))
        both_tokens, both_pooled = torch.cat([tokens, null_tokens]), torch.cat([pooled, null_pooled])

        def fn(x: Tensor, sigma: Tensor) -> Tensor:
            v = self.velocity(torch.cat([x, x]), torch.cat([sigma, sigma]), both_tokens, both_pooled)
            cond, uncond = v.chunk(2)
            return combine_guidance(cond, uncond, guidance, self.cfg_convention)

        return fn

    @torch.no_grad()
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
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        sigmas = self.schedule.inference_sigmas(steps)
        out = []
        for i in range(0, len(prompts), batch_size):
            noise = seeded_noise(self.image_shape, seeds[i : i + batch_size])
            fn = self.guided_velocity_fn(prompts[i : i + batch_size], guidance)
            out.append(flow_euler_sample(fn, noise, sigmas, progress=progress))
        return torch.cat(out).clamp(-1, 1)
