"""Every random number of one training iteration, drawn up front for the global batch.

The draws come from a generator seeded by (run seed, iteration), and each rank takes its slice.
Two consequences: a resumed run needs no RNG state to continue bit for bit, and a run gives the
same result on any number of ranks (per-sample randomness), which is what the DDP test checks.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from senseflow.config.schema import MethodConfig
from senseflow.core.parameterisation import Parameterisation
from senseflow.method import draw_guidance, sample_levels, sample_t_mid


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

    def slice(self, start: int, stop: int) -> StepDraws:
        """This rank's part (simulation noise is sliced along its batch axis, 1)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                out[f.name] = None
            elif f.name == "simulation_noise":
                out[f.name] = v[:, start:stop]
            else:
                out[f.name] = v[start:stop]
        return StepDraws(**out)


def step_generator(seed: int, iteration: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + iteration)


def _per_group(values: Tensor, group: int) -> Tensor:
    """Repeat each of ``G / group`` draws ``group`` times (one draw per rank, as the official code)."""
    return values[::group].repeat_interleave(group)


def draw_step(
    method: MethodConfig,
    param: Parameterisation,
    anchor_levels: Tensor,
    sample_shape: tuple[int, ...],
    global_batch: int,
    per_rank_batch: int,
    seed: int,
    iteration: int,
) -> StepDraws:
    g = step_generator(seed, iteration)
    G, K = global_batch, anchor_levels.shape[0]
    group = per_rank_batch if method.randomness == "per_rank" else 1
    anchor_index = _per_group(torch.randint(0, K, (G,), generator=g), group)
    simulate = _per_group(torch.rand(G, generator=g) < method.backward_sim_prob, group)
    input_noise = torch.randn((G, *sample_shape), generator=g)
    simulation_noise = torch.randn((max(K - 1, 1), G, *sample_shape), generator=g)
    dmd_level = sample_levels(method.dmd.timestep_dist, G, param, generator=g)
    dmd_noise = torch.randn((G, *sample_shape), generator=g)
    dmd_guidance = draw_guidance(method.dmd.teacher_guidance, G, generator=g)
    isg_mid_grid = isg_guidance = None
    if method.isg.weight > 0:
        levels = torch.cat([anchor_levels, param.clean_level(1)])
        isg_mid_grid = sample_t_mid(
            levels[anchor_index], levels[anchor_index + 1], method.isg.margin, param, generator=g
        )
        isg_mid_grid = _per_group(isg_mid_grid, group)
        isg_guidance = draw_guidance(method.isg.teacher_guidance, G, generator=g)
    fake_level = sample_levels(method.fake.timestep_dist, G, param, generator=g)
    fake_noise = torch.randn((G, *sample_shape), generator=g)
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
    )
