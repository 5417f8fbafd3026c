"""The Langevin corrector hook: guided score, the scheduler steps from the corrected sample, nothing left behind."""

from __future__ import annotations

import math

import diffusers
import numpy as np
import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from guidance import APG, CFG, PAG, LangevinCorrector, guide
from guidance.denoisers import GaussianDenoiser, GaussianMixtureDenoiser
from tests.factories import BUILDERS, pipeline_snapshot
from tests.test_pipeline import recording, run


def _pipe(name):
    pipe = BUILDERS[name]()
    if name == "sd":  # a k-diffusion scheduler: model inputs are scaled copies of the latents
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3", "flux", "dit", "pixart_sigma"])
def test_corrector_is_seeded_and_vanishes_with_the_snr(name):
    pipe = _pipe(name)
    methods = (PAG(2.0),) if name == "flux" else (APG(3.0),)  # FLUX: no true CFG with the corrector
    with guide(pipe, *methods):
        guided = run(pipe)
    snapshot = pipeline_snapshot(pipe)
    with guide(pipe, *methods, LangevinCorrector(snr=1e-7)):
        vanishing = run(pipe)
    with guide(pipe, *methods, LangevinCorrector(steps=2, snr=0.16)):
        first, second = run(pipe), run(pipe)
    with guide(pipe, *methods, LangevinCorrector(steps=2, snr=0.16, seed=1)):
        other = run(pipe)
    # APG's momentum is not advanced by the corrector's extra evaluations, or this would differ by far more
    np.testing.assert_allclose(vanishing, guided, atol=1e-5)
    np.testing.assert_array_equal(first, second)
    assert np.abs(first - guided).max() > 1e-3 and np.abs(first - other).max() > 1e-4
    assert pipeline_snapshot(pipe) == snapshot and "step" not in vars(pipe.scheduler)


def test_scheduler_steps_from_the_sample_the_model_last_saw():
    pipe = _pipe("sd")
    steps = 2
    with recording(pipe) as (calls, stepped), guide(pipe, CFG(3.0), LangevinCorrector(steps=steps)):
        run(pipe)
    samples = stepped.samples
    finals = calls[steps :: steps + 1]  # per step: `steps` corrector evaluations, then the final one
    assert len(finals) == len(samples) == 3
    for (x, _, _, (_, scale)), sample in zip(finals, samples):
        torch.testing.assert_close(x.chunk(2)[1], sample * scale, rtol=1e-5, atol=1e-5)
    first_call = calls[0][0].chunk(2)[1]
    assert (first_call - finals[0][0].chunk(2)[1]).abs().max() > 1e-3  # the correction moved the sample


def test_corrector_refuses_flux_true_cfg_and_bad_arguments():
    pipe = BUILDERS["flux"]()
    with guide(pipe, CFG(3.0), LangevinCorrector()), pytest.raises(ValueError, match="separate call"):
        run(pipe)
    for kwargs, message in [({"steps": -1}, "steps"), ({"snr": 0.0}, "snr"), ({"seed": 1.5}, "seed")]:
        with pytest.raises(ValueError, match=message):
            LangevinCorrector(**kwargs)
    with pytest.raises(ValueError, match="at most one LangevinCorrector"):
        with guide(pipe, LangevinCorrector(), LangevinCorrector()):
            pass


# --- at equilibrium the hook keeps the noisy marginal (analytic denoiser in a real SD pipeline) ---


class ExactEpsUNet(ModelMixin, ConfigMixin):
    """A UNet stand-in whose epsilon is exact for latents with i.i.d. elements drawn from ``data`` (a VE denoiser)."""

    @register_to_config
    def __init__(self, in_channels: int = 4, sample_size: int = 16, time_cond_proj_dim: int | None = None):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # device and dtype for ModelMixin
        self.data = None
        self.alphas_cumprod = None

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True, **kwargs):
        abar = self.alphas_cumprod[torch.as_tensor(timestep).long()].double()
        a, s = abar.sqrt(), (1 - abar).sqrt()
        x = sample.double().reshape(-1, 1)
        x0 = self.data(x / a, torch.full((x.shape[0],), (s / a).item(), dtype=torch.float64))  # Tweedie, VE scale
        return (((x - a * x0) / s).reshape(sample.shape).to(sample.dtype),)


def _exact_pipe(data):
    pipe = BUILDERS["sd"]()
    pipe.scheduler = diffusers.DDPMScheduler.from_config(pipe.scheduler.config)
    unet = ExactEpsUNet()
    unet.data, unet.alphas_cumprod = data, pipe.scheduler.alphas_cumprod
    pipe.unet = unet
    return pipe


GAUSSIAN_1D = GaussianDenoiser(torch.tensor([0.5], dtype=torch.float64), 0.2)
MIXTURE_1D = GaussianMixtureDenoiser(
    torch.tensor([[-1.0], [1.0]], dtype=torch.float64), 0.05, torch.tensor([0.3, 0.7], dtype=torch.float64)
)


def _marginal_latents(data, abar, shape, seed=0):
    """Exact samples of the noisy marginal ``a x0 + s eps`` at ``abar``."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if isinstance(data, GaussianDenoiser):
        x0 = data.mean + data.var.sqrt() * torch.randn(n, generator=g, dtype=torch.float64)
    else:
        right = torch.rand(n, generator=g, dtype=torch.float64) < 0.7
        x0 = torch.where(right, 1.0, -1.0) + 0.05**0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    eps = torch.randn(n, generator=g, dtype=torch.float64)
    return (abar**0.5 * x0 + (1 - abar) ** 0.5 * eps).reshape(shape).float()


@pytest.mark.parametrize(
    ("data", "steps", "snr"), [("gaussian", 1, 0.16), ("gaussian", 50, 0.1), ("mixture", 50, 0.16)]
)
def test_corrector_hook_keeps_the_noisy_marginal(data, steps, snr):
    data = GAUSSIAN_1D if data == "gaussian" else MIXTURE_1D
    pipe = _exact_pipe(data)
    t, shape = 500, (64, 4, 16, 16)
    abar = pipe.scheduler.alphas_cumprod[t].double()
    latents = _marginal_latents(data, abar, shape)
    kwargs = {"prompt": "a", "num_images_per_prompt": shape[0], "timesteps": [t], "guidance_scale": 1.0}
    with recording(pipe) as (calls, stepped), guide(pipe, LangevinCorrector(steps=steps, snr=snr)):
        pipe(**kwargs, latents=latents, height=32, width=32, output_type="latent")
    assert int(calls[0][1]) == t, calls[0][1]
    torch.testing.assert_close(calls[0][0], latents)
    before, after = latents.double(), stepped.samples[0].double()
    assert (after - before).abs().mean() > 0.05  # the corrector did move the samples
    if data is GAUSSIAN_1D:
        var = abar * 0.2 + 1 - abar
        assert abs(after.var() / var - 1) < 0.03, (after.var() / var).item()
        assert abs(after.mean() - abar.sqrt() * 0.5) < 0.01
    else:  # the mode weights: the share of elements whose posterior mean of x0 is in the 0.7-weight mode
        sigma = ((1 - abar) / abar).sqrt().expand(after.numel())

        def right_mode(x):
            return (MIXTURE_1D(x.reshape(-1, 1) / abar.sqrt(), sigma) > 0).double().mean()

        assert abs(right_mode(after) - right_mode(before)) < 8 * (0.21 / after.numel()) ** 0.5


@pytest.mark.parametrize(
    "scheduler",
    [
        "UniPCMultistepScheduler",  # its corrector rebuilds the sample from last_sample
        "HeunDiscreteScheduler",  # the second stage restarts from the first stage's sample
        "KDPM2DiscreteScheduler",
        "DPMSolverSinglestepScheduler",  # steps of one order group start from the group's first sample
        "PNDMScheduler",  # Runge-Kutta warm-up and the second PLMS step use cur_sample
    ],
)
def test_corrector_refuses_schedulers_that_restart_from_a_stored_sample(scheduler):
    pipe = BUILDERS["sd"]()
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    with guide(pipe, CFG(3.0), LangevinCorrector()), pytest.raises(ValueError, match=f"{scheduler} is not supported"):
        run(pipe)
    assert "step" not in vars(pipe.scheduler)
    with guide(pipe, CFG(3.0)):  # without the corrector the scheduler is fine
        run(pipe, num_inference_steps=4)


def test_scheduler_swapped_inside_the_block_steps_from_the_corrected_sample():
    pipe = BUILDERS["sd"]()
    steps = 2
    with guide(pipe, CFG(3.0), LangevinCorrector(steps=steps)):
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        with recording(pipe) as (calls, stepped):
            run(pipe)
    samples = stepped.samples
    finals = calls[steps :: steps + 1]
    assert len(finals) == len(samples) == 3
    for (x, _, _, (_, scale)), sample in zip(finals, samples):
        torch.testing.assert_close(x.chunk(2)[1], sample * scale, rtol=1e-5, atol=1e-5)
