"""guide() on Qwen-Image (text-to-image, img2img, inpainting): true CFG in a separate unconditional call, joint
attention with the text first. CFG equals the pipeline's own true CFG (the pipeline's rescaling of the combined
prediction to the conditional one's norm per token stays, for every method); APG and perturbations run, batched
equals sequential; true CFG needs the negative embeddings; the pipeline is left as found."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidance import APG, CFG, PAG, SoftPAG, guide
from tests.factories import pipeline_snapshot, qwen_call_kwargs, tiny_qwen


@pytest.fixture(scope="module", params=["", "img2img", "inpaint"], ids=["t2i", "img2img", "inpaint"])
def pipe(request):
    return tiny_qwen(request.param)


def call(pipe, negative=True, **extra):
    kwargs = qwen_call_kwargs(pipe, negative) | extra
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images


def test_cfg_equals_the_pipelines_own_true_cfg(pipe):
    own, unguided = call(pipe, true_cfg_scale=4.0), call(pipe, true_cfg_scale=1.0)
    assert np.abs(own - unguided).max() > 1e-4, "true CFG must change this tiny model's output"
    with guide(pipe, CFG(4.0)):
        np.testing.assert_allclose(call(pipe), own, atol=2e-5)
    with guide(pipe, APG(4.0)):
        apg = call(pipe)
    assert np.isfinite(apg).all() and np.abs(apg - own).max() > 1e-5


def test_perturbations_compose_with_true_cfg_batched_or_sequential(pipe):
    own = call(pipe, true_cfg_scale=4.0)
    with guide(pipe, CFG(4.0), PAG(2.0)):
        batched = call(pipe)
    assert np.isfinite(batched).all() and np.abs(batched - own).max() > 1e-5
    with guide(pipe, CFG(4.0), PAG(2.0), sequential=True):
        np.testing.assert_allclose(call(pipe), batched, atol=2e-5)
    with guide(pipe, SoftPAG(2.0, heads=[(0, 0)], strength=1.0)):  # no true CFG: the perturbation alone
        soft = call(pipe, negative=False)
    assert np.abs(soft - call(pipe, negative=False)).max() > 1e-5


def test_true_cfg_needs_the_negative_embeddings_and_leaves_the_pipeline_as_found(pipe):
    before = pipeline_snapshot(pipe)
    with guide(pipe, CFG(4.0)), pytest.raises(ValueError, match="pass negative_prompt_embeds too"):
        call(pipe, negative=False)
    assert pipeline_snapshot(pipe) == before
