"""guide() on Chroma (text-to-image, img2img; diffusers 0.42's ChromaInpaintPipeline fails on its own, reading a
``guidance_embeds`` the Chroma transformer does not have): real CFG in a separate unconditional call that the
pipeline makes whenever ``guidance_scale > 1`` (an empty negative prompt unless given one), joint attention with the
text first. CFG equals the pipeline's own; APG runs; PAG batched equals sequential; PAG alone keeps the pipeline's
own CFG; the pipeline is left as found."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidance import APG, CFG, PAG, guide
from tests.factories import IMAGE_SIZE, PROMPT, pipeline_snapshot, random_image, tiny_chroma


@pytest.fixture(scope="module", params=["", "img2img"], ids=["t2i", "img2img"])
def pipe(request):
    return tiny_chroma(request.param)


def call(pipe, **extra):
    kwargs = {"prompt": PROMPT, "height": IMAGE_SIZE, "width": IMAGE_SIZE, "num_inference_steps": 3}
    kwargs |= {"output_type": "np", "max_sequence_length": 64}
    name = type(pipe).__name__
    if name != "ChromaPipeline":
        kwargs |= {"image": random_image(IMAGE_SIZE), "strength": 0.99, "num_inference_steps": 4}
    return pipe(**(kwargs | extra), generator=torch.Generator().manual_seed(0)).images


def test_cfg_equals_the_pipelines_own_and_apg_runs(pipe):
    own, unguided = call(pipe, guidance_scale=4.0), call(pipe, guidance_scale=1.0)
    assert np.abs(own - unguided).max() > 1e-4, "CFG must change this tiny model's output"
    with guide(pipe, CFG(4.0)):
        np.testing.assert_allclose(call(pipe, guidance_scale=1.0), own, atol=2e-5)  # the branch is switched on
    with guide(pipe, APG(4.0)):
        apg = call(pipe)
    assert np.isfinite(apg).all() and np.abs(apg - own).max() > 1e-5


def test_pag_composes_batched_or_sequential_and_keeps_the_pipelines_cfg(pipe):
    before = pipeline_snapshot(pipe)
    with guide(pipe, CFG(4.0), PAG(2.0)):
        explicit = call(pipe)
    with guide(pipe, PAG(2.0)):  # perturbation only: the pipeline's own CFG 4 stays and composes
        np.testing.assert_allclose(call(pipe, guidance_scale=4.0), explicit, atol=2e-5)
    with guide(pipe, CFG(4.0), PAG(2.0), sequential=True):
        np.testing.assert_allclose(call(pipe), explicit, atol=2e-5)
    assert np.abs(explicit - call(pipe, guidance_scale=4.0)).max() > 1e-5
    assert pipeline_snapshot(pipe) == before
