"""guide() on FLUX Kontext and Kontext inpainting: the reference image's latent tokens follow the generated ones in
the transformer's input and the pipeline keeps only the generated part of the output. CFG equals the pipeline's own
true CFG; APG's per-sample norms and projections see the generated tokens only (against the formula on the
recorded branch outputs); perturbations compose; the corrector is refused with a reference image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidance import APG, CFG, PAG, LangevinCorrector, guide
from tests.factories import (
    assert_apg_acts_on_the_generated_tokens_only,
    kontext_call_kwargs,
    pipeline_snapshot,
    tiny_kontext,
)


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


def test_apg_acts_on_the_generated_tokens_only(pipe):
    assert_apg_acts_on_the_generated_tokens_only(pipe, lambda: call(pipe), control=1e-3)


def test_the_corrector_is_refused_with_a_reference_image(pipe):
    with (
        guide(pipe, LangevinCorrector(steps=1)),
        pytest.raises(ValueError, match="reference-image or condition tokens"),
    ):
        call(pipe, true_cfg_scale=1.0)


def test_guide_leaves_kontext_as_it_found_it(pipe):
    before = pipeline_snapshot(pipe)
    with guide(pipe, APG(4.0), PAG(1.0)):
        call(pipe)
    assert pipeline_snapshot(pipe) == before
