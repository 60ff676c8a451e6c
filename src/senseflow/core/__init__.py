"""Typed noise/time math shared by teachers, students and samplers (pure torch).

* :mod:`senseflow.core.flow` — rectified flow (SD3.5, FLUX, toy teacher).
* :mod:`senseflow.core.ddpm` — variance-preserving DDPM (SDXL).
* :mod:`senseflow.core.timesteps` — training-time sampling and student anchor grids.
* :mod:`senseflow.core.parameterisation` — one interface over both families (no family branches).
"""

from senseflow.core.ddpm import BetaSchedule, DDPMSchedule, PredictionType
from senseflow.core.flow import (
    FlowSchedule,
    add_noise,
    eps_from_velocity,
    euler_step,
    expand_like,
    exponential_time_shift,
    flux_mu,
    static_shift,
    velocity_from,
    x0_from_velocity,
)
from senseflow.core.parameterisation import (
    DDPMParameterisation,
    FlowGrid,
    FlowParameterisation,
    Parameterisation,
)
from senseflow.core.timesteps import (
    Anchors,
    ddpm_anchors,
    flow_anchors_from_indices,
    flow_anchors_from_sigmas,
    flow_anchors_from_t,
    sample_logit_normal,
    sample_uniform_index,
)

__all__ = [
    "Anchors",
    "BetaSchedule",
    "DDPMParameterisation",
    "DDPMSchedule",
    "FlowGrid",
    "FlowParameterisation",
    "FlowSchedule",
    "Parameterisation",
    "PredictionType",
    "add_noise",
    "ddpm_anchors",
    "eps_from_velocity",
    "euler_step",
    "expand_like",
    "exponential_time_shift",
    "flow_anchors_from_indices",
    "flow_anchors_from_sigmas",
    "flow_anchors_from_t",
    "flux_mu",
    "sample_logit_normal",
    "sample_uniform_index",
    "static_shift",
    "velocity_from",
    "x0_from_velocity",
]
