"""guide() on Lumina 2: a separate unconditional call, the time running from 0 at pure noise (``1 - t / 1000``), the
negated velocity as output, the pipeline's per-token rescale of its CFG result (``cfg_normalization``) and its CFG
truncation by step (``cfg_trunc_ratio``), one [caption, image] sequence padded per batch.

CFG equals the pipeline's own in every mode; APG in x0 space equals the formula on the recorded branches (and the
wrong time or sign gives another result); the perturbations batched equal them as calls of their own; the
pipeline is left as found."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidance import APG, CFG, PAG, SLG, TPG, SoftPAG, guide
from tests.factories import lumina2_call_kwargs, pipeline_snapshot, recorded_run, tiny_lumina2


@pytest.fixture(scope="module")
def pipe():
    return tiny_lumina2()


def call(pipe, batch=1, tokens=(7, 12), **extra):
    kwargs = lumina2_call_kwargs(batch, tokens) | extra
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize(
    "extra",
    [{}, {"cfg_normalization": False}, {"cfg_trunc_ratio": 0.5}, {"batch": 2}],
    ids=["rescaled", "plain", "truncation", "padded_batch_of_two"],
)
def test_cfg_equals_the_pipelines_own(pipe, extra):
    own, unguided = call(pipe, guidance_scale=4.0, **extra), call(pipe, guidance_scale=1.0, **extra)
    assert np.abs(own - unguided).max() > 1e-3, "CFG must change this tiny model's output"
    if extra:
        assert np.abs(own - call(pipe, guidance_scale=4.0)[: len(own)]).max() > 1e-3, "the mode must count"
    before = pipeline_snapshot(pipe)
    with guide(pipe, CFG(4.0)):
        np.testing.assert_allclose(call(pipe, **extra), own, atol=2e-6)
        np.testing.assert_allclose(call(pipe, guidance_scale=1.0, **extra), own, atol=2e-6)
    assert pipeline_snapshot(pipe) == before


def _apg_reference(method, calls, reversed_time=True, sign=-1.0):
    """What the scheduler should receive from the recorded (cond, uncond) calls: minus the guided output, which is
    the guided velocity ``(x - x0_g) / sigma`` over ``sign``, ``x0_g = x0_c + update(x0_c, x0_u)`` with the flow
    path's ``x0 = x - sigma v``, ``v = sign * output`` and ``sigma = 1 - timestep argument`` (the paper's x0
    space); ``reversed_time`` / ``sign`` off: the wrong readings, as controls."""
    state, expected = method.new_state("lumina2"), []
    for (x, t, cond), (_, _, uncond) in zip(calls[::2], calls[1::2]):
        x, cond, uncond = x.float(), cond.float(), uncond.float()
        sigma = (1 - t if reversed_time else t).float().reshape(-1, 1, 1, 1)
        x0_cond, x0_uncond = x - sigma * (sign * cond), x - sigma * (sign * uncond)
        guided_x0 = x0_cond + method.update(x0_cond, x0_uncond, state)
        expected.append(-((x - guided_x0) / sigma) / sign)
    return expected


def test_apg_reads_the_reversed_time_and_the_negated_output(pipe):
    method = APG(6.0)  # x0 space with the auto norm threshold: depends on where in the schedule each step is

    def run():
        with guide(pipe, method):
            call(pipe, cfg_normalization=False)

    calls, steps = recorded_run(pipe, run)
    assert len(calls) == 2 * len(steps) == 6 and float(calls[0][1][0]) < 0.01  # the first step sees time 0
    for ours, reference in zip(steps, _apg_reference(method, calls)):
        torch.testing.assert_close(ours.float(), reference, rtol=1e-4, atol=1e-5)
    for wrong in (_apg_reference(method, calls, reversed_time=False), _apg_reference(method, calls, sign=1.0)):
        # (the wrong time reads sigma = 0 at the first step: compared from the second on)
        assert max((w - s).abs().max().item() for w, s in zip(wrong[1:], steps[1:])) > 1e-3


@pytest.mark.parametrize(
    "method",
    [
        PAG(2.0),
        SoftPAG(2.0, heads=(("layers.1.attn", 0),)),
        TPG(1.0),
        SLG(1.0, layers=("layers.1",), start=0.0, stop=1.0),
    ],
    ids=["pag", "softpag", "tpg", "slg"],
)
def test_perturbations_batched_equal_their_own_calls(pipe, method):
    """Two samples whose captions keep 12 and 11 tokens: the sequence is padded per batch."""
    with guide(pipe, APG(4.0), method):
        batched = call(pipe, batch=2, tokens=(12, 5))
    with guide(pipe, APG(4.0), method, sequential=True):
        np.testing.assert_allclose(call(pipe, batch=2, tokens=(12, 5)), batched, atol=1e-5)
    with guide(pipe, APG(4.0)):
        assert np.abs(batched - call(pipe, batch=2, tokens=(12, 5))).max() > 1e-3


def test_perturbations_compose_with_the_pipelines_own_cfg_and_the_refusals(pipe):
    with guide(pipe, CFG(4.0), PAG(2.0)):
        explicit = call(pipe)
    with guide(pipe, PAG(2.0)):
        np.testing.assert_allclose(call(pipe, guidance_scale=4.0), explicit, atol=2e-6)
    assert np.abs(explicit - call(pipe, guidance_scale=4.0)).max() > 1e-3
    with pytest.raises(ValueError, match=r"joint='image'\) is not available"):
        with guide(pipe, PAG(2.0, joint="image")):
            pass
