"""Every random number of one training iteration, drawn up front for the global batch.

The draws come from a generator seeded by (run seed, iteration), and each rank takes its slice.
Two consequences: a resumed run needs no RNG state to continue bit for bit, and with per-sample
randomness a run gives the same result on any number of ranks, which is what the DDP test checks.
``method.randomness`` then narrows some draws to the official trainers' scope (see ``_Scope``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from senseflow.config.schema import MethodConfig
from senseflow.core.parameterisation import Parameterisation
from senseflow.method import (
    DiffAugParams,
    draw_diffaug_params,
    draw_guidance,
    sample_levels,
    sample_t_mid,
    segment_ends,
)


@dataclass
class DiscDraws:
    """Randomness of one discriminator pass (real, fake or the generator's): per sample, [G, ...]."""

    aug: DiffAugParams | None  # DiffAugment parameters (None without a policy)
    level: Tensor | None  # noise level of a noised discriminator (DMD2 head; None otherwise)
    noise: Tensor | None  # [G, *D input shape]

    def slice(self, start: int, stop: int) -> DiscDraws:
        aug = None if self.aug is None else {k: v[start:stop] for k, v in self.aug.items()}
        return DiscDraws(
            aug=aug,
            level=None if self.level is None else self.level[start:stop],
            noise=None if self.noise is None else self.noise[start:stop],
        )

    def to(self, device: torch.device) -> DiscDraws:
        return DiscDraws(
            aug=None if self.aug is None else {k: v.to(device) for k, v in self.aug.items()},
            level=None if self.level is None else self.level.to(device),
            noise=None if self.noise is None else self.noise.to(device),
        )

    def cat(self, other: DiscDraws) -> DiscDraws:
        """Both passes' draws for one batched forward (``self`` first)."""
        aug = None if self.aug is None else {k: torch.cat([v, other.aug[k]]) for k, v in self.aug.items()}
        return DiscDraws(
            aug=aug,
            level=None if self.level is None else torch.cat([self.level, other.level]),
            noise=None if self.noise is None else torch.cat([self.noise, other.noise]),
        )


@dataclass
class StepDraws:
    anchor_index: Tensor  # [G] long: which anchor a_j each sample trains at
    simulate: Tensor  # [G] bool: backward simulation (True) or forward-noised real data
    input_noise: Tensor  # [G, ...]: noise for x_in (start of the simulation, or forward noising)
    simulation_noise: Tensor  # [K-1, G, ...]: fresh noise of each backward-simulation step
    dmd_level: Tensor  # [G]
    dmd_noise: Tensor  # [G, ...]
    dmd_guidance: Tensor  # [G]
    isg_mid_grid: Tensor | None  # [G] long grid position of t_mid (None without ISG)
    isg_guidance: Tensor | None  # [G]
    fake_level: Tensor  # [G]
    fake_noise: Tensor  # [G, ...]
    # Discriminator passes (None without discriminator randomness): D step on real and on fake, and
    # the generator's adversarial term; drawn after everything else so the draws above never move.
    disc_real: DiscDraws | None = None
    disc_fake: DiscDraws | None = None
    disc_gen: DiscDraws | None = None

    def slice(self, start: int, stop: int) -> StepDraws:
        """This rank's part (simulation noise is sliced along its batch axis, 1)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                out[f.name] = None
            elif isinstance(v, DiscDraws):
                out[f.name] = v.slice(start, stop)
            elif f.name == "simulation_noise":
                out[f.name] = v[:, start:stop]
            else:
                out[f.name] = v[start:stop]
        return StepDraws(**out)

    def rollout_steps(self) -> int:
        """Generator calls the backward simulation of these draws needs (the deepest simulated anchor)."""
        return int(torch.where(self.simulate, self.anchor_index, 0).max())

    def to(self, device: torch.device) -> StepDraws:
        """The same draws on ``device`` (they are always drawn on the CPU, so every device agrees)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = None if v is None else v.to(device)
        return StepDraws(**out)


def step_generator(seed: int, iteration: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + iteration)


@dataclass(frozen=True)
class _Scope:
    """How far one draw reaches under ``method.randomness`` (``G`` samples, ``B`` per rank).

    ``choice`` narrows the iteration's discrete choices (anchor, backward-simulation switch, t_mid):
    one per sample, one per rank, or one for the whole batch (global). ``level`` narrows the DMD and
    fake-score levels: under global, the first rank's ``B`` draws repeat on every rank, as the
    official trainers draw them from one generator seeded alike on every rank.
    """

    kind: str
    per_rank_batch: int

    def choice(self, values: Tensor) -> Tensor:
        group = {"global": values.shape[0], "per_rank": self.per_rank_batch}.get(self.kind, 1)
        return values[::group].repeat_interleave(group)

    def level(self, values: Tensor) -> Tensor:
        if self.kind != "global":
            return values
        B = self.per_rank_batch
        return values[:B].repeat(values.shape[0] // B)


def draw_step(
    method: MethodConfig,
    param: Parameterisation,
    anchor_levels: Tensor,
    sample_shape: tuple[int, ...],
    global_batch: int,
    per_rank_batch: int,
    seed: int,
    iteration: int,
    *,
    disc_shape: Sequence[int] | None = None,
    disc_noised: bool = False,
) -> StepDraws:
    """All draws of ``iteration`` for the global batch.

    ``disc_shape`` is the shape of one discriminator input (pixels or model space, per the
    discriminator's ``input_space``); with it, each of the three discriminator passes gets its own
    per-sample DiffAugment parameters (``method.gan.diffaug``) and, for a noised discriminator
    (``disc_noised``, the DMD2 head), a level uniform over the whole grid and a noise.
    """
    g = step_generator(seed, iteration)
    anchor_levels = anchor_levels.cpu()  # draws are made on the CPU (the generator is a CPU one)
    G, K = global_batch, anchor_levels.shape[0]
    scope = _Scope(method.randomness, per_rank_batch)
    anchor_index = scope.choice(torch.randint(0, K, (G,), generator=g))
    simulate = scope.choice(torch.rand(G, generator=g) < method.backward_sim_prob)
    input_noise = torch.randn((G, *sample_shape), generator=g)
    simulation_noise = torch.randn((max(K - 1, 1), G, *sample_shape), generator=g)
    dmd_level = scope.level(sample_levels(method.dmd.timestep_dist, G, param, generator=g))
    dmd_noise = torch.randn((G, *sample_shape), generator=g)
    dmd_guidance = draw_guidance(method.dmd.teacher_guidance, G, generator=g)
    isg_mid_grid = isg_guidance = None
    if method.isg.weight > 0:
        levels = segment_ends(anchor_levels, param, method.isg.last_segment_end)
        isg_mid_grid = sample_t_mid(
            levels[anchor_index], levels[anchor_index + 1], method.isg.margin, param, generator=g
        )
        isg_mid_grid = scope.choice(isg_mid_grid)
        isg_guidance = draw_guidance(method.isg.teacher_guidance, G, generator=g)
    fake_level = scope.level(sample_levels(method.fake.timestep_dist, G, param, generator=g))
    fake_noise = torch.randn((G, *sample_shape), generator=g)
    disc = {}
    if disc_shape is not None and (method.gan.diffaug or disc_noised):
        for role in ("real", "fake", "gen"):
            aug = None
            if method.gan.diffaug:
                gan = method.gan
                aug = draw_diffaug_params(
                    gan.diffaug, G, disc_shape, g, gan.diffaug_translation, gan.diffaug_cutout
                )
            level = noise = None
            if disc_noised:
                level = param.level_from_grid(torch.randint(0, param.grid_max + 1, (G,), generator=g))
                noise = torch.randn((G, *disc_shape), generator=g)
            disc[f"disc_{role}"] = DiscDraws(aug=aug, level=level, noise=noise)
    return StepDraws(
        anchor_index=anchor_index,
        simulate=simulate,
        input_noise=input_noise,
        simulation_noise=simulation_noise,
        dmd_level=dmd_level,
        dmd_noise=dmd_noise,
        dmd_guidance=dmd_guidance,
        isg_mid_grid=isg_mid_grid,
        isg_guidance=isg_guidance,
        fake_level=fake_level,
        fake_noise=fake_noise,
        **disc,
    )
