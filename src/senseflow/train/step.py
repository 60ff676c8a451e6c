"""The SenseFlow objectives of one iteration (spec §2-8), apart from the loop.

:class:`SenseFlowStep` turns one iteration's draws and batch into losses: the generator's input
(backward simulation or forward-noised data), the generator's objective (DMD + adversarial + ISG),
the fake score's denoising loss and the discriminator's loss. Networks enter as callables
(:class:`NetworkCalls`), so the step knows nothing of devices, precision, wrappers or optimisers;
the loop (:mod:`senseflow.train.trainer`) owns backward, updates, IDA, checkpoints and logging.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from senseflow.config.method import MethodConfig
from senseflow.core.parameterisation import Parameterisation
from senseflow.method import (
    GAN_LOSSES,
    as_x0_fn,
    backward_simulate,
    diffaug,
    dmd_loss,
    fake_score_loss,
    isg_loss,
    isg_targets,
    isg_x0_targets,
    segment_ends,
    time_weight,
)
from senseflow.models.batch import Conditioning
from senseflow.models.discriminators import Discriminator
from senseflow.train.draws import DiscDraws, StepDraws

NetCall = Callable[[Tensor, Tensor, Conditioning], Tensor]  # (x, level, cond) -> raw output, float32
GuidedCall = Callable[[Tensor, Tensor, Conditioning, Tensor], Tensor]  # + per-sample guidance
DiscCall = Callable[..., Tensor]  # (x, cond[, level, noise]) -> logits, float32


@dataclass
class NetworkCalls:
    """The networks as the step calls them. ``*_train`` are the calls whose backward synchronises
    gradients across ranks (DDP); the plain ones serve no-grad passes and terms whose parameter
    gradients are discarded."""

    generator: NetCall
    generator_train: NetCall
    fake_score: NetCall
    fake_score_train: NetCall
    teacher: GuidedCall
    decode: Callable[[Tensor], Tensor]
    discriminator: DiscCall | None = None
    discriminator_train: DiscCall | None = None


def grad_ratio(term: Tensor, reference: Tensor, wrt: Tensor) -> float:
    """``|d term / d wrt| / |d reference / d wrt|`` (Frobenius norms): how hard a loss term pulls on
    G's output relative to another (ISG against DMD). Only the elementwise graph between the losses
    and ``wrt`` is traversed, so no parameter gradient is touched; NaN when ``wrt`` has no graph."""
    if not wrt.requires_grad:
        return float("nan")
    (g_term,) = torch.autograd.grad(term, wrt, retain_graph=True, allow_unused=True)
    (g_ref,) = torch.autograd.grad(reference, wrt, retain_graph=True, allow_unused=True)
    if g_term is None or g_ref is None:
        return float("nan")
    ref = g_ref.float().norm()
    return float("nan") if ref == 0 else (g_term.float().norm() / ref).item()


class SenseFlowStep:
    def __init__(
        self,
        method: MethodConfig,
        param: Parameterisation,
        anchor_levels: Tensor,
        nets: NetworkCalls,
        discriminator: Discriminator | None = None,
    ):
        self.m, self.param, self.nets, self.disc = method, param, nets, discriminator
        self.anchor_levels = anchor_levels  # a_0 .. a_{K-1}
        # a_0 .. a_{K-1} and the end of the last segment (clean, or the grid's first entry)
        self.levels = segment_ends(anchor_levels, param, method.isg.last_segment_end)
        self.noisiest = param.level_from_grid(torch.tensor(param.grid_max)).to(anchor_levels.device)
        if discriminator is not None:
            if discriminator.loss not in GAN_LOSSES:
                raise ValueError(
                    f"{type(discriminator).__name__} declares loss {discriminator.loss!r}; "
                    f"expected one of {', '.join(GAN_LOSSES)}"
                )
            self.g_loss, self.d_loss = GAN_LOSSES[discriminator.loss]

    def generator_output(
        self, x_in: Tensor, level_j: Tensor, cond: Conditioning, train: bool
    ) -> tuple[Tensor, Tensor]:
        """G's raw output at its input and the x0 it implies; through the call whose backward
        synchronises gradients on a generator turn (``train``), without grad otherwise."""
        call = self.nets.generator_train if train else self.nets.generator
        with torch.set_grad_enabled(train):
            out = call(x_in, level_j, cond)
            return out, self.param.x0_from_output(x_in, out, level_j)

    def generator_input(
        self, x_real: Tensor, d: StepDraws, cond: Conditioning, rollout_steps: int | None = None
    ) -> Tensor:
        """G's input: backward simulation or forward-noised data per sample.

        ``rollout_steps``: generator calls of the simulation, from the *global* batch's draws so every
        rank makes the same calls (FSDP2 gathers weights in each); default: what ``d`` needs.
        """
        p = self.param
        level = self.levels[d.anchor_index]
        noised = p.add_noise(x_real, d.input_noise, level)
        if self.m.first_anchor_input == "noise":  # the official pure-noise mask at the noisiest level
            pure = (level == self.noisiest).view(-1, *[1] * (x_real.ndim - 1))
            noised = torch.where(pure, d.input_noise, noised)
        rollout_steps = d.rollout_steps() if rollout_steps is None else rollout_steps
        if rollout_steps == 0:
            return noised
        steps = iter(d.simulation_noise)
        generator = self.nets.generator
        simulated = backward_simulate(
            as_x0_fn(lambda x, level: generator(x, level, cond), p),
            d.input_noise,
            self.anchor_levels,
            torch.where(d.simulate, d.anchor_index, 0),
            p,
            generator=lambda like: next(steps).to(like),
            steps=rollout_steps,
        )
        return torch.where(d.simulate.view(-1, *[1] * (x_real.ndim - 1)), simulated, noised)

    def gan_weights(self, level_j: Tensor) -> Tensor:
        return time_weight(self.m.gan.time_weight or "constant", level_j, self.param)

    def discriminate(
        self, call: DiscCall, x: Tensor, cond: Conditioning, draws: DiscDraws | None, groups: int = 1
    ) -> Tensor:
        """D's logits on ``x`` (in D's input space) after DiffAugment, with D's noise if it is noised.
        ``groups`` > 1: ``x`` holds that many batches (real, fake) that a D with ``separate_calls``
        judges in separate passes."""
        if draws is not None and draws.aug is not None:
            x = diffaug(x, draws.aug)
        kwargs = {"groups": groups} if groups > 1 and getattr(self.disc, "separate_calls", False) else {}
        if self.disc.noised:
            if draws is None or draws.level is None:
                raise ValueError("a noised discriminator needs its drawn levels and noise")
            return call(x, cond, draws.level, draws.noise, **kwargs)
        return call(x, cond, **kwargs)

    def generator_loss(
        self,
        x_in: Tensor,
        out_in: Tensor,
        x0: Tensor,
        d: StepDraws,
        cond: Conditioning,
        disc_cond: Conditioning | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """DMD + w_gan · adversarial + w_isg · ISG on G's output ``x0`` (and its raw output ``out_in``);
        ``disc_cond``: D's condition when it differs from the networks' (the VFM's text and reference)."""
        m, p, nets = self.m, self.param, self.nets
        x_t = p.add_noise(x0, d.dmd_noise, d.dmd_level).detach()
        with torch.no_grad():
            x0_fake = p.x0_from_output(x_t, nets.fake_score(x_t, d.dmd_level, cond), d.dmd_level)
            x0_real = p.x0_from_output(x_t, nets.teacher(x_t, d.dmd_level, cond, d.dmd_guidance), d.dmd_level)
        dmd = dmd_loss(x0, x0_fake, x0_real)
        total = dmd.loss
        logs = {"loss_dmd": dmd.loss.item(), **{f"dmd_{k}": v.item() for k, v in dmd.stats.items()}}
        level_j, level_next = self.levels[d.anchor_index], self.levels[d.anchor_index + 1]
        if self.disc is not None and m.gan.weight:
            # The unwrapped discriminator: its parameter gradients from this loss are discarded (zeroed
            # before D's update), unless gan.official_grad_leak keeps them for it.
            x_d = nets.decode(x0) if self.disc.input_space == "pixels" else x0
            logits = self.discriminate(
                nets.discriminator, x_d, cond if disc_cond is None else disc_cond, d.disc_gen
            )
            adv = self.g_loss(logits, self.gan_weights(level_j))
            total = total + m.gan.weight * adv
            logs["loss_adv"] = adv.item()
        if m.isg.weight > 0:
            guidance = d.isg_guidance
            teacher = lambda x, level: nets.teacher(x, level, cond, guidance)  # noqa: E731
            if p.kind == "ddpm" and m.isg.sdxl_mode == "official":
                t = isg_x0_targets(x_in, level_j, level_next, teacher, out_in, p)
            else:
                student = lambda x, level: nets.generator(x, level, cond)  # noqa: E731
                level_mid = p.level_from_grid(d.isg_mid_grid)
                t = isg_targets(x_in, level_j, level_next, level_mid, teacher, student, out_in, p)
            isg = isg_loss(t.x_direct, t.x_target, m.isg.loss, m.isg.charbonnier_eps)
            total = total + m.isg.weight * isg
            logs["loss_isg"] = isg.item()
            logs["isg_abs_diff"] = (t.x_direct.detach() - t.x_target).abs().mean().item()
            logs["isg_grad_ratio"] = grad_ratio(m.isg.weight * isg, dmd.loss, out_in)
        return total, logs

    def fake_loss(self, x0: Tensor, d: StepDraws, cond: Conditioning) -> Tensor:
        """The fake score's denoising loss on G's (detached) samples."""
        p = self.param
        x_t = p.add_noise(x0, d.fake_noise, d.fake_level)
        return fake_score_loss(
            p, self.nets.fake_score_train(x_t, d.fake_level, cond), x0, d.fake_noise, d.fake_level
        )

    def discriminator_loss(
        self, real: Tensor, fake: Tensor, cond: Conditioning, level_j: Tensor, d: StepDraws
    ) -> tuple[Tensor, dict[str, float]]:
        """D's loss on ``real`` and sg(``fake``), both in D's input space (RGB or model space)."""
        draws = None if d.disc_real is None else d.disc_real.cat(d.disc_fake)
        # One forward over real and fake together: DDP pairs each forward with one backward.
        logits = self.discriminate(
            self.nets.discriminator_train, torch.cat([real, fake]), cond.cat(cond), draws, groups=2
        )
        real_logits, fake_logits = logits.chunk(2)
        loss = self.m.gan.disc_weight * self.d_loss(real_logits, fake_logits, self.gan_weights(level_j))
        return loss, {
            "loss_disc": loss.item(),
            "disc_real_acc": (real_logits > 0).float().mean().item(),
            "disc_fake_acc": (fake_logits < 0).float().mean().item(),
        }
