"""guide() on Cosmos 2 text-to-image and video-to-world: a conditional call, then an unconditional one, combined
as ``c + s (c - u)`` on the x0 predictions and run only for ``guidance_scale`` s > 1 (a weight above 2); the
transformer sees the latents on the rectified-flow path at ``t = sigma / (1 + sigma)`` of the scheduler's EDM
sigmas and predicts the velocity. Video-to-world gives the condition frames (the input image's) their own, tiny,
time: a timestep per frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidance import CFG, PAG, SLG, TPG, SoftPAG, guide
from tests.factories import cosmos2_call_kwargs, pipeline_snapshot, recorded_run, tiny_cosmos2, tiny_cosmos25
from tests.family_checks import assert_apg_equals_the_formula, assert_batched_equals_own_calls, scheduler_x0


def call(pipe, prompts=1, **extra):
    return pipe(**(cosmos2_call_kwargs(prompts) | extra), generator=torch.Generator().manual_seed(0)).images


def call_video(pipe, prompts=1, **extra):
    image = torch.rand(prompts, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    kwargs = cosmos2_call_kwargs(prompts) | {"image": image, "num_frames": 9}  # 3 latent frames, the first given
    return pipe(**(kwargs | extra), generator=torch.Generator().manual_seed(0)).frames


@pytest.fixture(scope="module")
def pipe():
    return tiny_cosmos2()


def test_cfg_at_weight_w_equals_the_pipelines_own_at_scale_w_minus_1(pipe):
    before = pipeline_snapshot(pipe)
    own = call(pipe, guidance_scale=3.0)  # c + 3 (c - u): the weight 4
    assert np.abs(own - call(pipe, guidance_scale=1.0)).max() > 1e-3, "CFG must change this model's output"
    for scale in (1.0, 0.5, 7.0):  # the pipeline's own scale does not matter
        with guide(pipe, CFG(4.0)):
            np.testing.assert_allclose(call(pipe, guidance_scale=scale), own, atol=2e-5)
    with guide(pipe, PAG(2.0)):  # a perturbation alone keeps the pipeline's own CFG ...
        composed = call(pipe, guidance_scale=3.0)
    with guide(pipe, CFG(4.0), PAG(2.0)):  # ... which is CFG at its weight
        np.testing.assert_allclose(call(pipe), composed, atol=2e-5)
    assert np.abs(composed - own).max() > 1e-3
    assert pipeline_snapshot(pipe) == before


@pytest.mark.parametrize("weight", [1.5, 2.0])
def test_cfg_at_a_weight_the_pipeline_does_not_run_switches_its_call_on(pipe, weight):
    """Weights up to 2 are scales up to 1, where the pipeline runs no unconditional call: the guided step is still
    ``u + w (c - u)`` on the branches, in the x0 space the pipeline combines them in (an affine map of the
    transformer's output, the same for both)."""

    def run():
        with guide(pipe, CFG(weight)):
            call(pipe, guidance_scale=1.0)

    calls, steps = recorded_run(pipe, run)
    assert len(calls) == 2 * len(steps) == 6, "the unconditional call must run at every step"
    for (x, t, cond), (_, _, uncond), step in zip(calls[::2], calls[1::2], steps):
        t = t.double().reshape(-1, 1, 1, 1, 1)  # the flow time sigma / (1 + sigma)
        x0 = x.double() - t * (uncond.double() + weight * (cond.double() - uncond.double()))  # x - t v, guided v
        latents, sigma = x.double() / (1 - t), t / (1 - t)  # the scheduler's VE latents and sigma
        # the step's eps is (latents - x0) / sigma, compared as sigma eps (the last sigma, 0.002, magnifies the
        # float32 rounding of x0) to within the rounding of the latents (up to ~240 at the first sigma, 80)
        atol = 2e-6 * latents.abs().max().item()
        torch.testing.assert_close(sigma * step.double(), latents - x0, rtol=1e-5, atol=atol)


def test_apg_equals_the_formula_on_the_recorded_calls(pipe):
    def velocity(x, t, eps):  # the scheduler gets eps = (latents - x0) / sigma on the VE scale: back to v
        return (eps - x) / (1 - t.reshape(-1, 1, 1, 1, 1))

    assert_apg_equals_the_formula(
        pipe, call, "cosmos2", scheduler_x0(pipe, 1000.0), velocity, atol=5e-4, sequential=True
    )  # the eps the scheduler gets carries float32 rounding times 1 / sigma (500 at the last step)


@pytest.mark.parametrize(
    "method",
    [
        PAG(3.0),
        SoftPAG(3.0, heads=(("transformer_blocks.1.attn1", 0),)),
        TPG(2.0),
        SLG(2.0, layers=(1,), start=0.0, stop=1.0),
    ],
    ids=["pag", "softpag", "tpg", "slg"],
)
def test_each_perturbation_batched_equals_its_own_calls(pipe, method):
    assert_batched_equals_own_calls(pipe, lambda p, **e: call(p, prompts=2, **e), method, atol=2e-5)


@pytest.fixture(scope="module")
def video_pipe():
    return tiny_cosmos2(video=True)


def test_video_to_world_cfg_equals_the_pipelines_own(video_pipe):
    """Each call builds its input anew (the condition frame set in, at its own time): the unconditional call is
    recognised by its values."""
    own = call_video(video_pipe, guidance_scale=3.0)
    assert np.abs(own - call_video(video_pipe, guidance_scale=1.0)).max() > 1e-3
    for scale in (1.0, 0.5):
        with guide(video_pipe, CFG(4.0)):
            np.testing.assert_allclose(call_video(video_pipe, guidance_scale=scale), own, atol=2e-5)


def test_video_to_world_apg_acts_on_the_generated_frames_alone(video_pipe):
    """The step's time is the generated frames'; APG's norms and projections are theirs, not the condition
    frame's (which the pipeline replaces by the input image's latents)."""

    def velocity(x, t, eps):
        return (eps - x) / (1 - t.reshape(-1, 1, 1, 1, 1))

    assert_apg_equals_the_formula(
        video_pipe,
        call_video,
        "cosmos2",
        scheduler_x0(video_pipe, 1000.0),
        velocity,
        atol=5e-4,
        sequential=True,
        generated=(2, slice(1, None)),
    )


@pytest.mark.parametrize("method", [PAG(3.0), TPG(2.0)], ids=["pag", "tpg"])
def test_video_to_world_perturbations_batched_equal_their_own_calls(video_pipe, method):
    assert_batched_equals_own_calls(video_pipe, lambda p, **e: call_video(p, prompts=2, **e), method, atol=2e-5)


@pytest.fixture(scope="module")
def predict25():
    return tiny_cosmos25()


def call_world(pipe, prompts=1, video=True, **extra):
    """Cosmos Predict 2.5: video-to-world from a given video's first latent frame (its image input needs
    torchvision), or text-to-world."""
    kwargs = cosmos2_call_kwargs(prompts) | {"num_frames": 9}
    if video:
        clip = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
        kwargs |= {"video": clip, "num_latent_conditional_frames": 1}
    return pipe(**(kwargs | extra), generator=torch.Generator().manual_seed(0)).frames


def test_predict25_cfg_equals_the_pipelines_own_and_apg_acts_on_the_generated_frames(predict25):
    own = call_world(predict25, guidance_scale=3.0)
    assert np.abs(own - call_world(predict25, guidance_scale=1.0)).max() > 1e-3
    with guide(predict25, CFG(4.0)):
        np.testing.assert_allclose(call_world(predict25, guidance_scale=1.0), own, atol=2e-5)
    assert_apg_equals_the_formula(
        predict25,
        call_world,
        "cosmos2",
        scheduler_x0(predict25, 1000.0),  # the transformer sees sigma in [0, 1]; the scheduler gets its velocity
        steps=3,
        sequential=True,
        generated=(2, slice(1, None)),
    )


@pytest.mark.parametrize("method", [PAG(3.0), TPG(2.0)], ids=["pag", "tpg"])
def test_predict25_text_to_world_perturbations_batched_equal_their_own_calls(predict25, method):
    run = lambda p, **e: call_world(p, prompts=2, video=False, **e)  # a video input takes one prompt
    assert_batched_equals_own_calls(predict25, run, method, atol=2e-5)
