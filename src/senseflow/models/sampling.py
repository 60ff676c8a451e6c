"""The samplers of every family: the teacher's N-step sampler with guidance (on the adapter's levels,
or with the folder's own diffusers scheduler, step for step as the stock pipeline), and the
student's few-step chain. ``teacher_sample`` and ``student_images`` decode to RGB in [-1, 1].

Noise is drawn per sample from its own seed, so an image depends only on (prompt, seed) and not
on which other prompts share its batch: a grid, an evaluation and a resumed job agree pixel for
pixel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from senseflow.core.sampling import seeded_noise
from senseflow.devices import module_device
from senseflow.method import student_sample
from senseflow.models.adapter import FamilyAdapter
from senseflow.models.batch import Conditioning


def _check(prompts: Sequence[str], seeds: Sequence[int]) -> None:
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")


@torch.no_grad()
def teacher_sample(
    adapter: FamilyAdapter,
    net: nn.Module,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    guidance: float,
    resolution: int,
    batch_size: int = 64,
    progress: bool = False,
) -> Tensor:
    """The teacher's own sampler with guidance ``guidance``; decoded images, NCHW.

    A family with a diffusers scheduler samples exactly as its stock pipeline (:func:`scheduler_sample`,
    from the same per-sample noise); otherwise flow Euler / DDIM over ``adapter.sampling_levels(steps)``
    (guidance 1 = the plain conditional prediction, one pass).
    """
    _check(prompts, seeds)
    device = module_device(net)
    shape = adapter.sample_shape(resolution)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        x = seeded_noise(shape, seeds[start : start + batch_size]).to(device)
        cond = adapter.encode_prompts(chunk)
        if adapter.has_scheduler:
            final = scheduler_sample(adapter, net, cond, x, steps, guidance, progress)
            out.append(adapter.decode(final).float())
            continue
        levels = adapter.sampling_levels(steps).to(device)
        scale = torch.full((len(chunk),), float(guidance), device=device)
        for i in tqdm(range(steps), desc="teacher", disable=not progress, leave=False):
            level, nxt = levels[i].expand(len(chunk)), levels[i + 1].expand(len(chunk))
            if guidance == 1.0:
                output = adapter.forward(net, x, level, cond)
            else:
                output = adapter.guided_predict(net, x, level, cond, scale)
            x = adapter.param.step_to(x, output, level, nxt)
        out.append(adapter.decode(x).float())
    return torch.cat(out).clamp(-1, 1)


@torch.no_grad()
def student_images(
    adapter: FamilyAdapter,
    generator: nn.Module,
    anchor_levels: Tensor,
    resolution: int,
    prompts: Sequence[str],
    seeds: Sequence[int],
    mode: str,
    *,
    cond: Conditioning | None = None,
    stage: Callable[[str], AbstractContextManager[Any]] | None = None,
) -> Tensor:
    """Decoded student images in [-1, 1] (NCHW), one per (prompt, seed), from the few-step chain.

    Each sample owns one random stream seeded by its seed: the initial noise first, then the
    fresh noise of every renoising step, so a batch's composition never changes an image.

    ``cond``: the prompts' conditioning when the caller has it already (read from a text cache);
    None encodes them with ``adapter.encode_prompts``. ``stage(name)``: a context manager entered
    around each stage ("text", "denoise": the noise and the K network calls, "decode"), so a caller
    can time them without this function knowing how.
    """
    _check(prompts, seeds)
    timed = stage if stage is not None else (lambda _name: nullcontext())
    if cond is None:
        with timed("text"):
            cond = adapter.encode_prompts(list(prompts))
    streams = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def fresh(like: Tensor) -> Tensor:
        return torch.stack([torch.randn(tuple(like.shape[1:]), generator=g) for g in streams]).to(like)

    device = module_device(generator)
    fn = lambda x, level: adapter.forward(generator, x, level, cond)  # noqa: E731
    with timed("denoise"):
        noise = fresh(torch.empty(len(seeds), *adapter.sample_shape(resolution), device=device))
        x0 = student_sample(fn, noise, anchor_levels.to(device), adapter.param, mode, generator=fresh)
    with timed("decode"):
        return adapter.decode(x0).float().clamp(-1, 1)


@torch.no_grad()
def scheduler_sample(
    adapter: FamilyAdapter,
    net: nn.Module,
    cond: Conditioning,
    latents: Tensor,
    steps: int,
    guidance: float,
    progress: bool = False,
) -> Tensor:
    """The teacher's sampler as the family's stock pipeline runs it: the folder's scheduler
    (``set_timesteps`` with the pipeline's arguments, ``init_noise_sigma``, ``scale_model_input``,
    ``step``) around the adapter's network call, the one training uses. ``latents`` are what a user
    passes as ``latents=`` to the pipeline, in the model space's unpacked layout; returns the final
    latents before decoding.

    Guidance as the pipelines apply it: a guidance input for embedding families, CFG when
    ``guidance > 1`` for CFG families (one batched pass over both branches), none for a folder whose
    pipeline does not guide (``guidance_kind`` "none", e.g. a FLUX without guidance embedding).
    """
    scheduler = adapter.load_scheduler()
    scheduler.set_timesteps(
        steps, device=latents.device, **adapter.timesteps_kwargs(steps, tuple(latents.shape))
    )
    x = latents * getattr(scheduler, "init_noise_sigma", 1.0)  # flow schedulers have neither this
    n = len(x)
    scale = torch.full((n,), float(guidance), device=x.device)
    for t in tqdm(scheduler.timesteps, desc="teacher", disable=not progress, leave=False):
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        level = adapter.level_of_timestep(t.expand(n))
        if adapter.guidance_kind == "embedding":
            out = adapter.forward(net, x_in, level, cond, guidance=scale)
        elif adapter.guidance_kind == "cfg" and guidance > 1:
            out = adapter.guided_predict(net, x_in, level, cond, scale)
        else:
            out = adapter.forward(net, x_in, level, cond)
        x = scheduler.step(out.to(x.dtype), t, x, return_dict=False)[0]
    return x
