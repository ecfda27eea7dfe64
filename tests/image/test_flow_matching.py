"""The rectified-flow form (mm_align.image.flow_matching) against hand computations and diffusers' own
scheduler tables and timestep densities."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling
from mm_align.image.flow_matching import (
    FlowMatchingConfig,
    draw_flow_sample,
    draw_sigma,
    draw_u,
    flow_error,
    model_timestep,
    noisy_latents,
    scheduler_shift,
    shift_sigma,
    velocity_target,
)


def test_x_t_target_and_error_by_hand():
    """Sample 0: x_0 = [1, 2, 3, 4], ε = [0, 0, 1, −1], σ = 0.25:
    x_t = 0.75·x_0 + 0.25·ε = [0.75, 1.5, 2.5, 2.75]; v = ε − x_0 = [−1, −2, −2, −5];
    with v̂ = 0 the error is (1 + 4 + 4 + 25) / 4 = 8.5.
    Sample 1: x_0 = 0, ε = [2, 2, 2, 2], σ = 0.5: x_t = [1, 1, 1, 1], v = [2, 2, 2, 2]; v̂ = [2, 2, 2, 1] → 1/4."""
    x0 = torch.tensor([[1.0, 2, 3, 4], [0, 0, 0, 0]]).view(2, 1, 2, 2)
    eps = torch.tensor([[0.0, 0, 1, -1], [2, 2, 2, 2]]).view(2, 1, 2, 2)
    sigma = torch.tensor([0.25, 0.5])
    x_t = noisy_latents(x0, eps, sigma)
    assert x_t.flatten(1).tolist() == [[0.75, 1.5, 2.5, 2.75], [1.0, 1.0, 1.0, 1.0]]
    assert velocity_target(x0, eps).flatten(1).tolist() == [[-1.0, -2.0, -2.0, -5.0], [2.0, 2.0, 2.0, 2.0]]
    pred = torch.stack([torch.zeros(1, 2, 2), torch.tensor([2.0, 2, 2, 1]).view(1, 2, 2)])
    assert flow_error(pred, x0, eps).tolist() == [8.5, 0.25]
    # σ = 0 is the data, σ = 1 pure noise; every non-batch dim is reduced, also for 5D video latents
    assert torch.equal(noisy_latents(x0, eps, torch.tensor([0.0, 1.0]))[0], x0[0])
    assert torch.equal(noisy_latents(x0, eps, torch.tensor([0.0, 1.0]))[1], eps[1])
    video = torch.ones(2, 3, 4, 2, 2)
    assert flow_error(video * 3, video, video * 0).tolist() == [16.0, 16.0]  # (0 − 1 − 3)² everywhere
    with pytest.raises(ValueError, match="sigma must be"):
        noisy_latents(x0, eps, torch.tensor([0.5]))


def test_shift_matches_the_schedulers_table():
    """σ' = shift·σ / (1 + (shift − 1)·σ): 0.5 → 0.75 and 0.25 → 0.5 at shift 3; the scheduler's training
    table (sigmas and timesteps = σ·T) is the same map of (T − i)/T."""
    assert shift_sigma(0.5, 3.0) == pytest.approx(0.75) and shift_sigma(0.25, 3.0) == pytest.approx(0.5)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    T = scheduler.config.num_train_timesteps
    raw = (T - torch.arange(T, dtype=torch.float64)) / T
    assert torch.allclose(scheduler.sigmas[:T].double(), shift_sigma(raw, 3.0), atol=1e-6)
    assert torch.allclose(model_timestep(scheduler.sigmas[:T], T, "sd3"), scheduler.timesteps, atol=1e-3)
    assert torch.equal(model_timestep(scheduler.sigmas[:T], T, "flux"), scheduler.sigmas[:T])  # ×1000 inside
    with pytest.raises(ValueError, match="valid: sd3, flux"):
        model_timestep(scheduler.sigmas, T, "wan")


def test_scheduler_shift_sd3_and_flux():
    assert scheduler_shift(FlowMatchEulerDiscreteScheduler(shift=3.0).config) == 3.0  # SD3 / SD3.5
    flux = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)  # FLUX.1: shifted at inference only
    assert scheduler_shift(flux.config) == 1.0
    assert torch.allclose(flux.sigmas[:1000], (1000 - torch.arange(1000)) / 1000)  # unshifted training table


@pytest.mark.parametrize("scheme", ["logit_normal", "uniform", "mode"])
def test_u_is_diffusers_density_draw(scheme):
    """With the same generator state, draw_u is exactly diffusers' compute_density_for_timestep_sampling."""
    cfg = FlowMatchingConfig(weighting_scheme=scheme, logit_mean=0.3, logit_std=0.8)
    ours = draw_u(cfg, torch.Generator().manual_seed(7))
    name = scheme if scheme != "uniform" else "none"  # any other name is uniform in diffusers
    theirs = compute_density_for_timestep_sampling(name, 1, logit_mean=0.3, logit_std=0.8, mode_scale=1.29,
                                                   generator=torch.Generator().manual_seed(7))
    assert ours == pytest.approx(float(theirs[0]), abs=1e-6)


def test_logit_normal_statistics_and_shift():
    """logit(u) ~ N(0, 1) by default: 4000 draws have mean 0 ± 0.1 and std 1 ± 0.1; with shift 3 the median
    σ is shift(0.5) = 0.75."""
    g = torch.Generator().manual_seed(0)
    cfg = FlowMatchingConfig()
    u = torch.tensor([draw_u(cfg, g) for _ in range(4000)])
    logit = torch.log(u / (1 - u))
    assert abs(float(logit.mean())) < 0.1 and abs(float(logit.std()) - 1) < 0.1
    sigmas = torch.tensor([draw_sigma(cfg, g, 3.0) for _ in range(4000)])
    assert float(sigmas.median()) == pytest.approx(0.75, abs=0.03)
    assert float(sigmas.min()) > 0 and float(sigmas.max()) < 1


def test_per_sample_draw_is_a_function_of_the_seed():
    cfg = FlowMatchingConfig()
    s1, e1, _ = draw_flow_sample(11, (16, 4, 4), cfg, 3.0)
    s2, e2, _ = draw_flow_sample(11, (16, 4, 4), cfg, 3.0)
    s3, e3, _ = draw_flow_sample(12, (16, 4, 4), cfg, 3.0)
    assert s1 == s2 and torch.equal(e1, e2) and s1 != s3 and not torch.equal(e1, e3)
    g = torch.Generator().manual_seed(11)  # ε first, then σ
    assert torch.equal(torch.randn(16, 4, 4, generator=g), e1)
    u = draw_u(cfg, g)
    assert s1 == pytest.approx(3 * u / (1 + 2 * u))
    fixed, _, _ = draw_flow_sample(11, (16, 4, 4), FlowMatchingConfig(shift=1.0), 3.0)  # config shift overrides
    assert fixed == pytest.approx(u)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="weighting_scheme"):
        FlowMatchingConfig(weighting_scheme="cosmap")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="logit_std"):
        FlowMatchingConfig(logit_std=0.0)
    with pytest.raises(ValueError, match="shift"):
        FlowMatchingConfig(shift=-1.0)
    assert math.isclose(FlowMatchingConfig().mode_scale, 1.29)
