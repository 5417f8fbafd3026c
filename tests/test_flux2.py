"""guide() on FLUX.2: klein's real CFG in a separate call (CFG equals the pipeline's own; perturbations batched
equal them run as calls of their own; with a reference image APG acts on the generated tokens only, against the
formula on the recorded branches), FLUX.2 [dev] and distilled klein with perturbation guidance only (CFG refused
with the reason), the pipelines left as found."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidance import CFG, PAG, SLG, TPG, guide
from tests.factories import (
    assert_apg_acts_on_the_generated_tokens_only,
    flux2_call_kwargs,
    pipeline_snapshot,
    tiny_flux2,
)


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def klein():
    return tiny_flux2(klein=True)


def call(pipe, image=False, **extra):
    return pipe(**(flux2_call_kwargs(pipe, image) | extra), generator=gen()).images


@pytest.mark.parametrize("image", [False, True], ids=["text_only", "with_reference"])
def test_klein_cfg_equals_its_own_and_perturbations_compose(klein, image):
    own, unguided = call(klein, image, guidance_scale=6.0), call(klein, image, guidance_scale=1.0)
    before = pipeline_snapshot(klein)  # after a call: klein's cache_context adds a hook registry
    assert np.abs(own - unguided).max() > 1e-4, "CFG must change this tiny model's output"
    with guide(klein, CFG(6.0)):
        np.testing.assert_allclose(call(klein, image), own, atol=2e-5)
    with guide(klein, CFG(6.0), PAG(3.0, joint="image"), TPG(1.0)):
        mixed = call(klein, image)
    assert np.isfinite(mixed).all() and np.abs(mixed - own).max() > 1e-5
    with guide(klein, CFG(6.0), PAG(3.0, joint="image"), TPG(1.0), sequential=True):
        np.testing.assert_allclose(call(klein, image), mixed, atol=2e-5)
    assert pipeline_snapshot(klein) == before


def test_apg_acts_on_the_generated_tokens_only(klein):
    assert_apg_acts_on_the_generated_tokens_only(klein, lambda: call(klein, image=True), control=1e-4)


@pytest.mark.parametrize("kind", ["dev", "klein_distilled"])
def test_guidance_distilled_flux2_gets_perturbation_guidance_only(kind):
    pipe = tiny_flux2(klein=False) if kind == "dev" else tiny_flux2(klein=True, distilled=True)
    plain = call(pipe)
    before = pipeline_snapshot(pipe)
    with guide(pipe, PAG(3.0), SLG(2.0, layers=(0,), start=0.0, stop=1.0)):
        weak = call(pipe)
    with guide(pipe, PAG(3.0), SLG(2.0, layers=(0,), start=0.0, stop=1.0), sequential=True):
        np.testing.assert_allclose(call(pipe), weak, atol=2e-5)
    assert np.abs(weak - plain).max() > 1e-4
    with pytest.raises(ValueError, match=r"no unconditional branch|guidance-distilled"):
        with guide(pipe, CFG(4.0)):
            call(pipe)
    assert pipeline_snapshot(pipe) == before


def test_klein_inpainting_cfg_equals_its_own_and_apg_acts_on_the_generated_tokens():
    pipe = tiny_flux2(inpaint=True)
    own, unguided = call(pipe, guidance_scale=6.0), call(pipe, guidance_scale=1.0)
    assert np.abs(own - unguided).max() > 1e-4, "CFG must change this tiny model's output"
    with guide(pipe, CFG(6.0)):
        np.testing.assert_allclose(call(pipe), own, atol=2e-5)
    assert_apg_acts_on_the_generated_tokens_only(pipe, lambda: call(pipe), control=2e-4)
