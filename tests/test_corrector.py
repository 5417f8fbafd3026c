"""The Langevin corrector hook: guided score, the scheduler steps from the corrected sample, nothing left behind."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

from guidance import APG, CFG, PAG, LangevinCorrector, guide
from tests.factories import BUILDERS
from tests.test_pipeline import _snapshot, recording, run


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
    snapshot = _snapshot(pipe)
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
    assert _snapshot(pipe) == snapshot and "step" not in vars(pipe.scheduler)


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
