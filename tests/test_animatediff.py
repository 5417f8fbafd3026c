"""guide() on AnimateDiff: one batched CFG call (the unconditional half first) of a UNet with motion modules on
latents ``(B, C, F, H, W)``. The UNet folds the frames into its batch (its spatial layers see ``B F`` rows, its motion
modules ``B H W``), and the pipeline repeats the prompt embeddings per frame (ControlNet's residuals are per frame
too): the perturbed branches must find their rows in every layout.

CFG equals the pipeline's own (text- and video-to-video, ControlNet, SDXL with its ``guidance_rescale``); CFG + PAG
equals diffusers' AnimateDiff PAG pipeline; APG equals the formula on the recorded branches; every perturbation
batched equals it run as calls of its own, on two prompts; the defaults perturb spatial layers, not motion
modules; FreeNoise is served, FreeInit and FreeNoise's split inference are refused; the corrector runs. Each of
the six pipelines is run: text- and video-to-video, ControlNet on both, SparseCtrl, SDXL."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

from guidance import APG, CFG, PAG, SLG, TPG, LangevinCorrector, SoftPAG, guide
from guidance.engine import module_rows
from tests.factories import animatediff_call_kwargs, tiny_animatediff
from tests.family_checks import (
    assert_apg_equals_the_formula,
    assert_batched_equals_own_calls,
    assert_cfg_equals_the_pipelines_own,
    scheduler_x0,
)


@pytest.fixture(scope="module")
def pipe():
    return tiny_animatediff()


def call(pipe, batch=2, **extra):
    kwargs = animatediff_call_kwargs(pipe, batch=batch) | extra
    torch.manual_seed(0)  # SparseCtrl samples its VAE latents from the global generator
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames


KINDS = ["video2video", "controlnet", "video2video-controlnet", "sparsectrl", "sdxl"]
ONE_PROMPT = ("controlnet", "video2video-controlnet")  # diffusers' AnimateDiff ControlNet pipelines


@pytest.mark.parametrize("kind", ["", *KINDS])
def test_cfg_equals_the_pipelines_own(kind, pipe):
    pipe = pipe if kind == "" else tiny_animatediff(kind)
    batch = 1 if kind in ONE_PROMPT else 2
    assert_cfg_equals_the_pipelines_own(pipe, lambda p, **extra: call(p, batch, **extra), atol=1e-5)
    if kind == "sdxl":  # the pipeline's rescale reads the true conditional half
        own = call(pipe, guidance_scale=4.0, guidance_rescale=0.7)
        assert np.abs(own - call(pipe, guidance_scale=4.0)).max() > 1e-3
        with guide(pipe, PAG(0.0)):
            np.testing.assert_allclose(call(pipe, guidance_scale=4.0, guidance_rescale=0.7), own, atol=1e-5)


def test_cfg_plus_pag_equals_the_diffusers_animatediff_pag_pipeline(pipe):
    """diffusers' pattern ``mid_block.*attn1`` takes the spatial and the temporal self-attention of the middle
    block: the identity acts on each frame's spatial tokens and on each pixel's frames."""
    names = diffusers.AnimateDiffPAGPipeline.__init__.__code__.co_varnames
    theirs = diffusers.AnimateDiffPAGPipeline(
        **{k: v for k, v in pipe.components.items() if k in names}, pag_applied_layers=["mid_block.*attn1"]
    )
    theirs.set_progress_bar_config(disable=True)
    kwargs = animatediff_call_kwargs(pipe)
    expected = theirs(**kwargs, guidance_scale=4.0, pag_scale=3.0, generator=torch.Generator().manual_seed(0)).frames
    pag = PAG(3.0, layers=("mid_block.*attn1",))
    assert list(pag.edits(pipe.unet)) == [
        "mid_block.attentions.0.transformer_blocks.0.attn1",
        "mid_block.motion_modules.0.transformer_blocks.0.attn1",
    ]
    with guide(pipe, CFG(4.0), pag):
        np.testing.assert_allclose(call(pipe), expected, atol=1e-5)


def test_apg_equals_the_formula_on_the_recorded_branches(pipe):
    assert_apg_equals_the_formula(pipe, call, "animatediff", scheduler_x0(pipe))


@pytest.mark.parametrize(
    "method",
    [
        PAG(1.0),
        PAG(1.0, layers=("motion_modules",)),  # temporal: the UNet's batch is B H W there
        SoftPAG(1.0, heads=(("mid_block.attentions.0.transformer_blocks.0.attn1", 1),)),
        TPG(1.0),
        TPG(1.0, layers=("mid_block.motion_modules",)),  # shuffles each pixel's frames
        SLG(1.0, layers=("mid_block",), start=0.0, stop=1.0),
    ],
    ids=["pag", "pag-temporal", "softpag", "tpg", "tpg-temporal", "slg"],
)
def test_perturbations_batched_equal_their_own_calls(pipe, method):
    assert_batched_equals_own_calls(pipe, call, method, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_pag_batched_equals_its_own_calls_on_every_pipeline(kind):
    pipe = tiny_animatediff(kind)
    batch = 1 if kind in ONE_PROMPT else 2
    assert_batched_equals_own_calls(pipe, lambda p, **extra: call(p, batch, **extra), PAG(1.0), atol=1e-5)


def test_the_defaults_perturb_spatial_layers_not_motion_modules(pipe):
    assert list(PAG(2.0).edits(pipe.unet)) == ["mid_block.attentions.0.transformer_blocks.0.attn1"]
    assert list(TPG(2.0).edits(pipe.unet)) == ["mid_block.attentions.0.transformer_blocks.0"]
    assert list(SLG(2.0, layers="auto").edits(pipe.unet)) == ["mid_block.attentions.0.transformer_blocks.0"]


def test_free_noise_is_served_and_free_init_refused():
    pipe = tiny_animatediff()
    kwargs = animatediff_call_kwargs(pipe, batch=1, frames=6) | {"prompt": {0: "a cat", 3: "a dog"}}
    run = lambda **extra: pipe(**kwargs | extra, generator=torch.Generator().manual_seed(0)).frames
    pipe.enable_free_noise(context_length=4, context_stride=2)  # per-frame prompts, frame windows in the motion modules
    own = run(guidance_scale=4.0)
    with guide(pipe, CFG(4.0)):
        np.testing.assert_allclose(run(guidance_scale=1.0), own, atol=1e-5)
    with guide(pipe, APG(4.0), PAG(1.0)):
        batched = run()
    with guide(pipe, APG(4.0), PAG(1.0), sequential=True):
        np.testing.assert_allclose(run(), batched, atol=1e-5)
    pipe.enable_free_init(num_iters=2)
    with guide(pipe, PAG(1.0)), pytest.raises(ValueError, match="FreeInit is not supported"):
        run(guidance_scale=4.0)
    pipe.disable_free_init()
    pipe.enable_free_noise_split_inference(spatial_split_size=3, temporal_split_size=3)  # slices of 3 samples' rows
    with guide(pipe, PAG(1.0)), pytest.raises(ValueError, match="split inference is not supported"):
        run(guidance_scale=4.0)


def test_module_rows_follow_the_folded_batch():
    assert module_rows(slice(2, 3), 3, 3, "m") == slice(2, 3)
    assert module_rows(slice(2, 3), 12, 3, "m") == slice(8, 12)  # 4 frames per sample
    assert module_rows(slice(None), 7, 3, "m") == slice(None)
    with pytest.raises(RuntimeError, match="does not fold"):
        module_rows(slice(2, 3), 7, 3, "m")


def test_the_corrector_runs(pipe):
    with guide(pipe, PAG(1.0)):
        plain = call(pipe)
    with guide(pipe, PAG(1.0), LangevinCorrector()):
        corrected = call(pipe)
    assert np.isfinite(corrected).all() and np.abs(corrected - plain).max() > 1e-3
