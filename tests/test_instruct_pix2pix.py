"""guide() on SD and SDXL InstructPix2Pix: one batched call of three branches, ``[text + image, image, neither]``
(``c``, ``c_I``, ``u``), that the pipeline combines as ``u + s (c - c_I) + s_I (c_I - u)``, i.e.
``c + (s - 1) (c - c_I) + (s_I - 1) (c_I - u)``: text guidance on ``(c, c_I)``, image guidance on ``(c_I, u)``.

CFG-type methods take the text guidance's place, the pipeline's image guidance (``image_guidance_scale``) stays:
CFG equals the pipeline's own at every image scale; APG equals ``c + APG(c, c_I) + (s_I - 1) (c_I - u)`` on the
recorded branches; perturbations compose with both and batched equal their own calls; SDXL's ``guidance_rescale``
reads the true text branch; an image scale below 1 (no guidance batch) is refused for CFG-type methods; the
corrector is refused (the UNet takes the image's latents beside the latents)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidance import APG, CFG, PAG, TPG, LangevinCorrector, SoftPAG, guide
from tests.factories import instruct_pix2pix_call_kwargs, recorded_run, tiny_instruct_pix2pix
from tests.family_checks import assert_batched_equals_own_calls, assert_cfg_equals_the_pipelines_own, scheduler_x0


@pytest.fixture(scope="module", params=[False, True], ids=["sd", "sdxl"])
def pipe(request):
    return tiny_instruct_pix2pix(xl=request.param)


def call(pipe, **extra):
    kwargs = instruct_pix2pix_call_kwargs() | extra
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("image_scale", [1.5, 1.0, 3.0])
def test_cfg_equals_the_pipelines_own(pipe, image_scale):
    assert_cfg_equals_the_pipelines_own(pipe, call, atol=1e-5, image_guidance_scale=image_scale)


def test_the_image_guidance_stays_the_pipelines(pipe):
    with guide(pipe, CFG(4.0)):
        low, high = call(pipe, image_guidance_scale=1.0), call(pipe, image_guidance_scale=3.0)
    assert np.abs(low - high).max() > 1e-3


def test_apg_takes_the_text_guidances_place_on_the_recorded_branches(pipe):
    """What the scheduler gets is ``c + APG(a x + b c, a x + b c_I) / b + (s_I - 1) (c_I - u)`` (x0 space, the
    auto norm threshold) on the three recorded branches, the image latents' channels dropped from ``x``."""
    method, image_scale = APG(6.0), 2.0

    def run() -> None:
        with guide(pipe, method):
            call(pipe, image_guidance_scale=image_scale)

    calls, steps = recorded_run(pipe, run)
    state, x0 = method.new_state("instruct-pix2pix"), scheduler_x0(pipe)
    assert len(calls) == len(steps) == 3
    for (x, t, out), step in zip(calls, steps):
        b = len(step)
        x, (c, c_image, u) = x[:b, :4].float(), out.float().split(b)
        a, coef = x0(x, t if t.numel() == 1 else t[:b])
        text = method.update(a * x + coef * c, a * x + coef * c_image, state) / coef
        reference = c + text + (image_scale - 1) * (c_image - u)
        torch.testing.assert_close(step.float(), reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "method",
    [PAG(1.0), SoftPAG(1.0, heads=(("mid_block.attentions.0.transformer_blocks.0.attn1", 1),)), TPG(1.0)],
    ids=["pag", "softpag", "tpg"],
)
def test_perturbations_batched_equal_their_own_calls(pipe, method):
    assert_batched_equals_own_calls(pipe, call, method, atol=1e-5)


def test_perturbations_compose_with_both_guidances_on_the_recorded_branches(pipe):
    """PAG alone keeps the pipeline's text and image guidance: ``u + s (c - c_I) + s_I (c_I - u) + w (c - p)``
    (sequential: the perturbed branch is the second call of each step)."""

    def run() -> None:
        with guide(pipe, PAG(2.0), sequential=True):
            call(pipe, guidance_scale=4.0, image_guidance_scale=1.5)

    calls, steps = recorded_run(pipe, run)
    for (_, _, out), (_, _, perturbed), step in zip(calls[::2], calls[1::2], steps):
        c, c_image, u = out.float().split(len(step))
        expected = u + 4.0 * (c - c_image) + 1.5 * (c_image - u) + 2.0 * (c - perturbed.float())
        torch.testing.assert_close(step.float(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("image_scale", [1.5, 1.0])
def test_sdxl_guidance_rescale_reads_the_true_text_branch(image_scale):
    pipe = tiny_instruct_pix2pix(xl=True)
    extra = {"guidance_scale": 4.0, "image_guidance_scale": image_scale}
    own = call(pipe, guidance_rescale=0.7, **extra)
    assert np.abs(own - call(pipe, **extra)).max() > 1e-3
    with guide(pipe, PAG(0.0)):
        np.testing.assert_allclose(call(pipe, guidance_rescale=0.7, **extra), own, atol=1e-5)


def test_what_cannot_be_served_is_refused(pipe):
    with guide(pipe, APG(4.0)), pytest.raises(ValueError, match="image_guidance_scale"):
        call(pipe, image_guidance_scale=0.5)  # the pipeline then runs no guidance batch at all
    with guide(pipe, PAG(1.0)):  # perturbations alone run without it
        assert np.isfinite(call(pipe, image_guidance_scale=0.5)).all()
    with guide(pipe, PAG(1.0), LangevinCorrector()), pytest.raises(ValueError, match="8 channels"):
        call(pipe)
