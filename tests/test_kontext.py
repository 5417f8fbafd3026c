"""guide() on FLUX Kontext and Kontext inpainting: the reference image's latent tokens follow the generated ones in
the transformer's input and the pipeline keeps only the generated part of the output. CFG equals the pipeline's own
true CFG; APG's per-sample norms and projections see the generated tokens only (against the formula on the
recorded branch outputs); perturbations compose; the corrector is refused with a reference image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidance import APG, CFG, PAG, LangevinCorrector, guide
from tests.factories import apg_reference, kontext_call_kwargs, pipeline_snapshot, recorded_run, tiny_kontext


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module", params=[False, True], ids=["kontext", "kontext_inpaint"])
def pipe(request):
    return tiny_kontext(inpaint=request.param)


def call(pipe, reference=True, **extra):
    kwargs = kontext_call_kwargs(pipe, reference) | {"negative_prompt": ""} | extra
    return pipe(**kwargs, generator=gen()).images


@pytest.mark.parametrize("reference", [True, False], ids=["with_reference", "text_only"])
def test_cfg_equals_kontexts_own_true_cfg(pipe, reference):
    own, unguided = call(pipe, reference, true_cfg_scale=4.0), call(pipe, reference, true_cfg_scale=1.0)
    assert np.abs(own - unguided).max() > 1e-4, "true CFG must change this tiny model's output"
    with guide(pipe, CFG(4.0)):
        np.testing.assert_allclose(call(pipe, reference), own, atol=2e-5)
    with guide(pipe, CFG(4.0), PAG(2.0)):
        pag = call(pipe, reference)
    assert np.isfinite(pag).all() and np.abs(pag - own).max() > 1e-5
    with guide(pipe, CFG(4.0), PAG(2.0), sequential=True):  # the perturbed branch in a call of its own
        np.testing.assert_allclose(call(pipe, reference), pag, atol=2e-5)


def _recorded_apg_run(pipe, method):
    """Run ``pipe`` under ``guide(pipe, method)``, recording each transformer call's input, timestep and raw output,
    and the prediction each scheduler step receives (the pipeline's own CFG of the outputs it was handed)."""

    def run():
        with guide(pipe, method):
            call(pipe)

    return recorded_run(pipe, run)


def test_apg_acts_on_the_generated_tokens_only(pipe):
    method = APG(6.0)  # the auto norm threshold and the paper's momentum: both per sample, over its tokens
    calls, steps = _recorded_apg_run(pipe, method)
    generated = steps[0].shape[1]
    assert len(calls) == 2 * len(steps) and calls[0][0].shape[1] > generated  # reference tokens follow
    for ours, reference in zip(steps, apg_reference(pipe, method, calls, generated)):
        torch.testing.assert_close(ours.float(), reference, rtol=1e-4, atol=1e-5)
    # the control: the same formula over every token (reference tokens included) gives another guidance
    everything = apg_reference(pipe, method, calls, calls[0][0].shape[1])
    assert max((e[:, :generated] - s).abs().max().item() for e, s in zip(everything, steps)) > 1e-3


def test_the_corrector_is_refused_with_a_reference_image(pipe):
    with guide(pipe, LangevinCorrector(steps=1)), pytest.raises(ValueError, match="reference-image tokens"):
        call(pipe, true_cfg_scale=1.0)


def test_guide_leaves_kontext_as_it_found_it(pipe):
    before = pipeline_snapshot(pipe)
    with guide(pipe, APG(4.0), PAG(1.0)):
        call(pipe)
    assert pipeline_snapshot(pipe) == before
