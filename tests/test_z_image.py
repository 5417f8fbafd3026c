"""guide() on Z-Image: a denoiser that takes one latent and one caption per sample in lists, sees the time running
from 0 at pure noise (``1 - t / 1000``), returns the negated velocity, and one [image, caption] sequence padded per
batch; the pipeline's CFG is ``c + s (c - u)`` (on when ``s > 0``), with its own norm clamp and truncation.

CFG equals the pipeline's own in every mode; APG in x0 space equals the formula on the recorded branches (and the
wrong time or sign gives another result); PAG equals the denoiser run with an identity attention; the perturbations
batched equal them as calls of their own while the batch is padded; the pipeline is left as found."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from guidance import APG, CFG, PAG, SLG, TPG, LangevinCorrector, SoftPAG, guide
from guidance.families import family_of, schedule_of
from guidance.tpg import shuffle_tokens
from tests.factories import (
    assert_modular_guider_equals_guide,
    pipeline_snapshot,
    recorded_run,
    tiny_z_image,
    z_image_call_kwargs,
)

#: a caption of 7 tokens and a negative one of 40: padded to 32 and 64 tokens, so the CFG batch is padded
PADDED = (7, 40)


@pytest.fixture(scope="module")
def pipe():
    return tiny_z_image()


def call(pipe, batch=1, tokens=(7, 12), **extra):
    kwargs = z_image_call_kwargs(batch, tokens) | extra
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize(
    "extra",
    [{}, {"cfg_normalization": True}, {"cfg_truncation": 0.5}, {"batch": 2, "tokens": PADDED}],
    ids=["plain", "norm_clamp", "truncation", "padded_batch_of_two"],
)
def test_cfg_equals_the_pipelines_own(pipe, extra):
    own, unguided = call(pipe, guidance_scale=3.0, **extra), call(pipe, guidance_scale=0.0, **extra)
    assert np.abs(own - unguided).max() > 1e-3, "CFG must change this tiny model's output"
    if extra:
        assert np.abs(own - call(pipe, guidance_scale=3.0)[: len(own)]).max() > 1e-3, "the mode must count"
    before = pipeline_snapshot(pipe)
    with guide(pipe, CFG(4.0)):  # the pipeline's c + 3 (c - u) is u + 4 (c - u)
        np.testing.assert_allclose(call(pipe, **extra), own, atol=2e-6)
        # the method's scale decides, whatever the pipeline's own scale argument says
        np.testing.assert_allclose(call(pipe, guidance_scale=0.0, **extra), own, atol=2e-6)
    assert pipeline_snapshot(pipe) == before


def test_perturbations_compose_with_the_pipelines_own_cfg(pipe):
    own = call(pipe, guidance_scale=3.0)
    with guide(pipe, CFG(4.0), PAG(2.0)):
        explicit = call(pipe)
    with guide(pipe, PAG(2.0)):
        np.testing.assert_allclose(call(pipe, guidance_scale=3.0), explicit, atol=2e-6)
        alone = call(pipe, guidance_scale=0.0)  # Z-Image Turbo's setting: no CFG branch, PAG alone
    assert np.abs(explicit - own).max() > 1e-3 and np.abs(alone - call(pipe, guidance_scale=0.0)).max() > 1e-3


def _apg_reference(method, calls, reversed_time=True, sign=-1.0):
    """What the scheduler should receive: the guided velocity ``(x - x0_g) / sigma``, ``x0_g = x0_c +
    update(x0_c, x0_u)`` with the x0 of the flow path ``x0 = x - sigma v``, ``v = -output`` and ``sigma = 1 -
    timestep argument`` (the paper's x0 space);
    ``reversed_time`` / ``sign`` off: the wrong readings, as controls."""
    state, expected = method.new_state("z-image"), []
    for x, t, out in calls:
        (cond, uncond), x = out.float().chunk(2), x.float().chunk(2)[0]
        sigma = (1 - t[:1] if reversed_time else t[:1]).float().reshape(-1, 1, 1, 1, 1)
        x0_cond, x0_uncond = x - sigma * (sign * cond), x - sigma * (sign * uncond)
        guided_x0 = x0_cond + method.update(x0_cond, x0_uncond, state)
        velocity = (x - guided_x0) / sigma
        expected.append(-(velocity / sign).squeeze(2))  # the output is velocity / sign; the pipeline negates it
    return expected


def test_apg_reads_the_reversed_time_and_the_negated_output(pipe):
    method = APG(6.0)  # x0 space with the auto norm threshold: depends on where in the schedule each step is

    def run():
        with guide(pipe, method):
            call(pipe)

    calls, steps = recorded_run(pipe, run)
    assert len(calls) == len(steps) == 3 and float(calls[0][1][0]) < 0.01  # the first step sees time 0
    assert schedule_of(pipe.scheduler).alpha_sigma(torch.tensor([1000.0]))[1].item() == pytest.approx(1.0)
    for ours, reference in zip(steps, _apg_reference(method, calls)):
        torch.testing.assert_close(ours.float(), reference, rtol=1e-4, atol=1e-5)
    for wrong in (_apg_reference(method, calls, reversed_time=False), _apg_reference(method, calls, sign=1.0)):
        # (the wrong time reads sigma = 0 at the first step: compared from the second on)
        assert max((w - s).abs().max().item() for w, s in zip(wrong[1:], steps[1:])) > 1e-3


class IdentityAttention:
    """Z-Image's attention with every token attending to itself only: ``to_out(to_v(x))``."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        return attn.to_out[0](attn.to_v(hidden_states))


def test_pag_equals_the_denoiser_with_an_identity_attention(pipe):
    layer = pipe.transformer.layers[1].attention
    with guide(pipe, PAG(2.0, layers=("layers.1.attention",))):
        ours = call(pipe, guidance_scale=0.0)
    transformer, own_forward, processor = pipe.transformer, pipe.transformer.forward, layer.processor

    def guided_forward(*args, **kwargs):
        cond = own_forward(*args, **kwargs)[0]
        layer.processor = IdentityAttention()
        try:
            weak = own_forward(*args, **kwargs)[0]
        finally:
            layer.processor = processor
        return ([c + 2.0 * (c - w) for c, w in zip(cond, weak)],)

    transformer.forward = guided_forward
    try:
        expected = call(pipe, guidance_scale=0.0)
    finally:
        del transformer.forward
    assert np.abs(expected - call(pipe, guidance_scale=0.0)).max() > 1e-3, "PAG must change the output"
    np.testing.assert_allclose(ours, expected, atol=2e-6)


@pytest.mark.parametrize(
    "method",
    [
        PAG(2.0),
        SoftPAG(2.0, heads=(("layers.1.attention", 0),)),
        TPG(1.0),
        SLG(1.0, layers=("layers.1",), start=0.0, stop=1.0),
    ],
    ids=["pag", "softpag", "tpg", "slg"],
)
def test_perturbations_batched_equal_their_own_calls_in_a_padded_batch(pipe, method):
    """The cond rows alone are padded to 96 tokens, the CFG batch to 128: TPG shuffles each row's real tokens
    only, so the padded batch and the calls of their own agree."""
    with guide(pipe, APG(4.0), method):
        batched = call(pipe, tokens=PADDED)
    with guide(pipe, APG(4.0), method, sequential=True):
        np.testing.assert_allclose(call(pipe, tokens=PADDED), batched, atol=1e-5)
    with guide(pipe, APG(4.0)):
        assert np.abs(batched - call(pipe, tokens=PADDED)).max() > 1e-3


def test_a_token_shuffle_keeps_each_rows_padding():
    hidden = torch.arange(2 * 6, dtype=torch.float32).reshape(2, 6, 1)
    valid = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    shuffled = shuffle_tokens(hidden, torch.Generator().manual_seed(1), valid)
    assert torch.equal(shuffled[1, 3:], hidden[1, 3:])
    for row, count in ((0, 6), (1, 3)):
        assert sorted(shuffled[row, :count, 0].tolist()) == hidden[row, :count, 0].tolist()
    assert not torch.equal(shuffled, hidden)


def test_the_default_layers_are_the_middle_of_the_main_stack():
    transformer = tiny_z_image(layers=5).transformer
    assert list(PAG(2.0).edits(transformer)) == ["layers.2.attention"]
    assert list(TPG(2.0).edits(transformer)) == ["layers.2"]


def test_refusals(pipe):
    before = pipeline_snapshot(pipe)
    with pytest.raises(ValueError, match="Langevin corrector is not supported"):
        with guide(pipe, PAG(2.0), LangevinCorrector()):
            call(pipe)
    with pytest.raises(ValueError, match=r"joint='image'\) is not available"):
        with guide(pipe, PAG(2.0, joint="image")):
            pass
    assert pipeline_snapshot(pipe) == before
    assert family_of(pipe).argument(1.0) == 0.0  # the app's "no CFG" is guidance_scale=0 here


IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
MASK = Image.fromarray(np.where(np.arange(32)[None, :].repeat(32, 0) > 16, 255, 0).astype(np.uint8))


@pytest.mark.parametrize(
    ("name", "inputs"),
    [
        ("ZImageImg2ImgPipeline", {"image": IMAGE, "strength": 0.8}),
        ("ZImageInpaintPipeline", {"image": IMAGE, "mask_image": MASK, "strength": 0.9}),
        ("ZImageControlNetPipeline", {"control_image": IMAGE}),
        ("ZImageControlNetInpaintPipeline", {"image": IMAGE, "mask_image": MASK, "control_image": IMAGE}),
    ],
)
def test_image_inputs_and_controlnet(name, inputs):
    """CFG equals each pipeline's own; the perturbations batched equal their own calls (with a ControlNet, whose
    samples are laid out on the padded batch, those calls run on the whole batch)."""
    pipe = tiny_z_image(name)
    own = call(pipe, tokens=PADDED, guidance_scale=3.0, **inputs)
    assert np.abs(own - call(pipe, tokens=PADDED, guidance_scale=0.0, **inputs)).max() > 1e-3
    methods = (APG(4.0), PAG(2.0), TPG(1.0))
    with guide(pipe, CFG(4.0)):
        np.testing.assert_allclose(call(pipe, tokens=PADDED, **inputs), own, atol=2e-6)
    with guide(pipe, *methods):
        batched = call(pipe, tokens=PADDED, **inputs)
    with guide(pipe, *methods, sequential=True):
        np.testing.assert_allclose(call(pipe, tokens=PADDED, **inputs), batched, atol=1e-5)
    assert np.isfinite(batched).all() and np.abs(batched - own).max() > 1e-3


@pytest.mark.parametrize("method", [PAG(2.0), TPG(1.0)], ids=["pag", "tpg"])
def test_modular_z_image_with_our_guiders_equals_guide_on_the_classic_pipeline(pipe, method):
    """diffusers' modular Z-Image denoise blocks on the same transformer: its CFG guider equals the classic
    pipeline's own CFG, and ``as_guider(CFG, method)`` (each branch a call of its own, unpadded) equals ``guide()``
    on the classic pipeline (one padded batch)."""
    blocks = pytest.importorskip("diffusers.modular_pipelines.z_image.modular_blocks_z_image")
    kwargs = z_image_call_kwargs(tokens=PADDED)
    embeds = {k: kwargs[k] for k in ("prompt_embeds", "negative_prompt_embeds")}
    # without a VAE the modular pipeline assumes a stride of 8: 128 px is the classic 32 px's 16 x 16 latent
    sizes = {"height": 128, "width": 128, "num_inference_steps": 3}
    assert_modular_guider_equals_guide(
        pipe, blocks.ZImageCoreDenoiseStep, method, modular_kwargs=embeds | sizes, classic_kwargs=kwargs, own_scale=3.0
    )
