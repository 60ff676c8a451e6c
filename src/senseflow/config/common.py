"""Building blocks shared by the recipe sections.

The strict base section class, local-path helpers, teacher guidance ranges, the timestep distributions
(:data:`TimestepDist`) and the student's anchor timesteps (:class:`AnchorsConfig`). Section numbers
(``§n``) refer to the SenseFlow method spec.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from senseflow.config.errors import field_error

__all__ = [
    "ANCHOR_UNITS",
    "DEVICE_CHOICES",
    "AnchorsConfig",
    "Device",
    "FiniteFloat",
    "GuidanceRange",
    "LogitNormalDist",
    "NonNegativeFloat",
    "NonNegativeInt",
    "PositiveFloat",
    "PositiveInt",
    "Probability",
    "Seed",
    "StrictModel",
    "TimestepDist",
    "UniformDist",
    "UniformIndexDist",
    "UnitInterval",
    "check_device",
    "looks_like_local_path",
]


# --------------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------------
#
# Every number of a recipe has one of the types below: a boolean is refused where a number is expected
# (pydantic would read ``true`` as 1), NaN and +-inf are refused (here and, for any plain ``float``, by
# ``allow_inf_nan=False`` on the base models), and the bound is part of the type, so the error
# formatter can say "must be a finite number > 0, got inf" from the schema alone. Strings that spell
# a number (``"1e-5"``) are still read as that number.


def _refuse_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise PydanticCustomError("number_bool", "expected a number, got a boolean")
    return value


_NOT_BOOL = BeforeValidator(_refuse_bool)
_FINITE = Field(allow_inf_nan=False)

FiniteFloat = Annotated[float, _NOT_BOOL, _FINITE]
"""Any finite real number; for fields whose sign is meaningful (a mean, an offset)."""
PositiveFloat = Annotated[float, _NOT_BOOL, _FINITE, Field(gt=0)]
"""A finite number > 0: learning rates, epsilons, scales, timeouts."""
NonNegativeFloat = Annotated[float, _NOT_BOOL, _FINITE, Field(ge=0)]
"""A finite number >= 0: loss weights, guidance strengths, thresholds (0 switches the term off)."""
Probability = Annotated[float, _NOT_BOOL, _FINITE, Field(ge=0, le=1)]
"""A probability, interpolation weight or fraction in [0, 1]."""
UnitInterval = Annotated[float, _NOT_BOOL, _FINITE, Field(ge=0, lt=1)]
"""A number in [0, 1): Adam betas, dropout."""
PositiveInt = Annotated[int, _NOT_BOOL, Field(ge=1)]
"""An integer >= 1: counts, sizes, periods, iterations."""
NonNegativeInt = Annotated[int, _NOT_BOOL, Field(ge=0)]
"""An integer >= 0: worker counts, warm-up lengths, grid indices."""
Seed = Annotated[int, _NOT_BOOL, Field(ge=0, le=2**63 - 1)]
"""A random seed: 0 .. 2**63 - 1 (what torch's and numpy's generators accept)."""


# --------------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------------

#: The device strings :func:`senseflow.devices.resolve_device` accepts (checked here without torch).
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def check_device(value: str) -> str:
    """``value`` when it is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; else ``ValueError``."""
    if not _DEVICE.fullmatch(value):
        raise ValueError(f"expected {DEVICE_CHOICES}, got {value!r}")
    return value


Device = Annotated[str, AfterValidator(check_device)]
"""A device name as :func:`senseflow.devices.resolve_device` takes it: auto, cpu, cuda or cuda:N."""


# --------------------------------------------------------------------------------------------------
# Base classes
# --------------------------------------------------------------------------------------------------


class StrictModel(BaseModel):
    """Base of every recipe model: unknown keys refused, NaN and +-inf refused in every float."""

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


class _Section(StrictModel):
    model_config = ConfigDict(validate_assignment=True)


# --------------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------------


def looks_like_local_path(value: str) -> bool:
    """True for values meant as local paths: absolute, or starting with '.' or '~'."""
    return value.startswith((".", "~")) or os.path.isabs(value)


def _check_existing_path(value: str, what: str) -> str:
    if not os.path.exists(os.path.expanduser(value)):
        resolved = os.path.abspath(os.path.expanduser(value))
        raise ValueError(f"{what} path {value!r} does not exist (resolved to '{resolved}')")
    return value


# --------------------------------------------------------------------------------------------------
# Small building blocks
# --------------------------------------------------------------------------------------------------


def _spells_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class GuidanceRange(_Section):
    """Teacher guidance strength drawn uniformly from [min, max] on every call (fixed when min == max).

    A bare number in YAML (``teacher_guidance: 8.0``) means ``{min: 8.0, max: 8.0}``.
    """

    min: NonNegativeFloat = Field(description="Lower end of the uniform guidance draw.")
    max: NonNegativeFloat = Field(description="Upper end of the uniform guidance draw (>= min).")

    @model_validator(mode="before")
    @classmethod
    def _scalar_shorthand(cls, data: Any) -> Any:
        if isinstance(data, str) and _spells_number(data):
            data = float(data)
        if (
            isinstance(data, (int, float))
            and not isinstance(data, bool)
            and math.isfinite(data)
            and data >= 0
        ):
            return {"min": data, "max": data}
        if isinstance(data, (bool, int, float, str)):  # one problem, not one for min and one for max
            raise ValueError(f"must be a finite number >= 0 or {{min, max}}, got {data!r}")
        if isinstance(data, (list, tuple)) and len(data) == 2:
            return {"min": data[0], "max": data[1]}
        return data

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.min > self.max:
            raise field_error("min", f"must be <= max, got min={self.min} > max={self.max}")
        return self

    @property
    def fixed(self) -> bool:
        """True when the guidance is a constant."""
        return self.min == self.max


class UniformIndexDist(_Section):
    """Uniform integer over [low, high] (inclusive) on the family's 1000-step grid.

    Grid: DDPM t for SDXL; index into the flipped, shifted 1000-entry flow sigma table for SD3.5;
    sigma*1000 for FLUX.
    """

    kind: Literal["uniform_index"] = Field(description="Discriminator: uniform integer grid index.")
    low: NonNegativeInt = Field(le=999, description="Smallest index drawn (inclusive), 0..999.")
    high: NonNegativeInt = Field(le=999, description="Largest index drawn (inclusive), 0..999, >= low.")

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.low > self.high:
            raise field_error("low", f"must be <= high, got low={self.low} > high={self.high}")
        return self


class UniformDist(_Section):
    """Uniform real value in [low, high] within [0, 1] (flow time or sigma)."""

    kind: Literal["uniform"] = Field(description="Discriminator: uniform real value.")
    low: Probability = Field(description="Lower end in [0, 1].")
    high: Probability = Field(description="Upper end in [0, 1], >= low.")

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.low > self.high:
            raise field_error("low", f"must be <= high, got low={self.low} > high={self.high}")
        return self


class LogitNormalDist(_Section):
    """sigma = sigmoid(N(mean, std)), as diffusers ``compute_density_for_timestep_sampling`` (§3, §4)."""

    kind: Literal["logit_normal"] = Field(description="Discriminator: logit-normal sigma.")
    mean: FiniteFloat = Field(
        default=0.0,
        description="Mean of the normal before the sigmoid (any sign); 0.0 in the code (§3, §4).",
    )
    std: PositiveFloat = Field(
        default=1.0, description="Std of the normal before the sigmoid (> 0); 1.0 in the code."
    )
    apply_shift: bool = Field(
        default=False,
        description=(
            "Pass the drawn sigma through the teacher's timestep shift. False: unshifted, as FLUX's DMD "
            "timesteps in the code; for the fake-score loss this is unknown (§12.4)."
        ),
    )


TimestepDist = Annotated[UniformIndexDist | UniformDist | LogitNormalDist, Field(discriminator="kind")]
"""Timestep distribution, selected by ``kind``: uniform_index | uniform | logit_normal."""


# --------------------------------------------------------------------------------------------------
# Anchors
# --------------------------------------------------------------------------------------------------

ANCHOR_UNITS: dict[str, str] = {
    "index": "integer index 0..999 into the 1000-entry flow sigma table",
    "t": "pre-shift flow time in (0, 1]",
    "sigma": "flow noise level sigma in (0, 1]",
    "ddpm_t": "DDPM integer timestep 0..999",
}


class AnchorsConfig(_Section):
    """The student's anchor timesteps a_0 > a_1 > ... (4 in every recipe, §7)."""

    values: list[FiniteFloat] = Field(
        min_length=1,
        description=(
            "Anchor values, strictly decreasing, in `units`. Recipes: SDXL t {999,749,499,249}; SD3.5 "
            "index {999,749,499,249}; FLUX sigma {1.0,0.904,0.759,0.512} (§7)."
        ),
    )
    units: Literal["index", "t", "sigma", "ddpm_t"] = Field(
        description=(
            "Units of `values`: index (into the 1000-entry flow sigma table), t (pre-shift flow time in "
            "(0,1]), sigma (flow noise level in (0,1]) or ddpm_t (DDPM timestep 0..999) (§7, §11)."
        )
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        values = self.values
        if self.units in ("index", "ddpm_t"):
            bad = [v for v in values if not float(v).is_integer() or not 0 <= v <= 999]
            if bad:
                raise field_error(
                    "values",
                    f"{_fmt(bad)} outside the range of units '{self.units}' "
                    f"(expected {ANCHOR_UNITS[self.units]})",
                )
            values = [int(v) for v in values]
            object.__setattr__(self, "values", values)  # ints for integer grids (no re-validation)
        else:
            bad = [v for v in values if not (0.0 < v <= 1.0) or math.isnan(v)]
            if bad:
                raise field_error(
                    "values",
                    f"{_fmt(bad)} outside the range of units '{self.units}' "
                    f"(expected {ANCHOR_UNITS[self.units]})",
                )
        for a, b in itertools.pairwise(values):
            if not a > b:
                raise field_error(
                    "values", f"expected strictly decreasing anchors (a_0 > a_1 > ...), got {_fmt(values)}"
                )
        return self

    @field_serializer("values")
    def _ser_values(self, values: list[float]) -> list[float | int]:
        return [int(v) if self.units in ("index", "ddpm_t") else float(v) for v in values]

    @property
    def steps(self) -> int:
        """Number of student steps (anchors)."""
        return len(self.values)

    def grid_values(self) -> list[int] | None:
        """Anchors on the integer 1000-step grid used by ISG margins (None for units 't')."""
        if self.units in ("index", "ddpm_t"):
            return [int(v) for v in self.values]
        if self.units == "sigma":
            return [round(v * 1000) for v in self.values]
        return None


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{int(v)}" if float(v).is_integer() else f"{v:g}" for v in values) + "]"
