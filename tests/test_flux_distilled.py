"""guide() on the FLUX pipelines that have no true CFG (Fill, Control, Control img2img / inpainting, ControlNet
img2img / inpainting: guidance-distilled models): perturbation guidance runs and equals its formula on the recorded
branches, the packed mask / control channels reach the perturbed branch, CFG-type methods are refused at entry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidance import APG, CFG, PAG, TPG, SoftPAG, guide
from tests.factories import (
    FLUX_DISTILLED,
    flux_distilled_call_kwargs,
    pipeline_snapshot,
    recorded_run,
    tiny_flux_distilled,
)


@pytest.fixture(scope="module", params=sorted(FLUX_DISTILLED))
def pipe(request):
    return tiny_flux_distilled(request.param)


def call(pipe):
    return pipe(**flux_distilled_call_kwargs(pipe), generator=torch.Generator().manual_seed(0)).images


def test_perturbation_guidance_is_its_formula_on_the_recorded_branches(pipe):
    method = PAG(2.0)
    results = []

    def run():
        with guide(pipe, method, sequential=True):  # one call per branch: the conditional, then the perturbed
            results.append(call(pipe))

    calls, steps = recorded_run(pipe, run)
    sequential = results[0]
    assert len(calls) == 2 * len(steps) and calls[0][0].shape[2] >= calls[0][2].shape[2]
    for (x, _, cond), (x_perturbed, _, perturbed), ours in zip(calls[::2], calls[1::2], steps):
        torch.testing.assert_close(x_perturbed, x)  # the same input, mask / control channels included
        assert (perturbed - cond).abs().max() > 1e-5, "the perturbation must change this tiny model's output"
        torch.testing.assert_close(ours, cond + method.update(cond, perturbed, method.new_state("flux")))
    with guide(pipe, method):  # batched with the conditional rows: the same result
        np.testing.assert_allclose(call(pipe), sequential, atol=2e-5)


def test_softpag_and_tpg_run_and_the_pipeline_is_left_as_found(pipe):
    before, unguided = pipeline_snapshot(pipe), call(pipe)
    with guide(pipe, SoftPAG(1.0, heads=[(0, 0), (0, 1)], strength=0.5), TPG(1.0, seed=1)):
        guided = call(pipe)
    assert np.isfinite(guided).all() and np.abs(guided - unguided).max() > 1e-5
    assert pipeline_snapshot(pipe) == before


@pytest.mark.parametrize("method", [CFG(4.0), APG(4.0)])
def test_cfg_type_methods_are_refused_at_entry(pipe, method):
    with pytest.raises(ValueError, match="runs no unconditional branch"), guide(pipe, method, PAG(1.0)):
        pass
