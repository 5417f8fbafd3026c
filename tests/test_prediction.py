"""Conversions and schedules of guidance.prediction against their definitions."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from guidance import prediction as P

KINDS = P.PREDICTION_TYPES


def _point(seed: int, batch: int = 3, path: str = "vp"):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 4, 5, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(batch, 4, 5, 5, generator=g, dtype=torch.float64)
    u = torch.rand(batch, generator=g, dtype=torch.float64) * 0.96 + 0.02
    if path == "vp":
        alpha, sigma = torch.sqrt(1 - u), torch.sqrt(u)
    elif path == "flow":
        alpha, sigma = 1 - u, u
    else:  # ve
        alpha, sigma = torch.ones_like(u), 5 * u
    x = P.broadcast(alpha, x0) * x0 + P.broadcast(sigma, x0) * eps
    return x0, eps, x, alpha, sigma


def _truth(kind, x0, eps, alpha, sigma):
    a, s = P.broadcast(alpha, x0), P.broadcast(sigma, x0)
    return {"epsilon": eps, "v_prediction": a * eps - s * x0, "flow": eps - x0, "sample": x0}[kind]


@pytest.mark.parametrize("path", ["vp", "flow", "ve"])
@pytest.mark.parametrize("kind", KINDS)
def test_to_x0_recovers_clean_sample(kind, path):
    if kind == "flow" and path != "flow":
        pytest.skip("the flow velocity is defined on the flow path")
    x0, eps, x, alpha, sigma = _point(0, path=path)
    pred = _truth(kind, x0, eps, alpha, sigma)
    torch.testing.assert_close(P.to_x0(pred, x, alpha, sigma, kind), x0)
    torch.testing.assert_close(P.convert(pred, x, alpha, sigma, kind, "epsilon"), eps)
    torch.testing.assert_close(P.to_score(pred, x, alpha, sigma, kind), -eps / P.broadcast(sigma, x))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), src=st.sampled_from(KINDS), dst=st.sampled_from(KINDS))
def test_every_conversion_round_trips(seed, src, dst):
    x0, eps, x, alpha, sigma = _point(seed, path="flow")
    pred = _truth(src, x0, eps, alpha, sigma)
    there = P.convert(pred, x, alpha, sigma, src, dst)
    torch.testing.assert_close(there, _truth(dst, x0, eps, alpha, sigma))
    torch.testing.assert_close(P.convert(there, x, alpha, sigma, dst, src), pred)
    score = P.to_score(pred, x, alpha, sigma, src)
    torch.testing.assert_close(P.from_score(score, x, alpha, sigma, src), pred)


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown prediction type"):
        P.x0_coefficients(torch.ones(1), torch.ones(1), "eps")


def test_vp_discrete_matches_alphas_cumprod_and_interpolates_log_sigma():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    t = torch.tensor([0, 1, 500, 999])
    ac32 = ac.float()
    alpha, sigma = P.vp_discrete(ac32, t)
    ac = ac32.double()
    torch.testing.assert_close(alpha.double(), ac[t].sqrt(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sigma.double(), (1 - ac[t]).sqrt(), rtol=1e-6, atol=1e-7)
    # halfway between two timesteps: the geometric mean of their VE sigmas
    alpha, sigma = P.vp_discrete(ac, torch.tensor([10.5]))
    ve = ((1 - ac) / ac).sqrt()
    assert math.isclose((sigma / alpha).item(), (ve[10] * ve[11]).sqrt().item(), rel_tol=1e-5)


def test_vp_continuous_and_flow_and_edm_are_on_their_paths():
    t = torch.linspace(0.01, 1, 7)
    alpha, sigma = P.vp_continuous(t)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t))
    torch.testing.assert_close(alpha[0], torch.tensor(math.exp(-0.25 * 0.01**2 * 19.9 - 0.5 * 0.01 * 0.1)))
    alpha, sigma = P.flow(t)
    torch.testing.assert_close(alpha + sigma, torch.ones_like(t))
    s = torch.tensor([0.1, 1.0, 10.0])
    alpha, sigma = P.edm(s, 0.5)
    torch.testing.assert_close(alpha, 1 / (s**2 + 0.25).sqrt())
    torch.testing.assert_close(sigma / alpha, s)


def test_edm_coefficients_match_diffusers_preconditioning():
    from diffusers import EDMEulerScheduler

    for kind, sign in (("epsilon", 1.0), ("v_prediction", -1.0)):
        sched = EDMEulerScheduler(sigma_data=0.5, prediction_type=kind)
        sigma = torch.tensor([0.3, 2.0, 30.0])
        x_ve = torch.randn(3, 4, 2, 2)
        out = torch.randn(3, 4, 2, 2)
        expected = sched.precondition_outputs(x_ve, out, sigma[:, None, None, None])
        x_in = sched.precondition_inputs(x_ve, sigma[:, None, None, None])
        alpha, sig = P.edm(sigma, 0.5)
        a, b = P.edm_x0_coefficients(alpha, sig, 0.5, sign)
        torch.testing.assert_close(P.broadcast(a, x_in) * x_in + P.broadcast(b, x_in) * out, expected)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("timestep_type", ["discrete", "continuous"])
def test_euler_timesteps_read_back_to_the_schedulers_own_sigmas(kind, timestep_type):
    """Euler passes 0.25 log(sigma) only for continuous v-prediction; otherwise discrete steps, whatever the flag."""
    from diffusers import EulerDiscreteScheduler

    from guidance.denoisers import DiffusersDenoiser
    from guidance.families import schedule_of

    scheduler = EulerDiscreteScheduler(prediction_type=kind, timestep_type=timestep_type)
    scheduler.set_timesteps(10)
    alpha, sigma = schedule_of(scheduler).alpha_sigma(scheduler.timesteps)
    torch.testing.assert_close(sigma / alpha, scheduler.sigmas[:-1].float(), rtol=1e-4, atol=1e-4)
    if not P.has_log_sigma_timesteps(scheduler.config):  # the score denoiser reads discrete timesteps only
        DiffusersDenoiser(torch.nn.Identity(), scheduler)


def test_vp_discrete_is_finite_at_a_zero_terminal_snr_step():
    """rescale_betas_zero_snr stores abar = 0 at the last step: alpha 0, sigma 1 there (the SD 2.1-v recipe's first
    'trailing' step), and the steps next to it stay exact."""
    from diffusers import DDIMScheduler

    ac = DDIMScheduler(rescale_betas_zero_snr=True).alphas_cumprod
    assert ac[-1] == 0
    alpha, sigma = P.vp_discrete(ac, torch.tensor([999.0, 998.5, 998.0]))
    assert torch.isfinite(alpha).all() and torch.isfinite(sigma).all()
    torch.testing.assert_close(alpha[0], torch.tensor(0.0)) and torch.testing.assert_close(sigma[0], torch.tensor(1.0))
    torch.testing.assert_close(alpha[2], ac[998].sqrt().float())
    assert 0 <= alpha[1] <= alpha[2]  # between a finite and an infinite log-sigma: at or near the end


def test_apg_in_x0_space_with_a_zero_terminal_snr_v_model():
    from diffusers import DDIMScheduler

    from guidance import APG, guide
    from tests.factories import default_call_kwargs, tiny_sd

    pipe = tiny_sd("v_prediction")
    config = pipe.scheduler.config
    pipe.scheduler = DDIMScheduler.from_config(config, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    with guide(pipe, APG(3.0)):  # x0 space: the first step sits at abar = 0, where x0 = -v
        images = pipe(**default_call_kwargs(pipe), generator=torch.Generator().manual_seed(0)).images
    assert np.isfinite(np.asarray(images)).all()


def test_device_copies_copy_a_table_once_per_device():
    """The per-step schedule lookups read one device copy of the table (a copy each step stalls the host)."""
    table = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    copies = P.DeviceCopies(table)
    assert copies.on("cpu") is table
    meta = copies.on("meta")
    assert meta.device.type == "meta" and meta.shape == table.shape and meta.dtype == table.dtype
    assert copies.on(torch.device("meta")) is meta


def test_the_schedule_and_the_denoiser_read_their_tables_through_one_copy_per_device():
    from diffusers import DDPMScheduler

    from guidance.denoisers import DiffusersDenoiser
    from guidance.families import schedule_of

    scheduler = DDPMScheduler()
    t = torch.tensor([10.0, 10.5, 999.0])
    alpha, sigma = schedule_of(scheduler).alpha_sigma(t)
    expected = P.vp_discrete(scheduler.alphas_cumprod, t)
    torch.testing.assert_close((alpha, sigma), expected, rtol=0, atol=0)
    denoiser = DiffusersDenoiser(torch.nn.Identity(), scheduler)
    sigma_ve = denoiser.t_to_sigma(t)
    torch.testing.assert_close(sigma_ve, expected[1] / expected[0])
    torch.testing.assert_close(denoiser.sigma_to_t(sigma_ve), t, rtol=1e-5, atol=1e-4)
    denoiser.alphas_cumprod = denoiser.alphas_cumprod[:500]  # a replaced table is read anew, not a stale copy
    torch.testing.assert_close(denoiser.t_to_sigma(torch.tensor([700.0])), sigma_ve[:1] * 0 + denoiser.sigma_max)
    assert denoiser.sigma_to_t(sigma_ve[2:]).item() == 499
