"""guide() on LTX-Video text-to-video: one batched CFG call (the unconditional half first) over packed video tokens
``(B, N, C)``; blocks of self-attention (``attn1``) and cross-attention (``attn2``), whose attention modules do not
say which is which; flow matching with the scheduler's timestep.

CFG equals the pipeline's own, with and without its ``guidance_rescale``; APG equals the formula on the recorded
branches; the perturbations batched equal them as calls of their own; PAG defaults to the middle block's ``attn1``
and never takes an ``attn2``; SLG's weak branch is the denoiser without the block; the Langevin corrector runs; the
pipeline is left as found. The tiny pipeline returns its latents (the tiny LTX VAE decodes slowly).

Image-to-video passes a timestep per token, the first frame's (the input image's) at 0, and steps the other frames
only: CFG equals the pipeline's own, APG acts on the generated frames' tokens alone (tested against the formula on
the recorded branches), the perturbations batched equal their own calls, the corrector is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidance import PAG, SLG, TPG, LangevinCorrector, SoftPAG, guide
from guidance.engine import condition_region
from guidance.layers import self_attention_layers
from tests.factories import IMAGE_SIZE, ltx_call_kwargs, random_image, tiny_ltx
from tests.family_checks import (
    assert_apg_equals_the_formula,
    assert_batched_equals_own_calls,
    assert_cfg_equals_the_pipelines_own,
    assert_slg_leaves_the_block_out,
    scheduler_x0,
)


@pytest.fixture(scope="module")
def pipe():
    return tiny_ltx()


def call(pipe, **extra):
    return pipe(**ltx_call_kwargs() | extra, generator=torch.Generator().manual_seed(0)).frames.numpy()


def test_cfg_equals_the_pipelines_own(pipe):
    assert_cfg_equals_the_pipelines_own(pipe, call, atol=1e-5)
    own = call(pipe, guidance_scale=4.0, guidance_rescale=0.7)
    assert np.abs(own - call(pipe, guidance_scale=4.0)).max() > 1e-3
    with guide(pipe, PAG(0.0)):  # the pipeline's rescale reads the true conditional half
        np.testing.assert_allclose(call(pipe, guidance_scale=4.0, guidance_rescale=0.7), own, atol=1e-5)


def test_apg_equals_the_formula_on_the_recorded_branches(pipe):
    assert_apg_equals_the_formula(pipe, call, "ltx", scheduler_x0(pipe))


@pytest.mark.parametrize(
    "method",
    [
        PAG(1.0),
        SoftPAG(1.0, heads=(("transformer_blocks.0.attn1", 1),)),
        TPG(1.0),
        SLG(1.0, layers=(1,), start=0.0, stop=1.0),
    ],
    ids=["pag", "softpag", "tpg", "slg"],
)
def test_perturbations_batched_equal_their_own_calls(pipe, method):
    assert_batched_equals_own_calls(pipe, call, method, atol=1e-5)


def test_pag_defaults_to_the_middle_self_attention_and_never_takes_a_cross_attention(pipe):
    assert list(PAG(2.0).edits(pipe.transformer)) == ["transformer_blocks.1.attn1"]
    assert list(PAG(2.0, layers=("transformer_blocks.0",)).edits(pipe.transformer)) == ["transformer_blocks.0.attn1"]
    assert not [name for name in self_attention_layers(pipe.transformer) if name.endswith("attn2")]


def test_the_slg_weak_branch_is_the_denoiser_without_the_block(pipe):
    assert_slg_leaves_the_block_out(pipe, ltx_call_kwargs() | {"guidance_scale": 1.0}, "transformer_blocks.0", None)


def test_the_corrector_runs(pipe):
    with guide(pipe, PAG(1.0)):
        plain = call(pipe)
    with guide(pipe, PAG(1.0), LangevinCorrector()):
        corrected = call(pipe)
    assert np.isfinite(corrected).all() and np.abs(corrected - plain).max() > 1e-3


@pytest.fixture(scope="module")
def i2v():
    return tiny_ltx(image=True)


def i2v_call(pipe, **extra):
    kwargs = ltx_call_kwargs() | {"image": random_image(IMAGE_SIZE)} | extra
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames.numpy()


def test_image_to_video_cfg_equals_the_pipelines_own(i2v):
    assert_cfg_equals_the_pipelines_own(i2v, i2v_call, atol=1e-5)
    own = i2v_call(i2v, guidance_scale=4.0, guidance_rescale=0.7)
    with guide(i2v, PAG(0.0)):
        np.testing.assert_allclose(i2v_call(i2v, guidance_scale=4.0, guidance_rescale=0.7), own, atol=1e-5)


def test_image_to_video_apg_acts_on_the_generated_frames_only(i2v):
    """The scheduler gets the frames after the first, unpacked: packed again (patch 1), they are the tokens after
    the first frame's 8 x 8."""
    first = (IMAGE_SIZE // 4) ** 2

    def packed(x, t, prediction):  # (B, C, F - 1, H, W) -> the denoiser's (B, N, C), the first frame's tokens unknown
        tokens = prediction.permute(0, 2, 3, 4, 1).flatten(1, 3)
        return torch.cat([torch.full_like(x[:, :first], float("nan")), tokens], dim=1)

    generated = (1, slice(first, None))
    assert_apg_equals_the_formula(i2v, i2v_call, "ltx", scheduler_x0(i2v), packed, generated=generated)


@pytest.mark.parametrize("method", [PAG(1.0), TPG(1.0)], ids=["pag", "tpg"])
def test_image_to_video_perturbations_batched_equal_their_own_calls(i2v, method):
    assert_batched_equals_own_calls(i2v, i2v_call, method, atol=1e-5)


def test_image_to_video_refuses_the_corrector(i2v):
    with guide(i2v, PAG(1.0), LangevinCorrector()), pytest.raises(ValueError, match="condition tokens"):
        i2v_call(i2v)


def test_the_condition_region_is_a_leading_block_of_tokens_or_frames():
    times = torch.tensor([[0.0, 0.0, 5.0, 5.0, 5.0, 5.0]] * 2)
    assert condition_region(times, torch.zeros(2, 6, 3)) == (1, slice(2, None))  # packed tokens
    assert condition_region(times, torch.zeros(2, 3, 3, 2, 2)) == (2, slice(1, None))  # 3 frames of 2 tokens
    assert condition_region(torch.full((2, 6), 5.0), torch.zeros(2, 6, 3)) is None
    with pytest.raises(ValueError, match="leading block"):
        condition_region(torch.tensor([[0.0, 5.0, 0.0, 5.0, 5.0, 5.0]] * 2), torch.zeros(2, 6, 3))
    with pytest.raises(ValueError, match="does not fit"):
        condition_region(torch.tensor([[0.0, 5.0, 5.0, 5.0, 5.0, 5.0]] * 2), torch.zeros(2, 3, 3, 2, 2))
