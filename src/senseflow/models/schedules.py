"""Helpers every family shares: the noise schedule read from a diffusers scheduler folder, the
student's anchors from a recipe, and the parameterisation they give.

A teacher folder states its schedule in ``scheduler/scheduler_config.json``; nothing here assumes a
value the folder does not state. Flow teachers (SD 3.5, FLUX, the toy teacher) give a
:class:`~senseflow.core.flow.FlowSchedule`: a static shift, or FLUX's dynamic shift whose μ follows
the number of latent tokens. DDPM teachers (SDXL) give a :class:`~senseflow.core.ddpm.DDPMSchedule`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from senseflow.config.common import AnchorsConfig
from senseflow.core.ddpm import DDPMSchedule
from senseflow.core.flow import FlowSchedule, flux_mu
from senseflow.core.parameterisation import DDPMParameterisation, FlowParameterisation, Parameterisation
from senseflow.core.timesteps import (
    Anchors,
    ddpm_anchors,
    flow_anchors_from_indices,
    flow_anchors_from_sigmas,
    flow_anchors_from_t,
)

SCHEDULER_CONFIG = "scheduler_config.json"


def read_scheduler_config(folder: str | Path, subfolder: str = "scheduler") -> dict[str, Any]:
    """The scheduler's config as diffusers writes it (``save_pretrained``), read without a download."""
    path = Path(folder) / subfolder / SCHEDULER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"teacher folder {folder}: no {subfolder}/{SCHEDULER_CONFIG}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def pipeline_t_grid(steps: int) -> list[float]:
    """The unshifted grid t = linspace(1, 1/N, N) the FLUX-style pipelines (FLUX.1, FLUX.2, Qwen-Image)
    pass to their scheduler as ``sigmas`` for N steps."""
    return np.linspace(1.0, 1 / steps, steps).tolist()


def dynamic_shift_mu(config: dict[str, Any], image_seq_len: int, max_shift: float = 1.15) -> float:
    """μ of a dynamically shifting ``FlowMatchEulerDiscreteScheduler`` for ``image_seq_len`` tokens, from
    the config's base/max sequence lengths and shifts (``max_shift``: the pipeline's fallback, 1.15 in
    FLUX's, 1.16 in SD3's)."""
    return flux_mu(
        image_seq_len,
        base_seq_len=int(config.get("base_image_seq_len", 256)),
        max_seq_len=int(config.get("max_image_seq_len", 4096)),
        base_shift=float(config.get("base_shift", 0.5)),
        max_shift=float(config.get("max_shift", max_shift)),
    )


def flow_schedule_from_config(
    config: dict[str, Any], image_seq_len: int | None = None, timestep_scale: float = 1000.0
) -> FlowSchedule:
    """A flow schedule from a ``FlowMatchEulerDiscreteScheduler`` config.

    With ``use_dynamic_shifting`` (FLUX) the shift is μ, linear in ``image_seq_len`` between the
    config's ``base_image_seq_len``/``max_image_seq_len`` and ``base_shift``/``max_shift``, as the FLUX
    pipeline computes it; the static ``shift`` is then not used. ``timestep_scale`` is how the family
    presents σ to its network (1000 for SD3, 1 for FLUX).
    """
    T = int(config.get("num_train_timesteps", 1000))
    if config.get("use_dynamic_shifting", False):
        if image_seq_len is None:
            raise ValueError("the scheduler uses dynamic shifting: its μ needs the number of image tokens")
        mu = dynamic_shift_mu(config, image_seq_len)
        return FlowSchedule(num_train_timesteps=T, mu=mu, timestep_scale=timestep_scale)
    return FlowSchedule(
        num_train_timesteps=T, shift=float(config.get("shift", 1.0)), timestep_scale=timestep_scale
    )


def load_flow_schedule(
    folder: str | Path, image_seq_len: int | None = None, timestep_scale: float = 1000.0
) -> FlowSchedule:
    """The flow schedule of a teacher folder (see :func:`flow_schedule_from_config`)."""
    return flow_schedule_from_config(read_scheduler_config(folder), image_seq_len, timestep_scale)


def load_ddpm_schedule(folder: str | Path) -> DDPMSchedule:
    """The DDPM schedule of a teacher folder (SDXL's ``EulerDiscreteScheduler`` or ``DDPMScheduler``)."""
    config = read_scheduler_config(folder)
    return DDPMSchedule(
        num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
        beta_start=float(config.get("beta_start", 0.0001)),
        beta_end=float(config.get("beta_end", 0.02)),
        beta_schedule=config.get("beta_schedule", "linear"),
        prediction_type=config.get("prediction_type", "epsilon"),
    )


def anchors_from_recipe(cfg: AnchorsConfig, schedule: FlowSchedule | DDPMSchedule) -> Anchors:
    """The student's anchors from ``model.anchors``: pre-shift t, σ or table indices for a flow
    teacher; integer timesteps (``ddpm_t``) for a DDPM teacher."""
    if isinstance(schedule, DDPMSchedule):
        if cfg.units != "ddpm_t":
            raise ValueError(f"model.anchors.units {cfg.units!r} is not a DDPM unit (ddpm_t)")
        return ddpm_anchors([int(v) for v in cfg.values], schedule)
    if cfg.units == "t":
        return flow_anchors_from_t(cfg.values, schedule)
    if cfg.units == "sigma":
        return flow_anchors_from_sigmas(cfg.values, schedule)
    if cfg.units == "index":
        return flow_anchors_from_indices([int(v) for v in cfg.values], schedule)
    raise ValueError(f"model.anchors.units {cfg.units!r} is not a flow unit (t, sigma or index)")


def parameterisation_and_anchors(
    schedule: FlowSchedule | DDPMSchedule, anchors: AnchorsConfig | None
) -> tuple[Parameterisation, Anchors | None]:
    """An adapter's parameterisation and its student's anchors (None without ``model.anchors``)."""
    param = parameterisation_for(schedule, anchors)
    return param, None if anchors is None else anchors_from_recipe(anchors, schedule)


def parameterisation_for(
    schedule: FlowSchedule | DDPMSchedule, anchors: AnchorsConfig | None = None
) -> Parameterisation:
    """The level convention of a schedule. Flow anchors given in σ put the t_mid grid on σ·1000
    (FLUX's code); otherwise the grid is the 1000-entry training table (SD 3.5's code)."""
    if isinstance(schedule, DDPMSchedule):
        return DDPMParameterisation(schedule)
    grid = "sigma" if anchors is not None and anchors.units == "sigma" else "table"
    return FlowParameterisation(schedule, grid=grid)
