"""senseflow.core.ddpm against diffusers' DDPM/DDIM/Euler schedulers and closed forms."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from senseflow.core import DDPMSchedule

SDXL = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def _data(seed: int = 0, shape: tuple[int, ...] = (3, 4, 5, 6)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize(
    "cfg", [SDXL, {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}], ids=["scaled", "lin"]
)
def test_alphas_cumprod_match_ddpm_scheduler(cfg: dict) -> None:
    ours = DDPMSchedule(**cfg).alphas_cumprod
    assert torch.equal(ours, DDPMScheduler(num_train_timesteps=1000, **cfg).alphas_cumprod)


def test_add_noise_and_velocity_match_ddpm_scheduler() -> None:
    ref, ours = DDPMScheduler(**SDXL), DDPMSchedule()
    x0, eps = _data(1)
    t = torch.tensor([0, 499, 999])
    torch.testing.assert_close(ours.add_noise(x0, eps, t), ref.add_noise(x0, eps, t), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.velocity(x0, eps, t), ref.get_velocity(x0, eps, t), rtol=0, atol=1e-6)


def test_ve_sigma_matches_euler_discrete_sigmas() -> None:
    ref = EulerDiscreteScheduler(**SDXL)  # sigmas at init: √((1-ᾱ)/ᾱ), decreasing, then a 0
    ours = DDPMSchedule().ve_sigma(torch.arange(1000))
    torch.testing.assert_close(ours.flip(0), ref.sigmas[:-1], rtol=1e-6, atol=0)
    # x_t / √ᾱ = x0 + σ_ve·ε, the variance-exploding view of the same point.
    x0, eps = _data(2)
    sched, t = DDPMSchedule(), 600
    scaled = sched.add_noise(x0, eps, t) / sched.alpha_bar(t).sqrt()
    torch.testing.assert_close(scaled, x0 + sched.ve_sigma(t) * eps, rtol=0, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_output_decoding_round_trip(prediction_type: str) -> None:
    sched = DDPMSchedule(prediction_type=prediction_type)
    x0, eps = _data(3)
    t = torch.tensor([10, 500, 999])
    x_t = sched.add_noise(x0, eps, t)
    out = sched.target(x0, eps, t)
    x0_hat, eps_hat = sched.x0_eps_from_output(x_t, out, t)
    # ε-prediction divides by √ᾱ ≈ 0.068 at t = 999, so allow for that amplification.
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-4)
    torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-5)
    torch.testing.assert_close(sched.x0_from_output(x_t, out, t), x0_hat)
    torch.testing.assert_close(sched.eps_from_output(x_t, out, t), eps_hat)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(
    ("spacing", "set_alpha_to_one"), [("leading", True), ("leading", False), ("trailing", True)]
)
def test_ddim_loop_matches_ddim_scheduler(prediction_type: str, spacing: str, set_alpha_to_one: bool) -> None:
    n = 4
    ref = DDIMScheduler(
        **SDXL,
        prediction_type=prediction_type,
        clip_sample=False,
        set_alpha_to_one=set_alpha_to_one,
        timestep_spacing=spacing,
    )
    ref.set_timesteps(n)
    # "trailing" visits exactly the SDXL student anchors; "leading" (the default) stops at 750.
    expected = [999, 749, 499, 249] if spacing == "trailing" else [750, 500, 250, 0]
    assert ref.timesteps.tolist() == expected
    sched = DDPMSchedule(prediction_type=prediction_type)
    x_ref, _ = _data(4)
    x_ours = x_ref.clone()
    stride = 1000 // n
    for t in ref.timesteps.tolist():
        out_ref = torch.tanh(x_ref) * (1 + t / 1000)  # any deterministic "network"
        x_ref = ref.step(out_ref, t, x_ref, eta=0.0).prev_sample
        out = torch.tanh(x_ours) * (1 + t / 1000)
        x0_hat, eps_hat = sched.x0_eps_from_output(x_ours, out, t)
        t_prev = t - stride
        if t_prev < 0:  # DDIM's final step goes to ᾱ = 1 (or to ᾱ_0 without set_alpha_to_one)
            t_prev = -1 if set_alpha_to_one else 0
        x_ours = sched.ddim_step(x_ours, x0_hat, eps_hat, t, t_prev)
    torch.testing.assert_close(x_ours, x_ref, rtol=0, atol=1e-4)


def test_ddim_to_minus_one_returns_x0_hat() -> None:
    sched = DDPMSchedule()
    x0, eps = _data(5)
    x_t = sched.add_noise(x0, eps, 249)
    assert torch.equal(sched.ddim_step(x_t, x0, eps, 249, -1), x0)
    torch.testing.assert_close(sched.ddim_step(x_t, x0, eps, 999, 249), x_t)


def test_spec_effective_sigmas_and_edges() -> None:
    sched = DDPMSchedule()
    got = sched.effective_sigma(torch.tensor([999, 749, 499, 249]))
    torch.testing.assert_close(got, torch.tensor([0.998, 0.971, 0.850, 0.570]), rtol=0, atol=1e-3)
    assert sched.alpha_bar(-1).item() == 1.0 and sched.effective_sigma(-1).item() == 0.0
    assert torch.equal(
        sched.alpha_bar(torch.tensor([-1, 0])), torch.stack([torch.tensor(1.0), sched.alphas_cumprod[0]])
    )


def test_invalid_inputs_raise() -> None:
    sched = DDPMSchedule()
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"\[-1, 999\]"):
        sched.alpha_bar(1000)
    with pytest.raises(TypeError, match="integers"):
        sched.alpha_bar(torch.tensor(0.5))
    with pytest.raises(ValueError, match="t_prev <= t"):
        sched.ddim_step(x, x, x, 249, 499)
    with pytest.raises(ValueError, match="beta_schedule"):
        DDPMSchedule(beta_schedule="cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prediction_type"):
        DDPMSchedule(prediction_type="sample")  # type: ignore[arg-type]
    assert DDPMSchedule() == DDPMSchedule()  # the tensor table is excluded from equality
