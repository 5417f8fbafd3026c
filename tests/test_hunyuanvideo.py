"""guide() on HunyuanVideo text-to-video: a conditional denoiser call, then an unconditional one when
``true_cfg_scale`` > 1 and a negative prompt is given (its ``guidance_scale`` is an embedded guidance); double and
single blocks over [video, text] that pass the text beside the video to their attention and return the video stream
first.

CFG equals the pipeline's true CFG; APG equals the formula on the recorded branches; the perturbations batched equal
them as calls of their own (``PAG(joint="image")`` with the text's padding mask); SLG's weak branch is the denoiser
without the block, double or single, when text and video have as many tokens; the Langevin corrector runs without
true CFG and is refused with it; the pipeline is left as found. The tiny pipeline returns its latents.

Image-to-video, with the image's latents and a mask after the latents' channels (``latent_concat``) or as the first
latent frame, which the pipeline does not step (``token_replace``): CFG equals the pipeline's true CFG, APG the
formula on the recorded calls (on the generated channels; on the frames after the image's), PAG batched equals its
own calls."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidance import CFG, PAG, SLG, TPG, LangevinCorrector, SoftPAG, guide
from tests.factories import IMAGE_SIZE, hunyuanvideo_call_kwargs, pipeline_snapshot, random_image, tiny_hunyuanvideo
from tests.family_checks import (
    assert_apg_equals_the_formula,
    assert_batched_equals_own_calls,
    assert_cfg_equals_the_pipelines_own,
    assert_slg_leaves_the_block_out,
    scheduler_x0,
)


@pytest.fixture(scope="module")
def pipe():
    return tiny_hunyuanvideo()


def call(pipe, **extra):
    return pipe(**hunyuanvideo_call_kwargs() | extra, generator=torch.Generator().manual_seed(0)).frames.numpy()


def test_cfg_equals_the_pipelines_true_cfg(pipe):
    own = call(pipe, true_cfg_scale=4.0)
    assert np.abs(own - call(pipe, true_cfg_scale=1.0)).max() > 1e-3
    before = pipeline_snapshot(pipe)
    with guide(pipe, CFG(4.0)):
        np.testing.assert_allclose(call(pipe), own, atol=1e-5)
    with guide(pipe, PAG(1.0)):  # a perturbation alone keeps the pipeline's true CFG
        composed = call(pipe, true_cfg_scale=4.0)
    with guide(pipe, CFG(4.0), PAG(1.0)):
        np.testing.assert_allclose(call(pipe), composed, atol=1e-5)
    assert np.abs(composed - own).max() > 1e-3
    assert pipeline_snapshot(pipe) == before


def test_apg_equals_the_formula_on_the_recorded_branches(pipe):
    assert_apg_equals_the_formula(pipe, call, "hunyuanvideo", scheduler_x0(pipe), sequential=True)


@pytest.mark.parametrize(
    "method",
    [
        PAG(1.0),
        PAG(1.0, layers=("single_transformer_blocks.0",), joint="image"),
        SoftPAG(1.0, heads=(("transformer_blocks.0.attn", 1),)),
        TPG(1.0),
        SLG(1.0, layers=(1,), start=0.0, stop=1.0),
    ],
    ids=["pag", "pag-image", "softpag", "tpg", "slg"],
)
def test_perturbations_batched_equal_their_own_calls(pipe, method):
    assert_batched_equals_own_calls(pipe, call, method, atol=1e-5)


@pytest.mark.parametrize("block", ["transformer_blocks.0", "single_transformer_blocks.0"])
def test_the_slg_weak_branch_is_the_denoiser_without_the_block(pipe, block):
    """48 text tokens, as many as the video's 3 latent frames of 4x4: the blocks' output pairs cannot be told
    apart by shape."""
    kwargs = hunyuanvideo_call_kwargs(tokens=48)
    assert_slg_leaves_the_block_out(pipe, kwargs, block, "image_first")


def test_the_corrector_runs_without_true_cfg_and_is_refused_with_it(pipe):
    with guide(pipe, PAG(1.0)):
        plain = call(pipe)
    with guide(pipe, PAG(1.0), LangevinCorrector()):
        corrected = call(pipe)
    assert np.isfinite(corrected).all() and np.abs(corrected - plain).max() > 1e-3
    with pytest.raises(ValueError, match="needs every branch in one denoiser call"):
        with guide(pipe, PAG(1.0), LangevinCorrector()):
            call(pipe, true_cfg_scale=4.0)


@pytest.fixture(scope="module", params=["latent_concat", "token_replace"])
def i2v(request):
    return tiny_hunyuanvideo(image=request.param)


def call_i2v(pipe, guidance_scale=None, **extra):
    """One prompt (the pipeline repeats its one image per prompt only through num_videos_per_prompt)."""
    kwargs = hunyuanvideo_call_kwargs(batch=1) | {"image": random_image(IMAGE_SIZE, seed=11)} | extra
    if guidance_scale is not None:
        kwargs["true_cfg_scale"] = guidance_scale
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames.numpy()


def test_image_to_video_cfg_and_apg(i2v):
    assert_cfg_equals_the_pipelines_own(i2v, call_i2v, atol=1e-5)
    replaced = i2v.transformer.config.image_condition_type == "token_replace"

    def stepped(x, t, prediction):  # token_replace steps frames 1:, the first frame's prediction unknown
        first = torch.full_like(prediction[:, :, :1], float("nan"))
        return torch.cat([first, prediction], dim=2) if replaced else prediction

    assert_apg_equals_the_formula(
        i2v,
        call_i2v,
        "hunyuanvideo",
        scheduler_x0(i2v),
        stepped,
        sequential=True,
        latents=lambda x: x[:, :4],
        generated=(2, slice(1, None)) if replaced else None,
    )


def test_image_to_video_pag_batched_equals_its_own_calls(i2v):
    assert_batched_equals_own_calls(i2v, call_i2v, PAG(1.0), atol=1e-5)
