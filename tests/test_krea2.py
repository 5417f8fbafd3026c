"""guide() on Krea 2: a separate unconditional call whenever ``guidance_scale > 0``, the pipeline's CFG
``c + s (c - u)``, single-stream blocks over [text, image] tokens with a key-padding mask on the text, one position
table for the batch.

CFG equals the pipeline's own (also on a checkpoint marked ``is_distilled``, which for Krea 2 only changes the
schedule); APG equals the formula on the recorded branches; the perturbations batched equal them as calls of their
own; TPG shuffles the real tokens only, so padded text cannot leak in; the pipeline is left as found."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidance import APG, CFG, PAG, SLG, TPG, SoftPAG, guide
from tests.factories import apg_reference, krea2_call_kwargs, pipeline_snapshot, recorded_run, tiny_krea2


@pytest.fixture(scope="module")
def pipe():
    return tiny_krea2()


def call(pipe, batch=1, tokens=(7, 12), **extra):
    kwargs = krea2_call_kwargs(batch, tokens) | extra
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("batch", [1, 2], ids=["one", "two_with_different_masks"])
def test_cfg_equals_the_pipelines_own(pipe, batch):
    own = call(pipe, batch, guidance_scale=3.0)
    assert np.abs(own - call(pipe, batch, guidance_scale=0.0)).max() > 1e-3, "CFG must change this tiny model's output"
    before = pipeline_snapshot(pipe)
    with guide(pipe, CFG(4.0)):  # the pipeline's c + 3 (c - u) is u + 4 (c - u)
        np.testing.assert_allclose(call(pipe, batch), own, atol=2e-6)
        np.testing.assert_allclose(call(pipe, batch, guidance_scale=0.0), own, atol=2e-6)
    with guide(pipe, PAG(2.0)):  # perturbations alone keep the pipeline's own CFG
        composed = call(pipe, batch, guidance_scale=3.0)
    with guide(pipe, CFG(4.0), PAG(2.0)):
        np.testing.assert_allclose(call(pipe, batch), composed, atol=2e-6)
    assert pipeline_snapshot(pipe) == before


def test_a_checkpoint_marked_distilled_keeps_its_cfg():
    """Krea 2's ``is_distilled`` fixes the schedule's shift; its pipeline still runs CFG (FLUX.2 klein's flag of
    the same name switches CFG off, and there CFG-type methods are refused)."""
    pipe = tiny_krea2()
    pipe.register_to_config(is_distilled=True)
    own = call(pipe, guidance_scale=3.0)
    with guide(pipe, CFG(4.0)):
        np.testing.assert_allclose(call(pipe), own, atol=2e-6)


def test_apg_equals_the_formula_on_the_recorded_branches(pipe):
    method = APG(6.0)  # x0 space with the auto norm threshold: depends on where in the schedule each step is

    def run():
        with guide(pipe, method):
            call(pipe)

    calls, steps = recorded_run(pipe, run)
    assert len(calls) == 2 * len(steps) == 6
    for ours, reference in zip(steps, apg_reference(pipe, method, calls, calls[0][0].shape[1])):
        torch.testing.assert_close(ours.float(), reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "method",
    [
        PAG(2.0),
        PAG(2.0, joint="image"),
        SoftPAG(2.0, heads=(("transformer_blocks.1.attn", 0),)),
        TPG(1.0),
        SLG(1.0, layers=(1,), start=0.0, stop=1.0),
    ],
    ids=["pag", "pag_image_only", "softpag", "tpg", "slg"],
)
def test_perturbations_batched_equal_their_own_calls(pipe, method):
    with guide(pipe, APG(4.0), method):
        batched = call(pipe, 2, (12, 5))
    with guide(pipe, APG(4.0), method, sequential=True):
        np.testing.assert_allclose(call(pipe, 2, (12, 5)), batched, atol=1e-5)
    with guide(pipe, APG(4.0)):
        assert np.abs(batched - call(pipe, 2, (12, 5))).max() > 1e-3


def test_tpg_shuffles_the_real_tokens_only(pipe):
    """The text's padding is a key-padding mask (B, 1, 1, L): whatever the padded embeddings hold, the pipeline's
    output does not change, and with TPG it still does not (a shuffle over every token would move them in)."""

    def padded_with(value, **extra):
        kwargs = krea2_call_kwargs(1, (9, 12))
        kwargs["prompt_embeds"][:, 9:] = value
        return pipe(**kwargs, **extra, generator=torch.Generator().manual_seed(0)).images

    np.testing.assert_array_equal(padded_with(0.0, guidance_scale=3.0), padded_with(5.0, guidance_scale=3.0))
    with guide(pipe, TPG(2.0)):
        shuffled = padded_with(0.0, guidance_scale=3.0)
        np.testing.assert_allclose(padded_with(5.0, guidance_scale=3.0), shuffled, atol=1e-6)
    assert np.abs(shuffled - padded_with(0.0, guidance_scale=3.0)).max() > 1e-3
