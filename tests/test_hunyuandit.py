"""guide() on HunyuanDiT (a CFG batch, learned sigma, BERT + T5 text): CFG equals the pipeline's own, CFG+PAG equals
diffusers' HunyuanDiTPAGPipeline, PAG alone and APG run, the pipeline is left as found."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidance import APG, CFG, PAG, guide
from tests.factories import hunyuandit_call_kwargs, pipeline_snapshot, tiny_hunyuandit
from tests.test_pipeline import assert_images_close


@pytest.fixture(scope="module")
def pipe():
    return tiny_hunyuandit()


def call(pipe, **extra):
    return pipe(**(hunyuandit_call_kwargs() | extra), generator=torch.Generator().manual_seed(0)).images


def test_cfg_equals_the_pipelines_own_and_apg_runs(pipe):
    before = pipeline_snapshot(pipe)
    own, unguided = call(pipe, guidance_scale=4.0), call(pipe, guidance_scale=1.0)
    assert np.abs(own - unguided).max() > 1e-4, "CFG must change this tiny model's output"
    rescaled = call(pipe, guidance_scale=4.0, guidance_rescale=0.7)
    with guide(pipe, CFG(4.0)):
        assert_images_close(call(pipe, guidance_scale=1.0), own, atol=1e-4)
        assert_images_close(call(pipe, guidance_rescale=0.7), rescaled, atol=1e-4)  # the pipeline's own rescale
    with guide(pipe, APG(4.0)):
        apg = call(pipe)
    assert np.isfinite(apg).all() and np.abs(apg - own).max() > 1e-5
    assert pipeline_snapshot(pipe) == before


def test_cfg_plus_pag_equals_diffusers_hunyuandit_pag_pipeline(pipe):
    """(diffusers' HunyuanDiTPAGPipeline fails with PAG alone, guidance_scale 1: its time ids keep the CFG batch
    size; PAG alone is checked to run and to change the output.)"""
    import diffusers

    cls = diffusers.HunyuanDiTPAGPipeline
    accepted = cls.__init__.__code__.co_varnames
    theirs = cls(**{k: v for k, v in pipe.components.items() if k in accepted}, pag_applied_layers=["blocks.1"])
    theirs.set_progress_bar_config(disable=True)
    expected = theirs(
        **hunyuandit_call_kwargs(), guidance_scale=4.0, pag_scale=3.0, generator=torch.Generator().manual_seed(0)
    ).images
    assert np.abs(expected - call(pipe, guidance_scale=4.0)).max() > 1e-4, "PAG must change the output"
    with guide(pipe, CFG(4.0), PAG(3.0, layers=("blocks.1",))):
        assert_images_close(call(pipe), expected, atol=1e-4)
    with guide(pipe, PAG(3.0, layers=("blocks.1",))):
        alone = call(pipe, guidance_scale=1.0)
    assert np.isfinite(alone).all() and np.abs(alone - call(pipe, guidance_scale=1.0)).max() > 1e-4


def test_the_controlnet_pipeline_cfg_equals_its_own_and_pag_acts():
    """(The pipeline samples the control image's latent from torch's global generator: seeded before each call.)"""
    pipe = tiny_hunyuandit(controlnet=True)
    control = {"control_image": torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))}

    def seeded(**extra):
        torch.manual_seed(1)
        return call(pipe, **extra)

    before = pipeline_snapshot(pipe)
    own = seeded(guidance_scale=4.0, **control)
    other = seeded(guidance_scale=4.0, control_image=torch.zeros(1, 3, 32, 32))
    assert np.abs(own - other).max() > 1e-4, "the control image must matter in this tiny ControlNet"
    with guide(pipe, CFG(4.0)):
        assert_images_close(seeded(guidance_scale=1.0, **control), own, atol=1e-4)
    with guide(pipe, CFG(4.0), PAG(3.0, layers=("blocks.1",))):  # the perturbed rows get the residuals too
        pag = seeded(**control)
    assert np.isfinite(pag).all() and np.abs(pag - own).max() > 1e-4
    assert pipeline_snapshot(pipe) == before
