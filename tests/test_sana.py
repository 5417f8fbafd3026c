"""guide() on Sana (linear self-attention, which never calls SDPA: the attention perturbations act on its value
path) and Sana ControlNet: CFG equals the pipeline's own, CFG+PAG and PAG alone equal diffusers' SanaPAGPipeline,
SoftPAG with every head at strength 1 is PAG, APG in x0 space reads the schedule through the transformer's
``timestep_scale`` (against the formula on the recorded branches), TPG and SLG act, the pipeline is left as found."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidance import APG, CFG, PAG, SLG, TPG, SoftPAG, guide
from guidance.pipeline import schedule_of
from guidance.prediction import broadcast
from tests.factories import pipeline_snapshot, recorded_run, sana_call_kwargs, tiny_sana
from tests.test_pipeline import assert_images_close


@pytest.fixture(scope="module")
def pipe():
    return tiny_sana()


def call(pipe, **extra):
    return pipe(**(sana_call_kwargs(pipe) | extra), generator=torch.Generator().manual_seed(0)).images


def _pag_pipeline(pipe, layers):
    import diffusers

    cls = diffusers.SanaPAGPipeline
    accepted = cls.__init__.__code__.co_varnames
    theirs = cls(**{k: v for k, v in pipe.components.items() if k in accepted}, pag_applied_layers=layers)
    theirs.set_progress_bar_config(disable=True)
    return theirs


@pytest.mark.parametrize("controlnet", [False, True], ids=["sana", "sana_controlnet"])
def test_cfg_equals_the_pipelines_own_and_the_pipeline_is_left_as_found(controlnet):
    pipe = tiny_sana(controlnet=controlnet)
    before = pipeline_snapshot(pipe)
    own, unguided = call(pipe, guidance_scale=4.0), call(pipe, guidance_scale=1.0)
    assert np.abs(own - unguided).max() > 1e-4, "CFG must change this tiny model's output"
    with guide(pipe, CFG(4.0)):
        assert_images_close(call(pipe, guidance_scale=1.0), own, atol=1e-4)
    with guide(pipe, APG(4.0), PAG(2.0), TPG(1.0)):
        mixed = call(pipe)
    assert np.isfinite(mixed).all() and np.abs(mixed - own).max() > 1e-4
    assert pipeline_snapshot(pipe) == before
    if controlnet:
        other = call(pipe, guidance_scale=4.0, control_image=torch.zeros(1, 3, 32, 32))
        assert np.abs(other - own).max() > 1e-4, "the control image must matter in this tiny ControlNet"


def test_cfg_plus_pag_and_pag_alone_equal_diffusers_sana_pag_pipeline(pipe):
    theirs = _pag_pipeline(pipe, ["transformer_blocks.1"])
    seed = lambda: torch.Generator().manual_seed(0)
    with_cfg = theirs(**sana_call_kwargs(), guidance_scale=4.0, pag_scale=3.0, generator=seed()).images
    alone = theirs(**sana_call_kwargs(), guidance_scale=1.0, pag_scale=3.0, generator=seed()).images
    assert np.abs(with_cfg - call(pipe, guidance_scale=4.0)).max() > 1e-4, "PAG must change the output"
    assert np.abs(alone - call(pipe, guidance_scale=1.0)).max() > 1e-4
    with guide(pipe, CFG(4.0), PAG(3.0, layers="transformer_blocks.1")):
        assert_images_close(call(pipe), with_cfg, atol=1e-4)
    with guide(pipe, PAG(3.0, layers="transformer_blocks.1")):
        assert_images_close(call(pipe, guidance_scale=1.0), alone, atol=1e-4)
    # the processors diffusers' pipeline set were put back by it, ours never changed them
    assert {type(p).__name__ for p in pipe.transformer.attn_processors.values()} == {
        "SanaLinearAttnProcessor2_0",
        "SanaAttnProcessor2_0",
    }


def test_softpag_on_linear_attention(pipe):
    heads = pipe.transformer.config.num_attention_heads
    with guide(pipe, PAG(3.0, layers=0)):
        pag = call(pipe, guidance_scale=1.0)
    with guide(pipe, SoftPAG(3.0, heads=[(0, h) for h in range(heads)], strength=1.0)):
        assert_images_close(call(pipe, guidance_scale=1.0), pag, atol=1e-5)
    with guide(pipe, SoftPAG(3.0, heads=[(0, 1)], strength=0.5)):
        soft = call(pipe, guidance_scale=1.0)
    plain = call(pipe, guidance_scale=1.0)
    assert np.abs(soft - pag).max() > 1e-4 and np.abs(soft - plain).max() > 1e-5


def test_slg_and_tpg_act_on_sana_blocks(pipe):
    plain = call(pipe, guidance_scale=4.0)
    for method in (SLG(2.0, layers=(1,), start=0.0, stop=1.0), TPG(2.0)):
        with guide(pipe, CFG(4.0), method):
            out = call(pipe)
        assert np.isfinite(out).all() and np.abs(out - plain).max() > 1e-4, method


def _apg_reference(pipe, method, calls, timestep_scale):
    """The guided prediction of each step from the recorded (uncond, cond) halves: the paper's x0 space, the
    schedule read at the recorded timestep divided by ``timestep_scale``."""
    schedule, state, guided = schedule_of(pipe.scheduler), method.new_state("sana"), []
    for x, t, out in calls:
        x, (uncond, cond) = x[1:].float(), out.float().chunk(2)
        t = torch.as_tensor(t).reshape(-1)[1:].float() / timestep_scale
        a, b = schedule.coefficients(*schedule.alpha_sigma(t))
        a, b = broadcast(a, x), broadcast(b, x)
        guided.append(cond + method.update(a * x + b * cond, a * x + b * uncond, state) / b)
    return guided


def test_apg_reads_the_schedule_through_the_timestep_scale():
    pipe = tiny_sana(timestep_scale=2.0)
    method = APG(6.0)  # x0 space: the update depends on where in the schedule each step is

    def run():
        with guide(pipe, method):
            call(pipe)

    calls, steps = recorded_run(pipe, run)
    assert len(calls) == len(steps) == 3 and float(torch.as_tensor(calls[0][1]).max()) > 1000  # t scaled by 2
    for ours, reference in zip(steps, _apg_reference(pipe, method, calls, 2.0)):
        torch.testing.assert_close(ours.float(), reference, rtol=1e-4, atol=1e-5)
    # the control: the schedule read at the scaled timestep gives another guidance
    wrong = _apg_reference(pipe, method, calls, 1.0)
    assert max((w - s).abs().max().item() for w, s in zip(wrong, steps)) > 1e-3


def test_sanas_own_scheduler_and_the_corrector():
    """Sana checkpoints ship DPM-Solver++ on flow sigmas: CFG still equals the pipeline's own, and the Langevin
    corrector runs with it."""
    import diffusers

    from guidance import LangevinCorrector

    pipe = tiny_sana()
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler(
        flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction"
    )
    own = call(pipe, guidance_scale=4.0)
    with guide(pipe, CFG(4.0)):
        assert_images_close(call(pipe), own, atol=1e-4)
    with guide(pipe, APG(4.0), PAG(2.0), LangevinCorrector(steps=1)):
        corrected = call(pipe)
    assert np.isfinite(corrected).all() and np.abs(corrected - own).max() > 1e-3
