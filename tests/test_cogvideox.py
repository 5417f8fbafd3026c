"""guide() on CogVideoX text-, image- and video-to-video: one batched CFG call (the unconditional half first) of
joint blocks over [text, video] that return the video stream first; latents ``(B, F, C, H, W)``, image-to-video's
image latents after the latents' channels on dim 2; v-prediction on CogVideoX's DDIM schedule; ``use_dynamic_cfg``
sets the CFG scale after the denoiser call.

CFG equals the pipeline's own; APG equals the formula on the recorded branches (on the generated channels for
image-to-video); the perturbations batched equal them as calls of their own; with ``use_dynamic_cfg`` a perturbation
composes with the scale the pipeline combines that step with (tested against the formula on the recorded branches);
SLG's weak branch is the denoiser without the block when text and video have as many tokens; the corrector runs on
text-to-video and is refused on image-to-video (it would move the image's channels); the pipeline is left as
found."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from guidance import PAG, SLG, TPG, LangevinCorrector, SoftPAG, guide
from tests.factories import cogvideox_call_kwargs, recorded_run, tiny_cogvideox
from tests.family_checks import (
    assert_apg_equals_the_formula,
    assert_batched_equals_own_calls,
    assert_cfg_equals_the_pipelines_own,
    assert_slg_leaves_the_block_out,
    scheduler_x0,
)

IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
INPUTS = {
    "CogVideoXPipeline": {},
    "CogVideoXImageToVideoPipeline": {"image": IMAGE},
    "CogVideoXVideoToVideoPipeline": {"video": [IMAGE] * 9, "strength": 0.8, "num_frames": None},
}


@pytest.fixture(scope="module", params=list(INPUTS), ids=["t2v", "i2v", "v2v"])
def pipe(request):
    return tiny_cogvideox(request.param)


@pytest.fixture(scope="module")
def t2v():
    return tiny_cogvideox()


def call(pipe, **extra):
    kwargs = cogvideox_call_kwargs() | INPUTS[type(pipe).__name__] | extra
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames


def test_cfg_equals_the_pipelines_own(pipe):
    assert_cfg_equals_the_pipelines_own(pipe, call, atol=1e-5)


def test_apg_equals_the_formula_on_the_recorded_branches(pipe):
    channels = pipe.transformer.config.out_channels  # image-to-video: the image's latents follow on dim 2
    generated = lambda x: x[:, :, :channels]
    steps = 2 if "strength" in INPUTS[type(pipe).__name__] else 3  # video-to-video at strength 0.8: 2 of 3
    assert_apg_equals_the_formula(pipe, call, "cogvideox", scheduler_x0(pipe), steps=steps, latents=generated)


@pytest.mark.parametrize(
    "method",
    [
        PAG(1.0),
        PAG(1.0, layers=("transformer_blocks.0",), joint="image"),
        SoftPAG(1.0, heads=(("transformer_blocks.1.attn1", 1),)),
        TPG(1.0),
        SLG(1.0, layers=(1,), start=0.0, stop=1.0),
    ],
    ids=["pag", "pag-image", "softpag", "tpg", "slg"],
)
def test_perturbations_batched_equal_their_own_calls(pipe, method):
    assert_batched_equals_own_calls(pipe, call, method, atol=1e-5)


def _dynamic_scale(scale: float, t: float, steps: int) -> float:
    """diffusers' CogVideoX dynamic CFG scale at timestep ``t`` of ``steps``."""
    return 1 + scale * ((1 - math.cos(math.pi * ((steps - t) / steps) ** 5.0)) / 2)


def test_a_perturbation_composes_with_the_dynamic_cfg_of_each_step(t2v):
    """The pipeline sets its scale after the denoiser call: the step combines ``c + w_t (c - u) + s (c - p)`` with
    that step's ``w_t``, not the previous step's."""
    own = call(t2v, guidance_scale=4.0, use_dynamic_cfg=True)
    with guide(t2v, PAG(0.0)):  # a perturbation of no weight: the pipeline's own dynamic CFG
        np.testing.assert_allclose(call(t2v, guidance_scale=4.0, use_dynamic_cfg=True), own, atol=1e-5)

    def run():
        with guide(t2v, PAG(2.0)):
            call(t2v, guidance_scale=4.0, use_dynamic_cfg=True)

    calls, predictions = recorded_run(t2v, run)
    scales = []
    for (_, t, out), prediction in zip(calls, predictions):
        uncond, cond, perturbed = out.float().chunk(3)
        w = _dynamic_scale(4.0, float(t[0]), len(predictions))
        scales.append(w)
        expected = cond + (w - 1) * (cond - uncond) + 2.0 * (cond - perturbed)
        torch.testing.assert_close(prediction.float(), expected, rtol=1e-4, atol=1e-5)
    assert len(set(scales)) == len(scales), "the scale changes from step to step"


def test_the_slg_weak_branch_is_the_denoiser_without_the_block(t2v):
    kwargs = cogvideox_call_kwargs() | {"guidance_scale": 1.0, "num_frames": 13}  # 16 tokens: 4 frames of 2x2
    assert_slg_leaves_the_block_out(t2v, kwargs, "transformer_blocks.0", "image_first")


def test_the_corrector_runs_on_text_to_video_and_is_refused_on_image_to_video(t2v):
    with guide(t2v, PAG(1.0)):
        plain = call(t2v)
    with guide(t2v, PAG(1.0), LangevinCorrector()):
        corrected = call(t2v)
    assert np.isfinite(corrected).all() and np.abs(corrected - plain).max() > 1e-3
    i2v = tiny_cogvideox("CogVideoXImageToVideoPipeline")
    with pytest.raises(ValueError, match="Langevin corrector needs a denoiser whose input is the latents alone"):
        with guide(i2v, PAG(1.0), LangevinCorrector()):
            call(i2v)
