"""guide() on tiny random-weight pipelines of every supported family, against the pipelines' own CFG,
references computed from the schedulers' own noise levels, and diffusers' APG."""

from __future__ import annotations

import contextlib
import inspect
import math

import numpy as np
import pytest
import torch

from guidance import APG, CFG, PAG, guide
from guidance.hooks import intercepted
from guidance.pipeline import family_of
from tests.factories import BUILDERS, default_call_kwargs, pipeline_snapshot

NAMES = sorted(BUILDERS)
_CACHE: dict[str, object] = {}


def get_pipe(name):
    if name not in _CACHE:
        _CACHE[name] = BUILDERS[name]()
    return _CACHE[name]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def run(pipe, scale=None, seed=0, **extra):
    """Call ``pipe`` with its own CFG at ``scale`` (``None``: the call's default)."""
    kwargs = default_call_kwargs(pipe) | extra
    if scale is not None:
        family = family_of(pipe)
        kwargs[family.scale_arg] = scale
        if family.name == "flux":
            kwargs.setdefault("negative_prompt", "")
    return pipe(**kwargs, generator=gen(seed)).images


def assert_cfg_and_plain_apg_reproduce_the_pipeline(pipe, scale=4.0):
    reference = run(pipe, scale=scale)
    with guide(pipe, CFG(scale)):
        assert_images_close(run(pipe), reference)
    with guide(pipe, APG(scale, eta=1.0, norm_threshold=None, momentum=0.0)):
        assert_images_close(run(pipe), reference, atol=1e-4)


def assert_images_close(a, b, atol=2e-5):
    np.testing.assert_allclose(a, b, atol=atol, rtol=0)


class Steps(list):
    """The model outputs the scheduler stepped with; ``.samples``: the samples it stepped from."""

    def __init__(self) -> None:
        super().__init__()
        self.samples: list[torch.Tensor] = []


@contextlib.contextmanager
def recording(pipe):
    """Record the denoiser's raw inputs/outputs and what the scheduler steps with.

    Each call is recorded with the noise level its input was prepared at: the scale factor that the scheduler's
    own ``scale_model_input`` applied (k-diffusion-style schedulers), or the step index (flow matching).
    Enter it before guide() so that guide's hook wraps the recorder and the records are the raw outputs.
    """
    family = family_of(pipe)
    denoiser, scheduler = getattr(pipe, family.denoiser), pipe.scheduler
    calls, steps, input_scale = [], Steps(), [1.0]
    original_forward, original_step = denoiser.forward, scheduler.step
    original_scale = getattr(scheduler, "scale_model_input", None)
    signature = inspect.signature(type(denoiser).forward.__get__(denoiser))
    sample_arg = next(iter(signature.parameters))

    def forward(*args, **kwargs):
        out = original_forward(*args, **kwargs)
        bound = signature.bind_partial(*args, **kwargs).arguments
        x, t = bound[sample_arg], bound["timestep"]
        sample = out[0] if isinstance(out, tuple) else out.sample
        index = getattr(scheduler, "step_index", None)
        if index is None and hasattr(scheduler, "sigmas"):  # set on the first step() of flow-matching schedulers
            index = getattr(scheduler, "begin_index", None) or 0
        calls.append((x.clone(), torch.as_tensor(t).clone(), sample.clone(), (index, input_scale[0])))
        return out

    def step(model_output, timestep, sample, *args, **kwargs):
        steps.append(model_output.clone())
        steps.samples.append(sample.clone())
        return original_step(model_output, timestep, sample, *args, **kwargs)

    def scale_model_input(sample, *args, **kwargs):
        out = original_scale(sample, *args, **kwargs)
        input_scale[0] = (out.double().norm() / sample.double().norm()).item()
        return out

    denoiser.forward, scheduler.step = forward, step
    if original_scale is not None:
        scheduler.scale_model_input = scale_model_input
    try:
        yield calls, steps
    finally:
        del denoiser.forward, scheduler.step
        vars(scheduler).pop("scale_model_input", None)


def branches(pipe, calls):
    """Per step: (x, t, cond, uncond, step index) from the raw denoiser calls."""
    family = family_of(pipe)
    out = []
    if family.layout == "sequential":
        for (x, t, cond, i), (_, _, uncond, _) in zip(calls[::2], calls[1::2]):
            out.append((x, t, cond, uncond, i))
        return out
    for x, t, pred, i in calls:
        channels = x.shape[1]
        pred = pred[:, :channels] if pred.shape[1] == 2 * channels else pred
        first, second = pred.chunk(2)
        cond, uncond = (second, first) if family.layout == "uncond_cond" else (first, second)
        out.append((x.chunk(2)[0], t.reshape(-1)[0], cond, uncond, i))
    return out


def reference_x0_coefficients(pipe, t, where):
    """(A, B) with x0 = A x + B pred, from the scheduler's own tables (independent of guidance.prediction)."""
    scheduler = pipe.scheduler
    step_index, input_scale = where
    kind = scheduler.config.get("prediction_type", "epsilon")
    if type(scheduler).__name__.startswith("FlowMatch"):
        sigma = scheduler.sigmas[step_index].double()
        return 1.0, -sigma
    table = scheduler.alphas_cumprod.double().numpy()
    if float(t) == int(t):
        abar = torch.tensor(table[int(t)])
    else:  # a fractional timestep means the noise level interpolated in log-sigma between its neighbours
        log_sigmas = 0.5 * np.log((1 - table) / table)
        sigma = np.exp(np.interp(float(t), np.arange(len(table)), log_sigmas))
        abar = torch.tensor(1 / (1 + sigma**2))
        assert abs(input_scale - 1) < 1e-6 or abs(input_scale**2 - abar.item()) < 2e-3  # the scheduler agrees
    a, s = abar.sqrt(), (1 - abar).sqrt()
    if kind == "epsilon":
        return 1 / a, -s / a
    if kind == "v_prediction":
        return a, -s
    raise AssertionError(kind)


def reference_apg(c, u, w, eta, r, beta, buffer):
    """Algorithm 1 of the APG paper, written out per sample in float64."""
    d = c - u
    if beta:
        buffer[0] = d if buffer[0] is None else d + beta * buffer[0]
        d = buffer[0]
    out = []
    for ci, di in zip(c, d):
        if r is not None:
            di = di * min(1.0, r / di.norm().item())
        par = (di * ci).sum() / (ci * ci).sum() * ci
        out.append(ci + (w - 1) * ((di - par) + eta * par))
    return torch.stack(out)


@pytest.mark.parametrize("name", NAMES)
def test_cfg_reproduces_the_pipelines_own_cfg(name):
    pipe = get_pipe(name)
    reference = run(pipe, scale=4.0)
    assert np.abs(reference - run(pipe, scale=1.0)).max() > 1e-3, "CFG must change this tiny model's output"
    with guide(pipe, CFG(4.0)):
        guided = run(pipe)  # the call's own scale only switches the unconditional branch on
    assert_images_close(guided, reference, atol=1e-4 if family_of(pipe).layout == "sequential" else 2e-5)


@pytest.mark.parametrize("name", NAMES)
def test_apg_with_eta_one_and_no_extras_equals_cfg(name):
    pipe = get_pipe(name)
    reference = run(pipe, scale=3.0)
    with guide(pipe, APG(3.0, eta=1.0, norm_threshold=None, momentum=0.0)):
        guided = run(pipe, scale=1.0)
    assert_images_close(guided, reference, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_x0_space_apg_matches_reference_from_converted_predictions(name):
    pipe = get_pipe(name)
    w, eta, r, beta = 5.0, 0.0, 1.0, -0.5
    with recording(pipe) as (calls, steps), guide(pipe, APG(w, eta=eta, norm_threshold=r, momentum=beta)):
        run(pipe)
    buffer = [None]
    per_step = branches(pipe, calls)
    assert len(per_step) == len(steps) > 0
    changed = 0.0
    for (x, t, cond, uncond, i), stepped in zip(per_step, steps):
        a, b = reference_x0_coefficients(pipe, t, i)
        x, cond, uncond = x.double(), cond.double(), uncond.double()
        x0 = reference_apg(a * x + b * cond, a * x + b * uncond, w, eta, r, beta, buffer)
        expected = (x0 - a * x) / b
        got = stepped[: expected.shape[0]].double()
        if got.shape[1] != expected.shape[1]:
            got = got[:, : expected.shape[1]]
        torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-4, atol=2e-4)
        changed = max(changed, (expected - cond).abs().max().item())
    assert changed > 1e-3, "APG must change the prediction"


@pytest.mark.parametrize("name", ["sd", "sd3", "flux", "dit"])
def test_model_space_apg_matches_diffusers(name):
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

    pipe = get_pipe(name)
    w, eta, r, beta = 6.0, 0.25, 2.0, -0.5
    apg = APG(w, eta=eta, norm_threshold=r, momentum=beta, space="model")
    with recording(pipe) as (calls, steps), guide(pipe, apg):
        run(pipe)
    buffer = MomentumBuffer(beta)
    for (_, _, cond, uncond, _), stepped in zip(branches(pipe, calls), steps):
        expected = normalized_guidance(cond, uncond, w - 1, buffer, eta, r, use_original_formulation=True)
        got = stepped[: expected.shape[0], : expected.shape[1]]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_pipeline_is_unchanged_after_the_context_and_seeds_reproduce(name):
    pipe = get_pipe(name)
    before, snapshot = run(pipe), pipeline_snapshot(pipe)
    with guide(pipe, APG(6.0)) as guided_pipe:
        assert guided_pipe is pipe and isinstance(pipe, snapshot["class"])
        first, second = run(pipe), run(pipe)  # momentum restarts with every call
        other_seed = run(pipe, seed=1)
        assert intercepted(pipe_denoiser(pipe))
    assert pipeline_snapshot(pipe) == snapshot
    assert type(pipe).__name__ == snapshot["class"].__name__
    np.testing.assert_array_equal(first, second)
    assert np.abs(first - other_seed).max() > 1e-3
    assert np.abs(first - before).max() > 1e-4, "APG(6) must differ from the pipeline's default guidance"
    np.testing.assert_array_equal(run(pipe), before)


def pipe_denoiser(pipe):
    return getattr(pipe, family_of(pipe).denoiser)


def test_pipeline_is_restored_when_the_call_raises():
    pipe = get_pipe("sd")
    snapshot = pipeline_snapshot(pipe)
    with pytest.raises(ValueError), guide(pipe, CFG(3.0)):
        pipe(prompt="x", height=33, width=32)  # not a multiple of 8
    assert pipeline_snapshot(pipe) == snapshot


def test_flux_distilled_guidance_is_kept_beside_true_cfg():
    pipe = get_pipe("flux")
    assert pipe.transformer.config.guidance_embeds
    reference = run(pipe, scale=3.0, guidance_scale=5.0)
    with guide(pipe, CFG(3.0)):
        guided = run(pipe, guidance_scale=5.0)
        other = run(pipe, guidance_scale=1.0)
    assert_images_close(guided, reference, atol=1e-4)
    assert np.abs(guided - other).max() > 1e-4, "the distilled guidance embedding must still act"


def test_flux_guided_by_a_cfg_type_method_does_not_depend_on_the_callers_true_cfg_scale():
    """The engine solves FLUX's own u + s (c - u) for u; with s near 1 (or large) the solve's rounding grows,
    so the pipeline's s is always the forced 2: the same images, bit for bit, whatever the caller passed."""
    pipe = get_pipe("flux")
    with guide(pipe, APG(3.0)):
        images = [run(pipe, scale=s) for s in (2.0, 1.01, 7.0)]
    np.testing.assert_array_equal(images[1], images[0])
    np.testing.assert_array_equal(images[2], images[0])


@pytest.mark.parametrize(
    "scheduler_name, options",
    [
        ("DDIMScheduler", {}),
        ("DDPMScheduler", {}),
        ("PNDMScheduler", {"skip_prk_steps": True}),
        ("LMSDiscreteScheduler", {}),
        ("EulerDiscreteScheduler", {}),
        ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
        ("EulerAncestralDiscreteScheduler", {}),
        ("HeunDiscreteScheduler", {}),
        ("KDPM2DiscreteScheduler", {}),
        ("DPMSolverMultistepScheduler", {}),
        ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"}),
        ("DPMSolverSinglestepScheduler", {}),
        ("UniPCMultistepScheduler", {}),
        ("DEISMultistepScheduler", {}),
        ("EDMEulerScheduler", {}),
        ("EDMDPMSolverMultistepScheduler", {}),
    ],
)
def test_any_scheduler_sd_accepts(scheduler_name, options):
    import diffusers

    pipe = BUILDERS["sd"]()
    cls = getattr(diffusers, scheduler_name)
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **options)
    assert_cfg_and_plain_apg_reproduce_the_pipeline(pipe)
    if not scheduler_name.startswith("EDM"):  # EDM's F-prediction has no alphas_cumprod reference
        with recording(pipe) as (calls, steps), guide(pipe, APG(5.0)):
            run(pipe)
        apg = APG(5.0)
        state = apg.new_state("sd")
        for (x, t, cond, uncond, i), stepped in zip(branches(pipe, calls), steps):
            a, b = reference_x0_coefficients(pipe, t, i)
            x, cond, uncond = x.double(), cond.double(), uncond.double()
            update = apg.update(a * x + b * cond, a * x + b * uncond, state) / b
            # near t = 0 the x0 -> eps map multiplies float32 rounding by 1 / |B| ~ 34, hence 1e-3
            torch.testing.assert_close(stepped.double(), cond + update, rtol=1e-3, atol=1e-3)


def test_unsupported_pipelines_get_clear_errors():
    from diffusers import DDPMPipeline, UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    with pytest.raises(TypeError, match=r"cannot serve DDPMPipeline.*StableDiffusionPipeline"):
        with guide(DDPMPipeline(unet=unet, scheduler=pipe_scheduler()), CFG(3.0)):
            pass
    pipe = get_pipe("sd")
    with pytest.raises(ValueError, match="at least one"):
        with guide(pipe):
            pass
    with pytest.raises(TypeError, match="guidance methods"):
        with guide(pipe, 7.5):  # type: ignore[arg-type]
            pass
    with pytest.raises(ValueError, match="at most one"):
        with guide(pipe, CFG(3.0), APG(3.0)):
            pass
    with guide(pipe, CFG(3.0)):
        with pytest.raises(RuntimeError, match="already inside guide"):
            with guide(pipe, APG(3.0)):
                pass
    assert type(pipe).__name__ == "StableDiffusionPipeline"


def pipe_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler()


def test_unknown_scheduler_and_distilled_unet_are_refused():
    pipe = BUILDERS["sd"]()
    pipe.scheduler = type("MyScheduler", (), {"config": {"prediction_type": "epsilon"}})()
    with pytest.raises(TypeError, match="cannot read the noise schedule of MyScheduler"):
        with guide(pipe, CFG(3.0)):
            pass
    pipe = BUILDERS["sd"]()
    pipe.unet.register_to_config(time_cond_proj_dim=8)
    with guide(pipe, CFG(3.0)), pytest.raises(ValueError, match="time_cond_proj_dim"):
        run(pipe)


def test_flux_with_prompt_embeds_needs_negative_embeds():
    pipe = get_pipe("flux")
    embeds, pooled, _ = pipe.encode_prompt(prompt="a", prompt_2=None, max_sequence_length=64)
    kwargs = default_call_kwargs(pipe)
    del kwargs["prompt"]
    with guide(pipe, CFG(3.0)), pytest.raises(ValueError, match="negative_prompt_embeds"):
        pipe(**kwargs, prompt_embeds=embeds, pooled_prompt_embeds=pooled)
    with guide(pipe, CFG(3.0)):
        out = pipe(
            **kwargs,
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            negative_prompt_embeds=embeds,
            negative_pooled_prompt_embeds=pooled,
            generator=gen(),
        ).images
    assert math.isfinite(float(out.sum()))
    # FLUX runs true CFG only with both negative embeddings: one alone must not pass for an unconditional branch
    for methods in [(CFG(3.0),), (PAG(2.0),)]:
        for half in [{"negative_prompt_embeds": embeds}, {"negative_pooled_prompt_embeds": pooled}]:
            with guide(pipe, *methods), pytest.raises(ValueError, match="together"):
                pipe(**kwargs, prompt_embeds=embeds, pooled_prompt_embeds=pooled, true_cfg_scale=3.0, **half)


def test_denoiser_called_outside_a_pipeline_call_is_untouched():
    pipe = get_pipe("sd")
    x = torch.randn(2, 4, 4, 4, generator=gen())
    emb = torch.randn(2, 7, 32, generator=gen())
    with torch.no_grad():
        plain = pipe.unet(x, 10, encoder_hidden_states=emb).sample
        with guide(pipe, APG(5.0)):
            hooked = pipe.unet(x, 10, encoder_hidden_states=emb).sample
    torch.testing.assert_close(plain, hooked, rtol=0, atol=0)


@pytest.mark.parametrize(
    "scheduler_name, options",
    [
        ("FlowMatchEulerDiscreteScheduler", {}),
        ("FlowMatchHeunDiscreteScheduler", {}),
        ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
        ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
    ],
)
def test_flow_matching_schedulers_sd3_accepts(scheduler_name, options):
    import diffusers

    pipe = BUILDERS["sd3"]()
    cls = getattr(diffusers, scheduler_name)
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **options)
    assert_cfg_and_plain_apg_reproduce_the_pipeline(pipe)
    with guide(pipe, APG(4.0)):
        assert np.isfinite(run(pipe)).all()


@pytest.mark.parametrize("name", ["sd", "flux", "dit"])
def test_half_precision_runs_in_the_models_dtype(name):
    pipe = BUILDERS[name]().to(dtype=torch.bfloat16)
    reference = run(pipe, scale=3.0)
    with guide(pipe, CFG(3.0)):
        guided = run(pipe)
    with guide(pipe, APG(3.0)):
        apg = run(pipe)
    assert np.isfinite(apg).all()
    np.testing.assert_allclose(guided, reference, atol=0.03)  # bf16 rounding, 3 steps
