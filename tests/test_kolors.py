"""guide() on Kolors (an SDXL UNet with projected ChatGLM text): CFG equals the pipeline's own, CFG+PAG and PAG alone
equal diffusers' KolorsPAGPipeline, APG runs, the pipeline is left as found."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidance import APG, CFG, PAG, guide
from tests.factories import kolors_call_kwargs, pipeline_snapshot, tiny_kolors
from tests.test_pipeline import assert_images_close


def call(pipe, **extra):
    return pipe(**(kolors_call_kwargs() | extra), generator=torch.Generator().manual_seed(0)).images


def test_cfg_equals_the_pipelines_own_and_apg_runs():
    pipe = tiny_kolors()
    before = pipeline_snapshot(pipe)
    own, unguided = call(pipe, guidance_scale=4.0), call(pipe, guidance_scale=1.0)
    assert np.abs(own - unguided).max() > 1e-4, "CFG must change this tiny model's output"
    with guide(pipe, CFG(4.0)):
        assert_images_close(call(pipe, guidance_scale=1.0), own, atol=1e-4)
    with guide(pipe, APG(4.0)):
        apg = call(pipe)
    assert np.isfinite(apg).all() and np.abs(apg - own).max() > 1e-5
    assert pipeline_snapshot(pipe) == before


@pytest.mark.parametrize("scale", [4.0, 1.0], ids=["with_cfg", "pag_alone"])
def test_pag_equals_diffusers_kolors_pag_pipeline(scale):
    import diffusers

    pipe = tiny_kolors()
    cls = diffusers.KolorsPAGPipeline
    accepted = cls.__init__.__code__.co_varnames
    theirs = cls(**{k: v for k, v in pipe.components.items() if k in accepted}, pag_applied_layers=["mid"])
    theirs.set_progress_bar_config(disable=True)
    kwargs = kolors_call_kwargs() | {"guidance_scale": scale}
    expected = theirs(**kwargs, pag_scale=3.0, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(expected - call(pipe, guidance_scale=scale)).max() > 1e-4, "PAG must change the output"
    methods = (CFG(4.0), PAG(3.0, layers=("mid",))) if scale > 1 else (PAG(3.0, layers=("mid",)),)
    with guide(pipe, *methods):
        assert_images_close(call(pipe, guidance_scale=scale), expected, atol=1e-4)


def _kolors_img2img():
    """Kolors img2img on the tiny Kolors parts. diffusers' KolorsImg2ImgPipeline drops the pooled embeddings it is
    given (it encodes the prompt itself), and there is no tiny ChatGLM: ``encode_prompt`` is replaced on the instance
    by one returning :func:`kolors_call_kwargs`' embeddings, as a text encoder would."""
    import diffusers

    pipe = diffusers.KolorsImg2ImgPipeline(**tiny_kolors().components)
    pipe.set_progress_bar_config(disable=True)
    given = kolors_call_kwargs()

    def encode_prompt(*args, num_images_per_prompt=1, do_classifier_free_guidance=True, **kwargs):
        names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
        return tuple(given[n].repeat_interleave(num_images_per_prompt, 0) for n in names)

    pipe.encode_prompt = encode_prompt
    return pipe


def call_img2img(pipe, **extra):
    kwargs = {k: v for k, v in kolors_call_kwargs().items() if "embeds" not in k and k not in ("height", "width")}
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    kwargs |= {"image": image, "strength": 0.7, "prompt": "a cat"}  # encoded by the stand-in above
    return pipe(**(kwargs | extra), generator=torch.Generator().manual_seed(0)).images


def test_kolors_img2img_cfg_equals_the_pipelines_own_and_pag_acts():
    pipe = _kolors_img2img()
    before = pipeline_snapshot(pipe)
    own, unguided = call_img2img(pipe, guidance_scale=4.0), call_img2img(pipe, guidance_scale=1.0)
    assert np.abs(own - unguided).max() > 1e-4, "CFG must change this tiny model's output"
    with guide(pipe, CFG(4.0)):
        assert_images_close(call_img2img(pipe, guidance_scale=1.0), own, atol=1e-4)
    with guide(pipe, CFG(4.0), PAG(3.0, layers=("mid",))):
        pag = call_img2img(pipe)
    assert np.isfinite(pag).all() and np.abs(pag - own).max() > 1e-4
    assert pipeline_snapshot(pipe) == before
