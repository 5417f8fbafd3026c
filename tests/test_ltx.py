"""guide() on LTX-Video text-to-video: one batched CFG call (the unconditional half first) over packed video tokens
``(B, N, C)``; blocks of self-attention (``attn1``) and cross-attention (``attn2``), whose attention modules do not
say which is which; flow matching with the scheduler's timestep.

CFG equals the pipeline's own, with and without its ``guidance_rescale``; APG equals the formula on the recorded
branches; the perturbations batched equal them as calls of their own; PAG defaults to the middle block's ``attn1``
and never takes an ``attn2``; SLG's weak branch is the denoiser without the block; the Langevin corrector runs; the
pipeline is left as found. The tiny pipeline returns its latents (the tiny LTX VAE decodes slowly)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidance import PAG, SLG, TPG, LangevinCorrector, SoftPAG, guide
from guidance.layers import self_attention_layers
from tests.factories import ltx_call_kwargs, tiny_ltx
from tests.family_checks import (
    assert_apg_equals_the_formula,
    assert_batched_equals_own_calls,
    assert_cfg_equals_the_pipelines_own,
    assert_slg_leaves_the_block_out,
    scheduler_x0,
)


@pytest.fixture(scope="module")
def pipe():
    return tiny_ltx()


def call(pipe, **extra):
    return pipe(**ltx_call_kwargs() | extra, generator=torch.Generator().manual_seed(0)).frames.numpy()


def test_cfg_equals_the_pipelines_own(pipe):
    assert_cfg_equals_the_pipelines_own(pipe, call, atol=1e-5)
    own = call(pipe, guidance_scale=4.0, guidance_rescale=0.7)
    assert np.abs(own - call(pipe, guidance_scale=4.0)).max() > 1e-3
    with guide(pipe, PAG(0.0)):  # the pipeline's rescale reads the true conditional half
        np.testing.assert_allclose(call(pipe, guidance_scale=4.0, guidance_rescale=0.7), own, atol=1e-5)


def test_apg_equals_the_formula_on_the_recorded_branches(pipe):
    assert_apg_equals_the_formula(pipe, call, "ltx", scheduler_x0(pipe))


@pytest.mark.parametrize(
    "method",
    [
        PAG(1.0),
        SoftPAG(1.0, heads=(("transformer_blocks.0.attn1", 1),)),
        TPG(1.0),
        SLG(1.0, layers=(1,), start=0.0, stop=1.0),
    ],
    ids=["pag", "softpag", "tpg", "slg"],
)
def test_perturbations_batched_equal_their_own_calls(pipe, method):
    assert_batched_equals_own_calls(pipe, call, method, atol=1e-5)


def test_pag_defaults_to_the_middle_self_attention_and_never_takes_a_cross_attention(pipe):
    assert list(PAG(2.0).edits(pipe.transformer)) == ["transformer_blocks.1.attn1"]
    assert list(PAG(2.0, layers=("transformer_blocks.0",)).edits(pipe.transformer)) == ["transformer_blocks.0.attn1"]
    assert not [name for name in self_attention_layers(pipe.transformer) if name.endswith("attn2")]


def test_the_slg_weak_branch_is_the_denoiser_without_the_block(pipe):
    assert_slg_leaves_the_block_out(pipe, ltx_call_kwargs() | {"guidance_scale": 1.0}, "transformer_blocks.0", None)


def test_the_corrector_runs(pipe):
    with guide(pipe, PAG(1.0)):
        plain = call(pipe)
    with guide(pipe, PAG(1.0), LangevinCorrector()):
        corrected = call(pipe)
    assert np.isfinite(corrected).all() and np.abs(corrected - plain).max() > 1e-3
