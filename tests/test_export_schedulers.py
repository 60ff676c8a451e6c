"""The stock scheduler configs of `senseflow export` walk the anchors they were made for, checked by
running the stock schedulers' own `set_timesteps` with what each pipeline passes."""

from __future__ import annotations

import numpy as np
import pytest
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler

from senseflow.export.schedulers import SIGMA_TOLERANCE, ddpm_sampler, flow_sampler

SDXL = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading", "set_alpha_to_one": False,
}  # fmt: skip
FLUX = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}
SD3 = {"shift": 3.0}


def flux_pipeline(k: int) -> dict:
    return {"sigmas": np.linspace(1.0, 1 / k, k).tolist(), "mu": 1.15}


def sd3_pipeline(k: int) -> dict:
    return {}


def _walk(sampler, pipeline, **call) -> np.ndarray:
    s = FlowMatchEulerDiscreteScheduler.from_config(sampler.config)
    s.set_timesteps(sampler.steps, **{**pipeline(sampler.steps), **call})
    return s.sigmas[:-1].double().numpy()


@pytest.mark.parametrize("pipeline", [flux_pipeline, sd3_pipeline])
@pytest.mark.parametrize("mode", ["renoise", "euler"])
def test_any_flow_anchors_are_walked_exactly_by_the_plain_or_the_exact_call(pipeline, mode):
    rng = np.random.default_rng(0)
    for k in (2, 3, 4, 6):
        anchors = [1.0, *sorted(rng.uniform(0.05, 0.95, k - 1).tolist(), reverse=True)]
        sampler = flow_sampler(FLUX if pipeline is flux_pipeline else SD3, anchors, mode, pipeline)
        assert sampler.config["stochastic_sampling"] == (mode == "renoise")
        walked = _walk(sampler, pipeline, **sampler.call)
        np.testing.assert_allclose(walked, anchors, atol=SIGMA_TOLERANCE)
        plain = _walk(sampler, pipeline)
        assert np.abs(plain - anchors).max() == pytest.approx(sampler.deviation, abs=1e-9)


def test_a_shifted_grid_needs_no_extra_arguments():
    s = 3.0
    anchors = [s * t / (1 + (s - 1) * t) for t in (1.0, 0.75, 0.5, 0.25)]
    for pipeline in (flux_pipeline, sd3_pipeline):
        sampler = flow_sampler(SD3, anchors, "renoise", pipeline)
        assert sampler.call == {} and sampler.deviation <= SIGMA_TOLERANCE


def test_ddpm_anchors_give_lcm_and_ddim_walks():
    lcm = ddpm_sampler(SDXL, [999, 749, 499, 249], "renoise")
    assert lcm.call == {} and lcm.config["original_inference_steps"] == 4
    scheduler = LCMScheduler.from_config(lcm.config)
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999, 749, 499, 249]
    three = ddpm_sampler(SDXL, [999, 666, 333], "renoise")
    scheduler = LCMScheduler.from_config(three.config)
    scheduler.set_timesteps(3)
    assert three.call == {} and scheduler.timesteps.tolist() == [999, 666, 333]
    odd = ddpm_sampler(SDXL, [999, 700, 400, 100], "renoise")
    assert odd.call == {"timesteps": [999, 700, 400, 100]} and odd.deviation > 0
    scheduler = LCMScheduler.from_config(odd.config)
    scheduler.set_timesteps(timesteps=odd.call["timesteps"])
    assert scheduler.timesteps.tolist() == [999, 700, 400, 100]

    ddim = ddpm_sampler(SDXL, [999, 749, 499, 249], "euler")
    scheduler = DDIMScheduler.from_config(ddim.config)
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999, 749, 499, 249]
    assert scheduler.final_alpha_cumprod == 1.0  # the last step lands on x̂0
    leading = ddpm_sampler(SDXL, [800, 550, 300, 50], "euler")
    assert leading.config["timestep_spacing"] == "leading" and leading.config["steps_offset"] == 50
    with pytest.raises(ValueError, match="--sampler renoise"):
        ddpm_sampler(SDXL, [999, 700, 400, 100], "euler")


def test_lcm_uses_x0_as_predicted_even_when_the_folder_clips():
    """A folder's DDPMScheduler may save clip_sample: LCM would then clamp x̂0 to [-1, 1]."""
    sampler = ddpm_sampler(
        {**SDXL, "clip_sample": True, "thresholding": True}, [999, 749, 499, 249], "renoise"
    )
    assert sampler.config["clip_sample"] is False and sampler.config["thresholding"] is False
