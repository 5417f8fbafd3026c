"""guide() the way diffusers users run pipelines: intervals over the steps a call runs, offload, compile,
shared components, callbacks (issue #14)."""

from __future__ import annotations

import dataclasses
import math
import threading

import diffusers
import diffusers.callbacks
import numpy as np
import pytest
import torch

from guidance import APG, CFG, PAG, TPG, LangevinCorrector, SoftPAG, guide
from guidance.hooks import intercepted
from guidance.pipeline import family_of
from tests.factories import BUILDERS, UnlistedAttnProcessor, pipeline_snapshot
from tests.test_pipeline import recording, run


def fresh(name):
    return BUILDERS[name]()


@dataclasses.dataclass(frozen=True)
class CountingCFG(CFG):
    """CFG that records each step it acts on."""

    log: list = dataclasses.field(default_factory=list, compare=False, hash=False)

    def update(self, pred_cond, pred_other, state=None):
        self.log.append(1)
        return super().update(pred_cond, pred_other, state)


# --- item 5: guidance intervals count the denoising steps the call actually runs ---


@pytest.mark.parametrize(
    ("name", "scheduler", "extra", "expected_steps"),
    [
        ("sd_img2img", "DDIMScheduler", {"strength": 0.5, "num_inference_steps": 8}, 4),
        ("sd_img2img", "PNDMScheduler", {"strength": 0.5, "num_inference_steps": 8}, None),
        ("sd_img2img", "DDPMScheduler", {"strength": 0.5, "num_inference_steps": 8}, 4),
        ("sd_img2img", "EulerDiscreteScheduler", {"strength": 0.5, "num_inference_steps": 8}, 4),
        ("sd_img2img", "DPMSolverMultistepScheduler", {"strength": 0.5, "num_inference_steps": 8}, 4),
        ("sd_img2img", "HeunDiscreteScheduler", {"strength": 0.5, "num_inference_steps": 4}, None),
        ("sd", "DDIMScheduler", {"num_inference_steps": 4}, 4),
        ("sdxl", None, {"denoising_end": 0.5, "num_inference_steps": 4}, 2),
        ("sdxl_img2img", None, {"denoising_start": 0.5, "num_inference_steps": 4}, 2),
        ("sdxl_img2img", "DDIMScheduler", {"strength": 0.5, "num_inference_steps": 8}, 4),
        ("sd3_img2img", None, {"strength": 0.5, "num_inference_steps": 8}, 4),
        ("flux", None, {"num_inference_steps": 4}, 4),
    ],
)
@pytest.mark.parametrize(("start", "stop"), [(0.0, 0.5), (0.5, 1.0)])
def test_interval_counts_the_steps_the_call_runs(name, scheduler, extra, expected_steps, start, stop):
    pipe = fresh(name)
    if scheduler is not None:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    method = CountingCFG(5.0, start=start, stop=stop)
    with recording(pipe) as (calls, _), guide(pipe, method):
        run(pipe, **extra)
    evaluations = len(calls) // (2 if name == "flux" else 1)  # FLUX's true CFG: two calls per step
    if expected_steps is not None:
        assert evaluations == expected_steps
    # step i of n is guided when start <= i / n < stop
    assert len(method.log) == math.ceil(stop * evaluations) - math.ceil(start * evaluations)


# --- item 1: offloading; a guided call stays guided on every call of a block ---


def _offload(pipe, how):
    cpu = torch.device("cpu")
    if how == "model":
        pipe.enable_model_cpu_offload(device="cpu")  # the accelerator is the CPU here; the hooks are the same
    elif how == "group":
        pipe.enable_group_offload(
            onload_device=cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1
        )
    else:
        pipe.enable_sequential_cpu_offload()


@pytest.mark.parametrize(
    ("name", "how"),
    [
        ("sd", "model"),
        ("sdxl", "model"),
        ("flux", "model"),
        ("sd", "group"),
        ("sd3", "group"),
        pytest.param(
            "sd", "sequential", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
        ),
    ],
)
def test_offloaded_pipeline_is_guided_on_every_call(name, how):
    pipe = fresh(name)
    reference = run(pipe, scale=9.0)
    with guide(pipe, CFG(2.0), PAG(2.0)):
        reference_pag = run(pipe)
    _offload(pipe, how)
    np.testing.assert_allclose(run(pipe, scale=9.0), reference, atol=1e-5)  # diffusers itself works
    with guide(pipe, CFG(9.0)):
        for _ in range(3):  # diffusers re-applies model offloading after every call (maybe_free_model_hooks)
            np.testing.assert_allclose(run(pipe), reference, atol=1e-5)
    with guide(pipe, CFG(2.0), PAG(2.0)):
        for _ in range(2):
            np.testing.assert_allclose(run(pipe), reference_pag, atol=1e-5)
    np.testing.assert_allclose(run(pipe, scale=9.0), reference, atol=1e-5)
    assert not intercepted(getattr(pipe, family_of(pipe).denoiser))


# --- item 2: torch.compile, both ways, without a recompilation per step ---


@pytest.mark.slow
@pytest.mark.parametrize("how", ["torch.compile", "module.compile"])
def test_compiled_denoiser_is_guided_without_recompiling(how):
    from torch._dynamo.utils import counters

    pipe = fresh("sd")
    reference = run(pipe, scale=9.0, num_inference_steps=4)
    with guide(pipe, CFG(2.0), PAG(2.0)):
        reference_pag = run(pipe, num_inference_steps=4)
    torch.compiler.reset()
    counters.clear()
    if how == "torch.compile":
        pipe.unet = torch.compile(pipe.unet, backend="eager")
    else:
        pipe.unet.compile(backend="eager")
    seen = []

    def count(pipe, i, t, kwargs):
        seen.append((counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())))
        return kwargs

    for methods, expected in (((CFG(9.0),), reference), ((CFG(2.0), PAG(2.0)), reference_pag)):
        seen.clear()
        with guide(pipe, *methods):
            for _ in range(2):
                np.testing.assert_allclose(
                    run(pipe, num_inference_steps=4, callback_on_step_end=count), expected, atol=1e-5
                )
        # compiled at the first step only: no new graph, graph break or recompilation at any later step or call
        assert len(seen) == 8 and len(set(seen)) == 1, seen
    graphs, breaks = seen[-1]
    assert graphs <= 16 and breaks <= 8  # PAG: the perturbed attention runs eagerly between compiled graphs
    assert counters["recompiles"] == {} or sum(counters["recompiles"].values()) == 0


# --- item 3: shared components, threads, all-or-nothing entry ---


def _sharing_pair():
    t2i = fresh("sd")
    i2i = diffusers.StableDiffusionImg2ImgPipeline.from_pipe(t2i)
    assert i2i.unet is t2i.unet
    return t2i, i2i


def test_pipelines_sharing_the_denoiser_are_guided_independently():
    t2i, i2i = _sharing_pair()
    plain_i2i = run(i2i)
    with guide(t2i, CFG(7.0)):
        expected_t2i = run(t2i)
        np.testing.assert_array_equal(run(i2i), plain_i2i)  # a call of the other pipeline is untouched
    with guide(i2i, PAG(2.0)):
        expected_i2i = run(i2i)
    before = pipeline_snapshot(t2i), pipeline_snapshot(i2i)
    # nested on both, left in the non-nested order
    outer, inner = guide(t2i, CFG(7.0)), guide(i2i, PAG(2.0))
    outer.__enter__()
    inner.__enter__()
    np.testing.assert_array_equal(run(t2i), expected_t2i)
    np.testing.assert_array_equal(run(i2i), expected_i2i)
    outer.__exit__(None, None, None)
    np.testing.assert_array_equal(run(i2i), expected_i2i)
    np.testing.assert_array_equal(run(t2i, scale=7.5), run(fresh("sd"), scale=7.5))
    inner.__exit__(None, None, None)
    assert (pipeline_snapshot(t2i), pipeline_snapshot(i2i)) == before
    with guide(t2i, PAG(2.0)):  # nothing left behind that would refuse the next guide()
        run(t2i)


@pytest.mark.parametrize("outer_method", [PAG(3.0), SoftPAG(3.0, heads=[("mid", 0)], strength=0.5)])
def test_attention_perturbation_outlives_another_guide_on_the_same_layer_that_leaves_first(outer_method):
    """Two guides hook the same attention modules; the one entered first leaves first (threads do that): the
    other's perturbation must go on acting (diffusers' hook removal used to hand its wrapper the plain forward)."""
    t2i, i2i = _sharing_pair()
    plain = run(i2i)
    with guide(i2i, PAG(2.0)):
        expected = run(i2i)
    assert np.abs(expected - plain).max() > 1e-3
    outer, inner = guide(t2i, outer_method), guide(i2i, PAG(2.0))
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)
    np.testing.assert_array_equal(run(i2i), expected)
    inner.__exit__(None, None, None)
    np.testing.assert_array_equal(run(i2i), plain)
    assert not intercepted(t2i.unet)


def _interleaved(*jobs):
    """Run the jobs in threads whose pipeline steps alternate (a barrier at every step end)."""
    barrier = threading.Barrier(len(jobs), timeout=60)

    def step_end(pipe, i, t, kwargs):
        barrier.wait()
        return kwargs

    results, errors = [None] * len(jobs), []

    def work(k):
        try:
            results[k] = jobs[k](step_end)
        except BaseException as error:  # reported below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def test_a_guided_call_and_an_unguided_call_of_a_sharing_pipeline_in_two_threads():
    t2i, i2i = _sharing_pair()
    i2i.scheduler = type(t2i.scheduler).from_config(t2i.scheduler.config)  # schedulers hold per-call state
    plain_i2i = run(i2i)
    with guide(t2i, APG(7.0)):
        expected = run(t2i)
        guided, unguided = _interleaved(
            lambda cb: run(t2i, callback_on_step_end=cb), lambda cb: run(i2i, callback_on_step_end=cb)
        )
    np.testing.assert_array_equal(guided, expected)
    np.testing.assert_array_equal(unguided, plain_i2i)


def test_a_second_concurrent_call_of_one_guided_pipeline_is_refused():
    pipe = fresh("sd")
    started, release = threading.Event(), threading.Event()

    def step_end(p, i, t, kwargs):
        started.set()
        release.wait(60)
        return kwargs

    with guide(pipe, CFG(5.0)):
        first = threading.Thread(target=lambda: run(pipe, callback_on_step_end=step_end))
        first.start()
        started.wait(60)
        try:
            with pytest.raises(RuntimeError, match="already running a call"):
                run(pipe)
        finally:
            release.set()
            first.join()
        run(pipe)  # free again


def _everything(pipe):
    """Classes, attributes and torch hooks of every module of the pipeline, the pipeline's and scheduler's own."""
    state = {"pipe": (type(pipe), sorted(vars(pipe))), "scheduler": sorted(vars(pipe.scheduler))}
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            for sub, m in component.named_modules():
                state[f"{name}.{sub}"] = (type(m), sorted(vars(m)), len(m._forward_hooks), len(m._forward_pre_hooks))
    return state


@pytest.mark.parametrize(
    "failure",
    ["selector", "processor", "second_attach", "intercept", "pipeline_class", "corrector", "already_guided", "body"],
)
def test_entry_is_all_or_nothing(failure, monkeypatch):
    import guidance.perturbation as perturbation
    import guidance.pipeline as pipeline

    pipe = fresh("sd")
    methods = [CFG(3.0), PAG(2.0, layers=("mid", "up_blocks.0")), TPG(2.0), LangevinCorrector()]
    if failure == "selector":
        methods[1] = PAG(2.0, layers=("mid", "no_such_layer"))
    elif failure == "processor":
        pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1.set_processor(UnlistedAttnProcessor())
    before = _everything(pipe)

    def boom(*args, **kwargs):
        raise RuntimeError("injected")

    if failure == "second_attach":
        calls, real = [], perturbation.attach
        monkeypatch.setattr(
            perturbation, "attach", lambda *a: boom() if calls.append(1) or len(calls) == 2 else real(*a)
        )
    elif failure == "intercept":
        monkeypatch.setattr(pipeline, "intercept_calls", boom)
    elif failure == "pipeline_class":
        monkeypatch.setattr(pipeline, "_guided_class", boom)
    elif failure == "corrector":
        monkeypatch.setattr(pipeline, "_correcting_step", boom)
    with pytest.raises((ValueError, RuntimeError)):
        if failure == "already_guided":
            with guide(pipe, CFG(2.0)), guide(pipe, *methods):
                pass
        else:
            with guide(pipe, *methods):
                if failure == "body":
                    raise RuntimeError("in the block")
                if failure == "corrector":  # the scheduler's step is wrapped per call: the call fails
                    run(pipe)
    assert _everything(pipe) == before
    assert not intercepted(pipe.unet)


# --- item 4: step-end callbacks that switch CFG off: the branch layout is read at every step ---


def _batch_cutoff(base):
    """diffusers' cut-off callback keeping the conditional half of a batch of any size (theirs keeps one row)."""

    class Cutoff(base):
        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            if step_index == int(pipeline.num_timesteps * self.config.cutoff_step_ratio):
                pipeline._guidance_scale = 0.0
                for name in self.tensor_inputs:
                    callback_kwargs[name] = callback_kwargs[name].chunk(2)[1]
            return callback_kwargs

    return Cutoff


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3"])
def test_perturbation_only_follows_a_callback_that_changes_the_pipelines_scale(name):
    """With perturbations only, guide() keeps the pipeline's own CFG: at the scale the pipeline holds at each
    step (a dynamic-CFG callback writes pipe._guidance_scale), not the one it started with."""
    pipe = fresh(name)

    def schedule(p, i, t, kwargs):
        p._guidance_scale = 1.5 if i == 0 else 3.0
        return kwargs

    call = {"num_inference_steps": 4, "callback_on_step_end": schedule}
    reference = run(pipe, scale=7.0, **call)
    assert np.abs(reference - run(pipe, scale=7.0, num_inference_steps=4)).max() > 1e-3  # the callback matters
    with guide(pipe, PAG(0.0)):  # a perturbation at scale 0: exactly the pipeline's own CFG
        np.testing.assert_allclose(run(pipe, scale=7.0, **call), reference, atol=1e-5)


@pytest.mark.parametrize("name", ["sd", "sdxl"])
@pytest.mark.parametrize("prompts", [1, 2])
def test_cfg_cutoff_callbacks(name, prompts):
    pipe = fresh(name)
    cutoff = diffusers.callbacks.SDXLCFGCutoffCallback if name == "sdxl" else diffusers.callbacks.SDCFGCutoffCallback
    if prompts > 1:
        cutoff = _batch_cutoff(cutoff)
    kwargs = {"prompt": ["a red fox", "a blue bird"][:prompts], "num_inference_steps": 4}

    def call(**extra):
        return run(pipe, **kwargs, callback_on_step_end=cutoff(cutoff_step_ratio=0.5), **extra)

    reference = call(scale=6.0)
    with guide(pipe, CFG(6.0)):
        np.testing.assert_allclose(call(), reference, atol=1e-5)
    with guide(pipe, APG(6.0)):
        assert np.isfinite(call()).all()
