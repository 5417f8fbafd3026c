"""guide() on Wan text-to-video (latents (B, C, F, H, W); a separate unconditional call; Wan 2.2's second
transformer for the low-noise steps with its own CFG scale): CFG equals the pipeline's own in one and two stages,
PAG composed with the pipeline's own per-stage CFG equals the formula on the recorded branches, SLG and TPG on one
block compose, both transformers are left as found, and what cannot be served is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidance import APG, CFG, PAG, SLG, TPG, LangevinCorrector, guide
from tests.factories import (
    assert_modular_guider_equals_guide,
    noise_image,
    pipeline_snapshot,
    tiny_wan,
    tiny_wan_editor,
    tiny_wan_vace,
    wan_call_kwargs,
)
from tests.family_checks import (
    assert_apg_equals_the_formula,
    assert_batched_equals_own_calls,
    assert_cfg_equals_the_pipelines_own,
    scheduler_x0,
)
from tests.test_pipeline import assert_images_close


@pytest.fixture(
    scope="module",
    params=[(False, False), (True, False), (True, True)],
    ids=["wan2.1", "wan2.2_two_stages", "wan2.2_image_to_video"],
)
def pipe(request):
    two_stages, image = request.param
    return tiny_wan(two_stages=two_stages, image=image)


def call(pipe, **extra):
    return pipe(**(wan_call_kwargs(pipe) | extra), generator=torch.Generator().manual_seed(0)).frames


def _second_state(pipe):
    second = pipe.transformer_2
    return (
        None
        if second is None
        else (type(second), sorted(vars(second)), [len(m._forward_hooks) for m in second.modules()])
    )


def test_cfg_equals_the_pipelines_own_and_everything_is_left_as_found(pipe):
    own, unguided = call(pipe, guidance_scale=4.0), call(pipe, guidance_scale=1.0)
    before = pipeline_snapshot(pipe), _second_state(pipe)  # after a call: Wan's cache_context adds a hook registry
    assert np.abs(own - unguided).max() > 1e-4, "CFG must change this tiny model's output"
    with guide(pipe, CFG(4.0)):
        assert_images_close(call(pipe), own, atol=1e-5)
        if pipe.transformer_2 is not None:  # the method's scale decides in both stages
            assert_images_close(call(pipe, guidance_scale_2=2.5), own, atol=1e-5)
    with guide(pipe, APG(4.0), SLG(2.0, layers=(1,), start=0.0, stop=1.0), TPG(1.0, layers=(1,))):
        mixed = call(pipe)  # SLG and TPG on the same block
    assert np.isfinite(mixed).all() and np.abs(mixed - own).max() > 1e-4
    assert (pipeline_snapshot(pipe), _second_state(pipe)) == before


def _recorded(pipe, run):
    """``run()`` recording every transformer call (which transformer, its output) and the predictions the
    scheduler steps with."""
    calls, steps = [], []
    modules = [m for m in (pipe.transformer, pipe.transformer_2) if m is not None]
    hooks = [
        m.register_forward_hook(lambda mod, args, kwargs, out, k=k: calls.append((k, out[0].clone())), with_kwargs=True)
        for k, m in enumerate(modules)
    ]
    own_step = pipe.scheduler.step
    pipe.scheduler.step = lambda output, *a, **kw: steps.append(output.clone()) or own_step(output, *a, **kw)
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
        del pipe.scheduler.step
    return calls, steps


def test_pag_composes_with_the_pipelines_own_cfg_at_each_stages_scale(pipe):
    scales = {0: 4.0, 1: 2.5}  # transformer, transformer_2
    extra = {"guidance_scale": 4.0} | ({"guidance_scale_2": 2.5} if pipe.transformer_2 is not None else {})

    def run():
        with guide(pipe, PAG(2.0, layers=(0,))):
            call(pipe, **extra)

    calls, steps = _recorded(pipe, run)
    assert len(calls) == 2 * len(steps) == 8
    stages = [k for k, _ in calls[::2]]
    assert stages == sorted(stages) and set(stages) == ({0, 1} if pipe.transformer_2 is not None else {0})
    for (k, batched), (_, uncond), stepped in zip(calls[::2], calls[1::2], steps):
        cond, perturbed = batched.float().chunk(2)  # the conditional rows, then PAG's copy of them
        expected = uncond.float() + scales[k] * (cond - uncond.float()) + 2.0 * (cond - perturbed)
        torch.testing.assert_close(stepped.float(), expected, rtol=1e-4, atol=1e-5)
    if pipe.transformer_2 is not None:  # the control: one scale for both stages is another guidance
        (_, batched), (_, uncond) = calls[6], calls[7]
        cond, perturbed = batched.float().chunk(2)
        wrong = uncond.float() + 4.0 * (cond - uncond.float()) + 2.0 * (cond - perturbed)
        assert (wrong - steps[3].float()).abs().max() > 1e-3


def test_what_cannot_be_served_is_refused():
    pipe = tiny_wan(two_stages=True)
    with guide(pipe, PAG(2.0)), pytest.raises(ValueError, match="guidance_scale_2"):
        call(pipe, guidance_scale=4.0, guidance_scale_2=1.0)  # an unconditional call combined with nothing


@pytest.mark.parametrize(
    "method", [PAG(2.0), TPG(1.0), SLG(1.0, layers=(1,), start=0.0, stop=1.0)], ids=["pag", "tpg", "slg"]
)
def test_modular_wan_with_our_guiders_equals_guide_on_the_classic_pipeline(method):
    """diffusers' modular Wan denoise blocks on the same transformer (embeddings given, so no text encoder): its
    CFG guider equals the classic pipeline's CFG, and ``as_guider(CFG, method)`` equals ``guide()`` on the classic
    pipeline."""
    blocks = pytest.importorskip("diffusers.modular_pipelines.wan.modular_blocks_wan")
    kwargs = wan_call_kwargs()
    names = ("prompt_embeds", "negative_prompt_embeds", "height", "width", "num_frames", "num_inference_steps")
    assert_modular_guider_equals_guide(
        tiny_wan(),
        blocks.WanCoreDenoiseStep,
        method,
        modular_kwargs={k: kwargs[k] for k in names},
        classic_kwargs=kwargs,
        own_scale=4.0,
        output="frames",
    )


def test_video_to_video_cfg_and_perturbations():
    """Wan's video-to-video pipeline (one transformer, a separate unconditional call): CFG equals its own, and the
    perturbations batched equal their own calls."""
    import diffusers

    from tests.factories import noise_image
    from tests.family_checks import assert_batched_equals_own_calls, assert_cfg_equals_the_pipelines_own

    parts = tiny_wan().components
    pipe = diffusers.WanVideoToVideoPipeline(
        **{k: parts[k] for k in ("tokenizer", "text_encoder", "vae", "scheduler")}, transformer=parts["transformer"]
    )
    pipe.set_progress_bar_config(disable=True)
    video = [noise_image((16, 16), seed=i) for i in range(5)]

    def call_v2v(pipe, **extra):
        kwargs = wan_call_kwargs() | {"video": video, "strength": 0.75} | extra
        kwargs.pop("num_frames")
        return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames

    assert_cfg_equals_the_pipelines_own(pipe, call_v2v, atol=1e-5)
    for method in (PAG(1.0), TPG(1.0), SLG(1.0, layers=(1,), start=0.0, stop=1.0)):
        assert_batched_equals_own_calls(pipe, call_v2v, method, atol=1e-5)


@pytest.mark.parametrize("image", [True, False], ids=["ti2v_image", "ti2v_text"])
def test_wan22_ti2v_with_a_timestep_per_token(image):
    """Wan 2.2 TI2V (``expand_timesteps``): a timestep per token, the input image's latent frame in place of the
    first frame at time 0 (image-to-video). CFG equals the pipeline's own; APG acts on the generated frames alone
    there (the first frame keeps the conditional output, which the pipeline replaces by the image), tested against
    the formula on the recorded calls, and on every frame in text-to-video; PAG batched equals its own calls; the
    corrector is refused beside the image's frame."""
    pipe = tiny_wan(expand_timesteps=True, image=image)
    latent = lambda p, **extra: call(p, output_type="latent", **extra)
    assert_cfg_equals_the_pipelines_own(pipe, latent, atol=1e-5)
    generated = (2, slice(1, None)) if image else None
    assert_apg_equals_the_formula(
        pipe, latent, "wan", scheduler_x0(pipe), steps=4, sequential=True, generated=generated
    )
    assert_batched_equals_own_calls(pipe, latent, PAG(1.0), atol=1e-5)
    if image:
        with guide(pipe, PAG(1.0), LangevinCorrector()), pytest.raises(ValueError, match="condition tokens"):
            latent(pipe, guidance_scale=1.0)


@pytest.fixture(scope="module")
def vace():
    return tiny_wan_vace()


def call_vace(pipe, **extra):
    """One prompt and a control video (and, with ``reference``, a reference image whose latent frame precedes the
    video's); the per-layer control scale, one VACE layer, has as many entries as the batch and must not be rebound
    as one."""
    video = [noise_image((16, 16), seed=seed) for seed in range(5)]
    kwargs = wan_call_kwargs() | {"output_type": "latent", "video": video, "conditioning_scale": 0.8}
    return pipe(**kwargs | extra, generator=torch.Generator().manual_seed(0)).frames.numpy()


@pytest.mark.parametrize("reference", [False, True], ids=["video", "reference"])
def test_wan_vace(vace, reference):
    """VACE's control latents go through its VACE blocks into the main ones: CFG equals the pipeline's own, APG the
    formula on the recorded calls, PAG (on a main block by default) batched equals its own calls."""
    extra = {"reference_images": noise_image((16, 16), seed=9)} if reference else {}
    run = lambda p, **more: call_vace(p, **extra | more)
    assert_cfg_equals_the_pipelines_own(vace, run, atol=1e-5)
    assert_apg_equals_the_formula(vace, run, "wan", scheduler_x0(vace), steps=4, sequential=True)
    assert list(PAG(1.0).edits(vace.transformer)) == ["blocks.1.attn1"]  # a main block, not a VACE one
    assert_batched_equals_own_calls(vace, run, PAG(1.0), atol=1e-5)


@pytest.fixture(scope="module", params=["ChronoEditPipeline", "LucyEditPipeline"])
def editor(request):
    return tiny_wan_editor(request.param)


def call_editor(pipe, **extra):
    kwargs = wan_call_kwargs() | {"output_type": "latent"}
    if type(pipe).__name__ == "ChronoEditPipeline":
        kwargs |= {"image": noise_image((16, 16), seed=29), "num_frames": 5}
    else:
        kwargs["video"] = [noise_image((16, 16), seed=seed) for seed in range(5)]
    return pipe(**kwargs | extra, generator=torch.Generator().manual_seed(0)).frames.numpy()


def test_the_editors_built_on_wan(editor):
    """ChronoEdit and Lucy Edit: the condition's channels after the latents'; CFG equals the pipeline's own, APG the
    formula on the recorded calls, PAG batched equals its own calls."""
    assert_cfg_equals_the_pipelines_own(editor, call_editor, atol=1e-5)
    x0 = scheduler_x0(editor)
    assert_apg_equals_the_formula(editor, call_editor, "wan", x0, steps=4, sequential=True, latents=lambda x: x[:, :16])
    assert_batched_equals_own_calls(editor, call_editor, PAG(1.0), atol=1e-5)


def test_chronoedit_temporal_reasoning():
    """Temporal reasoning (UniPC, as the pipeline needs) denoises 3 latent frames for its first 2 steps, then keeps
    the first and the last: APG's momentum restarts on the new shape (it would not fit the old one), and PAG
    batched equals its own calls across the change."""
    import diffusers

    pipe = tiny_wan_editor("ChronoEditPipeline")
    pipe.scheduler = diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0
    )
    reasoning = {"num_frames": 9, "enable_temporal_reasoning": True, "num_temporal_reasoning_steps": 2}
    run = lambda p, **extra: call_editor(p, **reasoning | extra)
    assert_cfg_equals_the_pipelines_own(pipe, run, atol=1e-5)
    assert_batched_equals_own_calls(pipe, run, PAG(1.0), atol=1e-5)
