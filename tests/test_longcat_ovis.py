"""guide() on LongCat-Image, LongCat-Image Edit and Ovis-Image: FLUX-style double and single blocks over [text, image]
tokens, a separate unconditional call with an empty negative prompt unless given one; LongCat-Image then renormalises
the result per token to the conditional prediction's norm (optional); the Edit pipeline's reference-image tokens
follow the generated ones, marked by the position ids' first coordinate (2 after the generated tokens' 1).

CFG equals the pipeline's own (with and without its renormalisation); APG equals the formula on the recorded
branches, on the generated tokens only with a reference image; the perturbations batched equal them as calls of
their own; the pipeline is left as found."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidance import APG, CFG, PAG, SLG, TPG, LangevinCorrector, SoftPAG, guide
from tests.factories import (
    apg_reference,
    assert_apg_acts_on_the_generated_tokens_only,
    longcat_ovis_call_kwargs,
    pipeline_snapshot,
    recorded_run,
    tiny_longcat,
    tiny_ovis,
)


@pytest.fixture(scope="module", params=["longcat", "ovis"])
def pipe(request):
    return tiny_longcat() if request.param == "longcat" else tiny_ovis()


@pytest.fixture(scope="module")
def longcat():
    return tiny_longcat()


@pytest.fixture(scope="module")
def edit():
    return tiny_longcat(edit=True)


def call(pipe, batch=1, **extra):
    kwargs = longcat_ovis_call_kwargs(pipe, batch) | extra
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images


def test_cfg_equals_the_pipelines_own(pipe):
    check_cfg(pipe)


@pytest.mark.parametrize("renorm", [{"cfg_renorm_min": 0.5}, {"enable_cfg_renorm": False}])
def test_longcat_cfg_equals_its_own_with_and_without_its_renormalisation(longcat, renorm):
    check_cfg(longcat, **renorm)


def check_cfg(pipe, **renorm):
    own = call(pipe, 2, guidance_scale=4.0, **renorm)
    assert np.abs(own - call(pipe, 2, guidance_scale=1.0)).max() > 1e-3, "CFG must change this tiny model's output"
    before = pipeline_snapshot(pipe)
    with guide(pipe, CFG(4.0)):
        np.testing.assert_allclose(call(pipe, 2, guidance_scale=1.0, **renorm), own, atol=5e-5)
    assert pipeline_snapshot(pipe) == before


def test_the_renormalisation_acts_on_the_guided_prediction(longcat):
    """The pipeline scales the guided prediction down, per token, to the conditional one's norm: under guide() it
    reads the true conditional output, so APG with and without it differ as the pipeline's own CFG does."""
    with guide(longcat, APG(4.0)):
        renormed, plain = call(longcat, cfg_renorm_min=0.0), call(longcat, enable_cfg_renorm=False)
    assert np.abs(renormed - plain).max() > 1e-3


def test_apg_equals_the_formula_on_the_recorded_branches(pipe):
    method = APG(6.0)  # x0 space with the auto norm threshold: depends on where in the schedule each step is

    plain = {"enable_cfg_renorm": False} if type(pipe).__name__ == "LongCatImagePipeline" else {}  # the formula

    def run():
        with guide(pipe, method):
            call(pipe, **plain)

    calls, steps = recorded_run(pipe, run)
    assert len(calls) == 2 * len(steps) == 6
    for ours, reference in zip(steps, apg_reference(pipe, method, calls, calls[0][0].shape[1])):
        torch.testing.assert_close(ours.float(), reference, rtol=1e-4, atol=1e-5)


def test_edit_cfg_equals_the_pipelines_own(edit):
    own = call(edit, 2, guidance_scale=4.0)
    assert np.abs(own - call(edit, 2, guidance_scale=1.0)).max() > 1e-3
    with guide(edit, CFG(4.0)):
        np.testing.assert_allclose(call(edit, 2, guidance_scale=1.0), own, atol=5e-5)
    with guide(edit, CFG(4.0), PAG(1.0)):
        batched = call(edit, 2)
    with guide(edit, CFG(4.0), PAG(1.0), sequential=True):
        np.testing.assert_allclose(call(edit, 2), batched, atol=5e-5)
    assert np.abs(batched - own).max() > 1e-3


def test_edit_apg_acts_on_the_generated_tokens_only(edit):
    assert_apg_acts_on_the_generated_tokens_only(edit, lambda: call(edit), control=1e-3)


@pytest.mark.parametrize(
    "method",
    [
        PAG(1.0),
        PAG(1.0, joint="image"),
        SoftPAG(1.0, heads=(("single_transformer_blocks.0.attn", 1),)),
        TPG(1.0),
        SLG(1.0, layers=(1,), start=0.0, stop=1.0),
    ],
    ids=["pag", "pag_image_only", "softpag", "tpg", "slg"],
)
def test_perturbations_batched_equal_their_own_calls(pipe, method):
    with guide(pipe, APG(4.0), method):
        batched = call(pipe, 2)
    with guide(pipe, APG(4.0), method, sequential=True):
        np.testing.assert_allclose(call(pipe, 2), batched, atol=5e-5)
    with guide(pipe, APG(4.0)):
        assert np.abs(batched - call(pipe, 2)).max() > 1e-3


def test_the_corrector_is_refused(pipe, edit):
    for target in (pipe, edit):  # a separate unconditional call; reference-image tokens
        with guide(target, LangevinCorrector(steps=1)), pytest.raises(ValueError):
            call(target, guidance_scale=4.0)
