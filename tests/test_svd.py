"""guide() on Stable Video Diffusion: one batched CFG call (the unconditional half first) of a spatio-temporal UNet on
latents ``(B, F, C, H, W)``, the input image's latents after the latents' channels; the UNet folds the frames into
its batch (its temporal blocks: each pixel's frames); the pipeline's CFG weight ramps over the frames from
``min_guidance_scale`` to ``max_guidance_scale``, a tensor it holds.

Perturbations alone keep that per-frame CFG, tested against ``u + w_f (c - u) + s (c - p)`` on the recorded
branches; ``CFG(w)`` is one weight for every frame, tested against the pipeline at ``min = max = w``; APG equals the
formula on the recorded branches (v-prediction on continuous log-sigma timesteps); every perturbation batched
equals its own calls, spatial and temporal; the defaults perturb spatial layers; the corrector is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidance import APG, CFG, PAG, SLG, TPG, LangevinCorrector, SoftPAG, guide
from tests.factories import recorded_run, svd_call_kwargs, tiny_svd
from tests.family_checks import assert_apg_equals_the_formula, assert_batched_equals_own_calls, scheduler_x0


@pytest.fixture(scope="module")
def pipe():
    return tiny_svd()


def call(pipe, **extra):
    return pipe(**svd_call_kwargs() | extra, generator=torch.Generator().manual_seed(0)).frames.numpy()


def test_cfg_is_one_weight_for_every_frame(pipe):
    own = call(pipe, min_guidance_scale=3.0, max_guidance_scale=3.0)
    assert np.abs(own - call(pipe, min_guidance_scale=1.0, max_guidance_scale=1.0)).max() > 1e-3
    with guide(pipe, CFG(3.0)):
        np.testing.assert_allclose(call(pipe), own, atol=1e-5)  # whatever ramp the call asks for
        np.testing.assert_allclose(call(pipe, max_guidance_scale=1.0), own, atol=1e-5)


def test_perturbations_keep_the_pipelines_per_frame_cfg(pipe):
    def run() -> None:
        with guide(pipe, PAG(2.0), sequential=True):
            call(pipe, min_guidance_scale=1.0, max_guidance_scale=3.0)

    calls, steps = recorded_run(pipe, run)
    weights = torch.linspace(1.0, 3.0, 4).reshape(1, 4, 1, 1, 1)
    for (_, _, out), (_, _, perturbed), step in zip(calls[::2], calls[1::2], steps):
        uncond, cond = out.float().chunk(2)
        expected = uncond + weights * (cond - uncond) + 2.0 * (cond - perturbed.float())
        torch.testing.assert_close(step.float(), expected, rtol=1e-4, atol=1e-5)
        wrong = uncond + 3.0 * (cond - uncond) + 2.0 * (cond - perturbed.float())  # one weight for all frames
        assert (wrong - step.float()).abs().max() > 1e-3


def test_apg_equals_the_formula_on_the_recorded_branches(pipe):
    assert_apg_equals_the_formula(pipe, call, "svd", scheduler_x0(pipe), latents=lambda x: x[:, :, :4])


@pytest.mark.parametrize(
    "method",
    [
        PAG(1.0),
        PAG(1.0, layers=("temporal_transformer_blocks",)),
        SoftPAG(1.0, heads=(("mid_block.attentions.0.transformer_blocks.0.attn1", 1),)),
        TPG(1.0),
        SLG(1.0, layers=("mid_block.attentions.0.temporal_transformer_blocks.0",), start=0.0, stop=1.0),
    ],
    ids=["pag", "pag-temporal", "softpag", "tpg", "slg-temporal"],
)
def test_perturbations_batched_equal_their_own_calls(pipe, method):
    assert_batched_equals_own_calls(pipe, call, method, atol=5e-5)  # float32 rounding with the batch size


def test_the_defaults_perturb_spatial_layers(pipe):
    assert list(PAG(2.0).edits(pipe.unet)) == ["mid_block.attentions.0.transformer_blocks.0.attn1"]
    assert list(TPG(2.0).edits(pipe.unet)) == ["mid_block.attentions.0.transformer_blocks.0"]


def test_the_corrector_is_refused(pipe):
    with guide(pipe, PAG(1.0), LangevinCorrector()), pytest.raises(ValueError, match="8 channels"):
        call(pipe)


def test_apg_changes_the_result(pipe):
    with guide(pipe, APG(3.0)):
        apg = call(pipe)
    with guide(pipe, CFG(3.0)):
        assert np.abs(apg - call(pipe)).max() > 1e-3
