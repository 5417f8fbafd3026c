"""guide() on Qwen-Image (text-to-image, img2img, inpainting): true CFG in a separate unconditional call, joint
attention with the text first. CFG equals the pipeline's own true CFG (the pipeline's rescaling of the combined
prediction to the conditional one's norm per token stays, for every method); APG and perturbations run, batched
equals sequential; true CFG needs the negative embeddings; the pipeline is left as found."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidance import APG, CFG, PAG, SoftPAG, guide
from tests.factories import pipeline_snapshot, qwen_call_kwargs, recorded_run, tiny_qwen


@pytest.fixture(
    scope="module",
    params=["", "img2img", "inpaint", "controlnet", "controlnet_inpaint"],
    ids=["t2i", "img2img", "inpaint", "controlnet", "controlnet_inpaint"],
)
def pipe(request):
    return tiny_qwen(request.param)


def call(pipe, negative=True, **extra):
    kwargs = qwen_call_kwargs(pipe, negative) | extra
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images


def test_cfg_equals_the_pipelines_own_true_cfg(pipe):
    own, unguided = call(pipe, true_cfg_scale=4.0), call(pipe, true_cfg_scale=1.0)
    assert np.abs(own - unguided).max() > 1e-4, "true CFG must change this tiny model's output"
    with guide(pipe, CFG(4.0)):
        np.testing.assert_allclose(call(pipe), own, atol=2e-5)
    with guide(pipe, APG(4.0)):
        apg = call(pipe)
    assert np.isfinite(apg).all() and np.abs(apg - own).max() > 1e-5


def test_perturbations_compose_with_true_cfg_batched_or_sequential(pipe):
    own = call(pipe, true_cfg_scale=4.0)
    with guide(pipe, CFG(4.0), PAG(2.0)):
        batched = call(pipe)
    assert np.isfinite(batched).all() and np.abs(batched - own).max() > 1e-5
    with guide(pipe, CFG(4.0), PAG(2.0), sequential=True):
        np.testing.assert_allclose(call(pipe), batched, atol=2e-5)
    with guide(pipe, SoftPAG(2.0, heads=[(0, 0)], strength=1.0)):  # no true CFG: the perturbation alone
        soft = call(pipe, negative=False)
    assert np.abs(soft - call(pipe, negative=False)).max() > 1e-5


def test_true_cfg_needs_the_negative_embeddings_and_leaves_the_pipeline_as_found(pipe):
    before = pipeline_snapshot(pipe)
    with guide(pipe, CFG(4.0)), pytest.raises(ValueError, match="pass negative_prompt_embeds too"):
        call(pipe, negative=False)
    assert pipeline_snapshot(pipe) == before


@pytest.fixture(scope="module", params=["edit", "edit_plus", "edit_inpaint"])
def edit_pipe(request):
    """Qwen-Image Edit (Plus), its reference image resized to 48 x 32 instead of about 1024^2 (speed only: the
    pipelines' module-level calculate_dimensions is replaced for these tests)."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_inpaint as edit_inpaint
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus

    patch = pytest.MonkeyPatch()
    patch.setattr(edit, "calculate_dimensions", lambda area, ratio: (48, 32, None))
    patch.setattr(edit_inpaint, "calculate_dimensions", lambda area, ratio: (48, 32, None))
    patch.setattr(edit_plus, "calculate_dimensions", lambda area, ratio: (48, 32))
    yield tiny_qwen(request.param)
    patch.undo()


def test_edit_cfg_equals_its_own_and_apg_acts_on_the_generated_tokens_only(edit_pipe):
    """The reference image's tokens follow the generated ones (``img_shapes`` lists both); APG's per-sample norm
    threshold and projection see the generated tokens only, then the pipeline's per-token norm rescaling applies."""
    from guidance.pipeline import schedule_of
    from guidance.prediction import broadcast

    pipe = edit_pipe
    own = call(pipe, true_cfg_scale=4.0)
    with guide(pipe, CFG(4.0)):
        np.testing.assert_allclose(call(pipe), own, atol=2e-5)
    method = APG(6.0)

    def run():
        with guide(pipe, method):
            call(pipe)

    calls, steps = recorded_run(pipe, run)
    k = steps[0].shape[1]
    assert calls[0][0].shape[1] > k  # reference tokens follow
    schedule, state = schedule_of(pipe.scheduler), method.new_state("qwenimage")
    for (x, t, cond), (_, _, uncond), ours in zip(calls[::2], calls[1::2], steps):
        x, cond, uncond = x[:, :k].float(), cond[:, :k].float(), uncond[:, :k].float()
        a, b = schedule.coefficients(*schedule.alpha_sigma(torch.as_tensor(t).reshape(-1).float() * 1000))
        a, b = broadcast(a, x), broadcast(b, x)
        guided = cond + method.update(a * x + b * cond, a * x + b * uncond, state) / b
        rescaled = guided * cond.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True)
        torch.testing.assert_close(ours.float(), rescaled, rtol=1e-4, atol=1e-5)
