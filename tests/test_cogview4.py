"""guide() on CogView4 (a separate unconditional call; joint attention with the text first; blocks that return the
image stream first): CFG equals the pipeline's own, perturbations batched equal them as calls of their own, SLG
leaves the block out whatever order its outputs come in (against the denoiser run without the block), the
pipeline is left as found."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidance import APG, CFG, PAG, SLG, TPG, guide
from tests.factories import cogview4_call_kwargs, pipeline_snapshot, tiny_cogview4


@pytest.fixture(scope="module")
def pipe():
    return tiny_cogview4()


def call(pipe, tokens=16, **extra):
    return pipe(**(cogview4_call_kwargs(tokens) | extra), generator=torch.Generator().manual_seed(0)).images


def test_cfg_equals_the_pipelines_own_and_perturbations_compose(pipe):
    own, unguided = call(pipe, guidance_scale=4.0), call(pipe, guidance_scale=1.0)
    before = pipeline_snapshot(pipe)  # after a call: CogView4's cache_context adds a hook registry
    assert np.abs(own - unguided).max() > 1e-4, "CFG must change this tiny model's output"
    with guide(pipe, CFG(4.0)):
        np.testing.assert_allclose(call(pipe), own, atol=2e-5)
    with guide(pipe, APG(4.0), PAG(2.0, joint="image"), TPG(1.0)):
        mixed = call(pipe)
    with guide(pipe, APG(4.0), PAG(2.0, joint="image"), TPG(1.0), sequential=True):
        np.testing.assert_allclose(call(pipe), mixed, atol=2e-5)
    assert np.isfinite(mixed).all() and np.abs(mixed - own).max() > 1e-4
    assert pipeline_snapshot(pipe) == before


@pytest.mark.parametrize("tokens", [16, 64], ids=["order_from_shapes", "order_from_the_block_class"])
def test_slg_leaves_the_block_out_whatever_order_its_outputs_come_in(pipe, tokens):
    with guide(pipe, SLG(2.0, layers=(1,), start=0.0, stop=1.0)):
        ours = call(pipe, tokens, guidance_scale=1.0)
    # the reference: a transformer returning c + 2 (c - c'), c' computed with block 1 returning its inputs
    transformer, block = pipe.transformer, pipe.transformer.transformer_blocks[1]
    own_forward = transformer.forward

    def guided_forward(*args, **kwargs):
        cond = own_forward(*args, **kwargs)[0]
        block.forward = lambda hidden_states, encoder_hidden_states, *a, **k: (hidden_states, encoder_hidden_states)
        try:
            weak = own_forward(*args, **kwargs)[0]
        finally:
            del block.forward
        return (cond + 2.0 * (cond - weak),)

    transformer.forward = guided_forward
    try:
        expected = call(pipe, tokens, guidance_scale=1.0)
    finally:
        del transformer.forward
    assert np.abs(expected - call(pipe, tokens, guidance_scale=1.0)).max() > 1e-4, "SLG must change the output"
    np.testing.assert_allclose(ours, expected, atol=2e-5)
