"""guide() on Kandinsky 5 text- and image-to-image: a conditional denoiser call, then an unconditional one with an
empty negative prompt unless given one; latents ``(B, 1, H, W, C)``, image-to-image's input image latents and mask
channel after them on the last dimension; a text-encoder stack, then visual blocks of self-attention and
cross-attention.

CFG equals the pipeline's own; APG equals the formula on the recorded branches; the perturbations batched equal
them as calls of their own; PAG and TPG default to the middle visual block (not the text encoder's) and PAG never
picks a cross-attention; the Langevin corrector runs without CFG and is refused with it; the pipeline is left as
found. Image-to-image: CFG equals the pipeline's own, APG acts on the generated channels only, the perturbations
batched equal their own calls, the corrector is refused (it would move the input image's channels)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from guidance import PAG, SLG, TPG, LangevinCorrector, SoftPAG, guide
from guidance.layers import self_attention_layers
from tests.factories import kandinsky5_call_kwargs, tiny_kandinsky5
from tests.family_checks import (
    assert_apg_equals_the_formula,
    assert_batched_equals_own_calls,
    assert_cfg_equals_the_pipelines_own,
    assert_slg_leaves_the_block_out,
    scheduler_x0,
)


@pytest.fixture(scope="module")
def pipe():
    return tiny_kandinsky5()


def call(pipe, **extra):
    return pipe(**kandinsky5_call_kwargs() | extra, generator=torch.Generator().manual_seed(0)).image


def test_cfg_equals_the_pipelines_own(pipe):
    assert_cfg_equals_the_pipelines_own(pipe, call, atol=1e-5)  # the unconditional call gets a solved prediction


def test_apg_equals_the_formula_on_the_recorded_branches(pipe):
    assert_apg_equals_the_formula(pipe, call, "kandinsky5", scheduler_x0(pipe), sequential=True)


@pytest.mark.parametrize(
    "method",
    [
        PAG(1.0),
        SoftPAG(1.0, heads=(("visual_transformer_blocks.0.self_attention", 1),)),
        TPG(1.0),
        SLG(1.0, layers=(1,), start=0.0, stop=1.0),
    ],
    ids=["pag", "softpag", "tpg", "slg"],
)
def test_perturbations_batched_equal_their_own_calls(pipe, method):
    assert_batched_equals_own_calls(pipe, call, method)


def test_the_default_layers_are_the_middle_visual_block_and_never_a_cross_attention(pipe):
    transformer = pipe.transformer
    assert list(PAG(2.0).edits(transformer)) == ["visual_transformer_blocks.1.self_attention"]
    assert list(TPG(2.0).edits(transformer)) == ["visual_transformer_blocks.1"]
    layers = self_attention_layers(transformer)
    assert "text_transformer_blocks.0.self_attention" in layers  # selectable by name
    assert not [name for name in layers if "cross_attention" in name]
    assert list(PAG(2.0, layers=("visual_transformer_blocks.0",)).edits(transformer)) == [
        "visual_transformer_blocks.0.self_attention"
    ]


def test_the_slg_weak_branch_is_the_denoiser_without_the_block(pipe):
    kwargs = kandinsky5_call_kwargs() | {"guidance_scale": 1.0}
    assert_slg_leaves_the_block_out(pipe, kwargs, "visual_transformer_blocks.0", None)


def test_the_corrector_runs_without_cfg_and_is_refused_with_it(pipe):
    with guide(pipe, PAG(1.0)):
        plain = call(pipe, guidance_scale=1.0)
    with guide(pipe, PAG(1.0), LangevinCorrector()):
        corrected = call(pipe, guidance_scale=1.0)
    assert np.isfinite(corrected).all() and np.abs(corrected - plain).max() > 1e-3
    with pytest.raises(ValueError, match="needs every branch in one denoiser call"):
        with guide(pipe, PAG(1.0), LangevinCorrector()):
            call(pipe, guidance_scale=4.0)


def test_the_rope_positions_stay_unbatched_when_the_text_is_as_long_as_the_batch(pipe):
    """The text's rope positions are ``arange(tokens)``: with 2 tokens for 2 prompts they look batched."""
    short = lambda pipe, **extra: (
        pipe(**kandinsky5_call_kwargs(tokens=2) | extra, generator=torch.Generator().manual_seed(0)).image
    )
    assert_batched_equals_own_calls(pipe, short, PAG(1.0))


IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def i2i():
    return tiny_kandinsky5(i2i=True)


def call_i2i(pipe, **extra):
    kwargs = kandinsky5_call_kwargs(batch=1) | {"image": IMAGE} | extra
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).image


def test_image_to_image_cfg_and_apg_on_the_generated_channels(i2i):
    assert_cfg_equals_the_pipelines_own(i2i, call_i2i, atol=1e-5)
    channels = i2i.transformer.config.out_visual_dim  # 16 of the input's 33 channels: the generated latents first
    generated = lambda x: x[..., :channels]
    assert_apg_equals_the_formula(i2i, call_i2i, "kandinsky5", scheduler_x0(i2i), sequential=True, latents=generated)


@pytest.mark.parametrize(
    "method", [PAG(1.0), TPG(1.0), SLG(1.0, layers=(1,), start=0.0, stop=1.0)], ids=["pag", "tpg", "slg"]
)
def test_image_to_image_perturbations_batched_equal_their_own_calls(i2i, method):
    assert_batched_equals_own_calls(i2i, call_i2i, method, atol=2e-5)


def test_image_to_image_refuses_the_corrector(i2i):
    with pytest.raises(ValueError, match="input image's latents and mask"):
        with guide(i2i, PAG(1.0), LangevinCorrector()):
            call_i2i(i2i, guidance_scale=1.0)


@pytest.fixture(scope="module", params=[False, True], ids=["t2v", "i2v"])
def video(request):
    return tiny_kandinsky5(i2i=request.param, video=True)


def call_video(pipe, **extra):
    """Image-to-video normalises the first frames against the next ones: 25 frames make the 7 latent frames it
    needs."""
    image = type(pipe).__name__ == "Kandinsky5I2VPipeline"
    kwargs = kandinsky5_call_kwargs(batch=1) | {"num_frames": 25 if image else 5, "output_type": "latent"}
    kwargs |= {"image": IMAGE} if image else {}
    return pipe(**kwargs | extra, generator=torch.Generator().manual_seed(0)).frames.numpy()


def test_video_cfg_and_apg_on_the_generated_latents(video):
    """Text- and image-to-video (the input image's latents and a mask channel after the latents' on their last
    dimension; the first latent frame is the image's, which the pipeline does not step): CFG equals the pipeline's
    own, APG the formula on the recorded calls, on the frames after the image's in image-to-video."""
    assert_cfg_equals_the_pipelines_own(video, call_video, atol=1e-5)
    channels = video.transformer.config.out_visual_dim
    image = type(video).__name__ == "Kandinsky5I2VPipeline"

    def stepped(x, t, prediction):  # image-to-video steps frames 1:, the first frame's prediction unknown
        return torch.cat([torch.full_like(prediction[:, :1], float("nan")), prediction], 1) if image else prediction

    assert_apg_equals_the_formula(
        video,
        call_video,
        "kandinsky5",
        scheduler_x0(video),
        stepped,
        sequential=True,
        latents=lambda x: x[..., :channels],
        generated=(1, slice(1, None)) if image else None,
    )


@pytest.mark.parametrize("method", [PAG(1.0), TPG(1.0)], ids=["pag", "tpg"])
def test_video_perturbations_batched_equal_their_own_calls(video, method):
    assert_batched_equals_own_calls(video, call_video, method, atol=2e-5)
