"""Schedules read from a teacher folder's scheduler config equal what diffusers' own schedulers do
with the same config: FLUX's dynamic shift (μ from the token count), SD3's static shift, DDPM betas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from senseflow.config.common import AnchorsConfig
from senseflow.core.flow import flux_mu
from senseflow.models.schedules import anchors_from_recipe, load_ddpm_schedule, load_flow_schedule


def _save(scheduler, tmp_path):
    scheduler.save_pretrained(tmp_path / "scheduler")
    return tmp_path


def test_dynamic_shift_follows_the_token_count_as_the_flux_pipeline_does(tmp_path):
    config = dict(
        shift=3.0,
        use_dynamic_shifting=True,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
    )
    folder = _save(FlowMatchEulerDiscreteScheduler(**config), tmp_path)
    tokens = 1024
    ours = load_flow_schedule(folder, image_seq_len=tokens, timestep_scale=1.0)
    mu = flux_mu(tokens, 256, 4096, 0.5, 1.15)
    assert ours.mu == pytest.approx(mu) and ours.timestep_scale == 1.0
    reference = FlowMatchEulerDiscreteScheduler(**config)
    t = np.linspace(1.0, 1 / 8, 8)
    reference.set_timesteps(sigmas=t, mu=mu)
    torch.testing.assert_close(
        ours.inference_sigmas(8, t_values=t), reference.sigmas.float(), rtol=1e-6, atol=1e-6
    )
    with pytest.raises(ValueError, match="number of image tokens"):
        load_flow_schedule(folder)


def test_static_shift_is_read_from_the_folder(tmp_path):
    folder = _save(FlowMatchEulerDiscreteScheduler(shift=3.0), tmp_path)
    ours = load_flow_schedule(folder)
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    torch.testing.assert_close(ours.sigma_table(), reference.sigmas.float())
    anchors = anchors_from_recipe(AnchorsConfig(values=[1.0, 0.75, 0.5, 0.25], units="t"), ours)
    assert anchors.sigmas == pytest.approx((1.0, 0.9, 0.75, 0.5), abs=1e-6)


def test_ddpm_schedule_is_read_from_the_folder(tmp_path):
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction"
    )
    ours = load_ddpm_schedule(_save(scheduler, tmp_path))
    assert ours.prediction_type == "v_prediction"
    torch.testing.assert_close(ours.alphas_cumprod, scheduler.alphas_cumprod.float())
    anchors = anchors_from_recipe(AnchorsConfig(values=[999, 749, 499, 249], units="ddpm_t"), ours)
    assert anchors.kind == "ddpm" and anchors.timesteps == (999.0, 749.0, 499.0, 249.0)


def test_missing_scheduler_config_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"scheduler/scheduler_config\.json"):
        load_flow_schedule(tmp_path)
