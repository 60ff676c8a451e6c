"""Stock diffusers schedulers that walk a student's anchors, for an exported pipeline folder.

senseflow's few-step chain (:func:`senseflow.method.student_sample`) has two modes. ``renoise``
predicts x̂0 at each anchor and noises it afresh to the next one; ``euler`` takes one deterministic
step between anchors (flow Euler, or DDIM for a DDPM teacher), the last one onto x̂0. Stock
schedulers with the same arithmetic:

=============  ===============================================  =========================================
teacher        renoise                                          euler
=============  ===============================================  =========================================
DDPM (SDXL)    ``LCMScheduler``: x̂0, then noised to the next t  ``DDIMScheduler``, η = 0, final ᾱ = 1
flow (SD 3.5,  ``FlowMatchEulerDiscreteScheduler`` with          the same scheduler, deterministic
FLUX)          ``stochastic_sampling`` (x̂0, fresh noise)
=============  ===============================================  =========================================

A pipeline called with only ``num_inference_steps=K`` walks the timesteps its scheduler derives from
its config, so the config is chosen to make that walk the anchors: LCM's
``original_inference_steps``, DDIM's spacing and offset, the flow scheduler's static ``shift`` (fitted
to the anchors) and ``shift_terminal`` (the last anchor). Where no config walks them exactly,
:attr:`StockSampler.call` holds what the pipeline call must add (``timesteps=`` or ``sigmas=``) and
:attr:`StockSampler.deviation` the largest difference of the plain call's walk from the anchors.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler
from scipy.optimize import minimize_scalar

from senseflow.core.timesteps import Anchors

Mode = Literal["renoise", "euler"]
# A walk this close to the anchors is the anchors: float32 σ near 1 are spaced 6e-8 apart.
SIGMA_TOLERANCE = 1e-6
# Bounds of the fitted static shift's logarithm (shift e^-6 .. e^6 covers every published schedule).
LOG_SHIFT_BOUNDS = (-6.0, 6.0)
LOG_SHIFT_GRID = 241  # coarse search points over LOG_SHIFT_BOUNDS (0.05 apart)
# The flow scheduler's options that would move σ away from the static shift (and terminal stretch)
# the fit relies on.
FLOW_OVERRIDES = {
    "use_dynamic_shifting": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "invert_sigmas": False,
}


@dataclass(frozen=True)
class StockSampler:
    """A stock scheduler configured for the student, and how a pipeline call walks the anchors."""

    class_name: str
    config: dict[str, Any]
    anchors: list[float]  # σ (flow) or integer timesteps (DDPM), in step order
    units: Literal["sigma", "timestep"]
    default_walk: list[float]  # what ``pipe(..., num_inference_steps=K)`` walks
    call: dict[str, Any] = field(default_factory=dict)  # what the call adds to walk the anchors exactly
    deviation: float = 0.0  # max |default_walk - anchors|

    @property
    def steps(self) -> int:
        return len(self.anchors)

    @property
    def exact_by_default(self) -> bool:
        return not self.call

    def scheduler(self) -> Any:
        cls = {c.__name__: c for c in (LCMScheduler, DDIMScheduler, FlowMatchEulerDiscreteScheduler)}
        return cls[self.class_name].from_config(self.config)

    def summary(self) -> dict[str, Any]:
        """What the model card and the safetensors metadata state."""
        return {
            "scheduler": self.class_name,
            "num_inference_steps": self.steps,
            "anchors": self.anchors,
            "anchor_units": self.units,
            "default_walk": self.default_walk,
            "default_walk_max_difference": self.deviation,
            "exact_call": self.call,
        }


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _own(cls: type, config: dict[str, Any]) -> dict[str, Any]:
    """``config`` as ``cls`` keeps it: its own keys with its defaults filled, the others dropped."""
    known = set(inspect.signature(cls.__init__).parameters) - {"self"}
    return _plain(dict(cls.from_config({k: v for k, v in config.items() if k in known}).config))


def ddpm_sampler(config: dict[str, Any], anchors: list[int], mode: Mode) -> StockSampler:
    """LCM (renoise) or DDIM (euler) on the teacher's betas, walking integer ``anchors``."""
    k = len(anchors)
    if mode == "renoise":
        # x̂0 is used as predicted: a folder's DDPMScheduler may save clip_sample (it would clamp x̂0)
        base = {**_own(LCMScheduler, config), "clip_sample": False, "thresholding": False}
        lcm = LCMScheduler.from_config(base)
        total = int(lcm.config.num_train_timesteps)
        for original in range(k, total + 1):  # LCM's default walk picks K of `original` even steps
            lcm.set_timesteps(k, original_inference_steps=original)
            if lcm.timesteps.tolist() == anchors:
                cfg = {**base, "original_inference_steps": original}
                return StockSampler("LCMScheduler", cfg, anchors, "timestep", anchors)
        lcm.set_timesteps(k)
        walk = lcm.timesteps.tolist()
        deviation = float(max(abs(a - b) for a, b in zip(walk, anchors, strict=True)))
        return StockSampler(
            "LCMScheduler", base, anchors, "timestep", walk, {"timesteps": anchors}, deviation
        )
    cfg = {
        **_own(DDIMScheduler, config),
        "set_alpha_to_one": True,
        "clip_sample": False,
        "thresholding": False,
    }
    total = int(cfg.get("num_train_timesteps", 1000))
    stride = total // k  # DDIM steps from t to t - T // K and ends at ᾱ = 1 below 0
    expected = [a - stride for a in anchors[:-1]] == anchors[1:] and anchors[-1] < stride
    if expected:
        for spacing, offset in (("trailing", 0), *(("leading", o) for o in range(stride))):
            candidate = {**cfg, "timestep_spacing": spacing, "steps_offset": offset}
            ddim = DDIMScheduler.from_config(candidate)
            ddim.set_timesteps(k)
            if ddim.timesteps.tolist() == anchors:
                return StockSampler("DDIMScheduler", candidate, anchors, "timestep", anchors)
    raise ValueError(
        f"--sampler euler: DDIMScheduler walks {k} timesteps {stride} apart ending below {stride}, "
        f"and the student's anchors {anchors} are not such a walk; export with --sampler renoise "
        "(LCMScheduler takes any anchors)"
    )


def _inverse_shift(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """The pre-shift values that FlowMatchEulerDiscreteScheduler's static ``shift`` maps to ``sigmas``."""
    return sigmas / (shift - (shift - 1.0) * sigmas)


def flow_sampler(
    config: dict[str, Any],
    sigmas: list[float],
    mode: Mode,
    pipeline_kwargs: Callable[[int], dict[str, Any]],
) -> StockSampler:
    """FlowMatchEulerDiscreteScheduler walking ``sigmas``; ``pipeline_kwargs(K)`` is what the stock
    pipeline passes to ``set_timesteps`` besides the step count (FLUX: its own σ grid and μ)."""
    k = len(sigmas)
    # the stretch to a terminal σ pins the walk's last step to the last anchor whatever the grid the
    # pipeline starts from (SD 3 ends its default grid near σ = 0), and leaves the inverse-shifted
    # anchors of an exact call unchanged (their last one already shifts onto it)
    terminal = float(sigmas[-1]) if k > 1 and sigmas[-1] < 1.0 else None
    base = {
        **_own(FlowMatchEulerDiscreteScheduler, config),
        **FLOW_OVERRIDES,
        "shift_terminal": terminal,
        "stochastic_sampling": mode == "renoise",
    }
    target = np.asarray(sigmas, dtype=np.float64)

    def walk(shift: float, **call: Any) -> np.ndarray:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config({**base, "shift": shift})
        scheduler.set_timesteps(k, **{**pipeline_kwargs(k), **call})
        return scheduler.sigmas[:k].double().numpy()

    def error(log_shift: float) -> float:
        return float(np.abs(walk(math.exp(log_shift)) - target).max())

    # the error is not unimodal in the shift (SD 3's walk ends at the table's smallest σ): a coarse
    # grid finds the basin, a bounded search refines it
    grid = np.linspace(*LOG_SHIFT_BOUNDS, LOG_SHIFT_GRID)
    best = int(np.argmin([error(x) for x in grid]))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    fit = minimize_scalar(error, bounds=(lo, hi), method="bounded", options={"xatol": 1e-12})
    shift = float(math.exp(fit.x))
    default = walk(shift)
    deviation = float(np.abs(default - target).max())
    cfg = {**base, "shift": shift}
    if deviation <= SIGMA_TOLERANCE:
        name = FlowMatchEulerDiscreteScheduler.__name__
        return StockSampler(name, cfg, sigmas, "sigma", default.tolist(), deviation=deviation)
    call = {"sigmas": _inverse_shift(target, shift).tolist()}
    exact = np.abs(walk(shift, **call) - target).max()
    if exact > SIGMA_TOLERANCE:  # not expected: the inverse of the static shift is exact up to rounding
        raise ValueError(f"the flow scheduler cannot walk the anchors {sigmas} (off by {exact:.2e})")
    return StockSampler(
        FlowMatchEulerDiscreteScheduler.__name__, cfg, sigmas, "sigma", default.tolist(), call, deviation
    )


def stock_sampler(
    anchors: Anchors,
    scheduler_config: dict[str, Any],
    mode: Mode,
    pipeline_kwargs: Callable[[int], dict[str, Any]],
) -> StockSampler:
    """The stock scheduler for ``anchors`` of either noise family (the family's kind, not its name)."""
    if anchors.kind == "ddpm":
        return ddpm_sampler(scheduler_config, [int(t) for t in anchors.timesteps], mode)
    return flow_sampler(scheduler_config, [float(s) for s in anchors.sigmas], mode, pipeline_kwargs)
