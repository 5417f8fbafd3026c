"""guide() on HiDream-I1: one batched CFG call (the unconditional half first) of double-stream blocks over [image,
text] and single-stream blocks over [image, T5, Llama, Llama], with mixture-of-experts feed-forwards. The pipeline
negates the denoiser's output into the flow velocity, the timestep is the scheduler's (0-1000), and the Llama
states carry the batch on their dim 1.

CFG equals the pipeline's own; APG equals the formula on the recorded branches, the x0 estimate read from the
negated output; the perturbations batched equal them as calls of their own, on square images and on non-square ones
(whose tokens the denoiser pads to its ``max_seq``); ``PAG(joint="image")`` finds the image tokens first in both
kinds of blocks; the Langevin corrector's x0 is read with the output's sign; the pipeline is left as found."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidance import PAG, SLG, TPG, LangevinCorrector, SoftPAG, guide
from guidance.prediction import broadcast
from tests.factories import hidream_call_kwargs, tiny_hidream
from tests.family_checks import (
    assert_apg_equals_the_formula,
    assert_batched_equals_own_calls,
    assert_cfg_equals_the_pipelines_own,
    assert_slg_leaves_the_block_out,
)

DOUBLE, SINGLE = "double_stream_blocks.1.block.attn1", "single_stream_blocks.1.block.attn1"
WIDE = {"width": 48}  # the pipeline keeps the area: 36x24 px, 9x6 latent patches padded to 144 tokens


@pytest.fixture(scope="module")
def pipe():
    return tiny_hidream()


def call(pipe, **extra):
    return pipe(**hidream_call_kwargs() | extra, generator=torch.Generator().manual_seed(0)).images


def test_cfg_equals_the_pipelines_own(pipe):
    assert_cfg_equals_the_pipelines_own(pipe, call)
    assert_cfg_equals_the_pipelines_own(pipe, call, num_images_per_prompt=2)


def test_apg_equals_the_formula_on_the_recorded_branches(pipe):
    """The denoiser returns the negated velocity ``x0 - noise``: x0 = x + sigma * output, sigma = t / 1000; the
    scheduler gets the velocity, minus the guided output."""
    x0 = lambda x, t: (torch.ones_like(x), broadcast(t.float() / 1000, x))
    assert_apg_equals_the_formula(pipe, call, "hidream", x0, guided=lambda x, t, velocity: -velocity)


@pytest.mark.parametrize("shape", [{}, WIDE], ids=["square", "non-square"])
@pytest.mark.parametrize(
    "method",
    [
        PAG(1.0),
        PAG(1.0, layers=(DOUBLE,), joint="image"),
        PAG(1.0, layers=(SINGLE,), joint="image"),
        SoftPAG(1.0, heads=((SINGLE, 1), (DOUBLE, 2))),
        TPG(1.0),
        TPG(1.0, layers=(3,)),
        SLG(1.0, layers=(1,), start=0.0, stop=1.0),
        SLG(1.0, layers=(3,), start=0.0, stop=1.0),
    ],
    ids=["pag", "pag-image-double", "pag-image-single", "softpag", "tpg", "tpg-single", "slg-double", "slg-single"],
)
def test_perturbations_batched_equal_their_own_calls(pipe, method, shape):
    assert_batched_equals_own_calls(pipe, call, method, **shape)


@pytest.mark.parametrize("shape", [{}, WIDE], ids=["square", "non-square"])
def test_pag_on_the_image_tokens_finds_them_first_in_both_kinds_of_blocks(pipe, monkeypatch, shape):
    """Double-stream attention runs on [image, text] with the text passed beside the image; single-stream
    attention on one sequence [image, T5, Llama, Llama], read from the call's embeddings. A non-square image's
    tokens are padded to the denoiser's ``max_seq``."""
    from guidance import perturbation

    seen, real = [], perturbation._AttentionHook._image_block

    def spy(self, module, args, kwargs, run):
        seen.append((self.name, real(self, module, args, kwargs, run)))
        return seen[-1][1]

    monkeypatch.setattr(perturbation._AttentionHook, "_image_block", spy)
    out = {}
    for joint in ("full", "image"):
        with guide(pipe, PAG(3.0, layers=(DOUBLE, SINGLE), joint=joint)):
            out[joint] = call(pipe, guidance_scale=1.0, **shape)
    kwargs = hidream_call_kwargs()
    image = pipe.transformer.max_seq if shape else (32 // pipe.vae_scale_factor // 2) ** 2
    assert (image == 144) if shape else (image == 64)
    assert set(seen) == {(DOUBLE, (0, image)), (SINGLE, (0, image))}
    text = kwargs["prompt_embeds_t5"].shape[1] + 2 * kwargs["prompt_embeds_llama3"].shape[2]
    assert pipe.transformer.max_seq + text != 64 + text  # the two shapes are told apart
    assert np.abs(out["image"] - out["full"]).max() > 1e-4


def test_the_corrector_reads_x0_with_the_outputs_sign(pipe, monkeypatch):
    """The Langevin corrector's denoiser is x0 = x + sigma * output (the output is the negated velocity)."""
    from guidance import engine

    checked, real = [], engine.langevin_correct

    def spy(denoise, x, sigma_ve, **kwargs):
        seen = []
        hook = pipe.transformer.register_forward_hook(
            lambda m, a, k, o: seen.append((k["hidden_states"], k["timesteps"], o[0])), with_kwargs=True
        )
        try:
            x0 = denoise(x, sigma_ve)
        finally:
            hook.remove()
        ((x_in, t, out),) = seen
        sigma = (t.float() / 1000).view(-1, 1, 1, 1)
        checked.append((x0, x_in.float() + sigma * out.float()))
        return real(denoise, x, sigma_ve, **kwargs)

    monkeypatch.setattr(engine, "langevin_correct", spy)
    with guide(pipe, LangevinCorrector()):
        corrected = call(pipe, guidance_scale=1.0)
    assert len(checked) == 2  # not at the first step (pure noise)
    for x0, reference in checked:
        torch.testing.assert_close(x0, reference, rtol=1e-4, atol=1e-5)
    assert np.isfinite(corrected).all() and np.abs(corrected - call(pipe, guidance_scale=1.0)).max() > 1e-3


@pytest.mark.parametrize(
    ("block", "pair"), [("double_stream_blocks.1.block", "image_first"), ("single_stream_blocks.0.block", None)]
)
def test_the_slg_weak_branch_is_the_denoiser_without_the_block(pipe, block, pair):
    """With as many text tokens as image tokens (58 T5 + 2 x 3 Llama = 64) the double-stream block's output pair
    cannot be told apart by shape: SLG must know the image stream comes first."""
    kwargs = hidream_call_kwargs(t5_tokens=58) | {"guidance_scale": 1.0}
    assert_slg_leaves_the_block_out(pipe, kwargs, block, pair)


def test_tpg_keeps_a_non_square_images_padding_in_place(pipe):
    """The denoiser pads a non-square image's 54 tokens to 144 and weighs the padding 0: TPG shuffles each row's
    54 real tokens among themselves."""
    seen = []
    norm = dict(pipe.transformer.named_modules())["double_stream_blocks.1.block.norm1_i"]
    hook = norm.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        with guide(pipe, TPG(1.0, layers=("double_stream_blocks.1.block",))):
            call(pipe, guidance_scale=1.0, num_inference_steps=1, **WIDE)
    finally:
        hook.remove()
    (hidden,) = seen  # the 2 conditional rows, then their 2 shuffled copies
    real, shuffled = hidden[:2], hidden[2:]
    assert hidden.shape[1] == pipe.transformer.max_seq == 144
    torch.testing.assert_close(shuffled[:, 54:], real[:, 54:], rtol=0, atol=0)
    assert not torch.equal(shuffled[:, :54], real[:, :54])
    for row in range(2):
        torch.testing.assert_close(shuffled[row, :54, 0].sort().values, real[row, :54, 0].sort().values)
