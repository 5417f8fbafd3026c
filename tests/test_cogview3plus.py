"""guide() on CogView3-Plus: one batched CFG call (the unconditional half first) of joint-attention blocks over
[text, image] that return the image stream first, v-prediction on CogVideoX's DDIM schedule.

CFG equals the pipeline's own; APG equals the formula on the recorded branches; the perturbations batched equal
them as calls of their own; SLG's weak branch is the denoiser without the block when text and image have as many
tokens (the block's output order cannot be read from the shapes); the Langevin corrector runs on the DDIM schedule
and is refused on CogVideoX's DPM scheduler, whose step goes on from an earlier prediction; the pipeline is left
as found."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidance import PAG, SLG, TPG, LangevinCorrector, SoftPAG, guide
from tests.factories import cogview3plus_call_kwargs, pipeline_snapshot, tiny_cogview3plus
from tests.family_checks import (
    assert_apg_equals_the_formula,
    assert_batched_equals_own_calls,
    assert_cfg_equals_the_pipelines_own,
    assert_slg_leaves_the_block_out,
    scheduler_x0,
)


@pytest.fixture(scope="module")
def pipe():
    return tiny_cogview3plus()


def call(pipe, **extra):
    return pipe(**cogview3plus_call_kwargs() | extra, generator=torch.Generator().manual_seed(0)).images


def test_cfg_equals_the_pipelines_own(pipe):
    assert_cfg_equals_the_pipelines_own(pipe, call)


def test_apg_equals_the_formula_on_the_recorded_branches(pipe):
    assert_apg_equals_the_formula(pipe, call, "cogview3plus", scheduler_x0(pipe))


@pytest.mark.parametrize(
    "method",
    [
        PAG(1.0),
        PAG(1.0, layers=("transformer_blocks.0",), joint="image"),
        SoftPAG(1.0, heads=(("transformer_blocks.1.attn1", 1),)),
        TPG(1.0),
        SLG(1.0, layers=(1,), start=0.0, stop=1.0),
    ],
    ids=["pag", "pag-image", "softpag", "tpg", "slg"],
)
def test_perturbations_batched_equal_their_own_calls(pipe, method):
    assert_batched_equals_own_calls(pipe, call, method)


def test_the_slg_weak_branch_is_the_denoiser_without_the_block(pipe):
    kwargs = cogview3plus_call_kwargs() | {"guidance_scale": 1.0}
    assert kwargs["prompt_embeds"].shape[1] == (32 // pipe.vae_scale_factor // 2) ** 2  # as many as image tokens
    assert_slg_leaves_the_block_out(pipe, kwargs, "transformer_blocks.0", "image_first")


def test_the_corrector_runs_on_ddim_and_is_refused_on_dpm(pipe):
    import diffusers

    with guide(pipe, PAG(1.0)):
        plain = call(pipe)
    with guide(pipe, PAG(1.0), LangevinCorrector()):
        corrected = call(pipe)
    assert np.isfinite(corrected).all() and np.abs(corrected - plain).max() > 1e-3
    before = pipeline_snapshot(pipe)
    ddim = pipe.scheduler
    pipe.scheduler = diffusers.CogVideoXDPMScheduler.from_config(ddim.config)
    try:
        with pytest.raises(ValueError, match="CogVideoXDPMScheduler is not supported with the Langevin corrector"):
            with guide(pipe, PAG(1.0), LangevinCorrector()):
                call(pipe)
        with guide(pipe, PAG(1.0)):  # without the corrector the DPM scheduler is served
            assert np.isfinite(call(pipe)).all()
    finally:
        pipe.scheduler = ddim
    assert pipeline_snapshot(pipe) == before
