"""Checks every ``guide()`` family test runs on its tiny pipeline, called through the test's ``call(pipe,
**extra)`` (seeded, returning the images as numpy arrays)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from guidance import APG, CFG, PAG, SLG, guide
from guidance.pipeline import family_of, schedule_of
from guidance.prediction import broadcast
from tests.factories import pipeline_snapshot, recorded_run

Call = Callable[..., np.ndarray]


def assert_cfg_equals_the_pipelines_own(pipe: Any, call: Call, atol: float = 2e-6, **extra: Any) -> None:
    """``CFG(4)`` equals the pipeline's own at ``guidance_scale=4``; a perturbation alone keeps the pipeline's CFG
    (and equals ``CFG(4)`` with it); the pipeline is left as found. A separate unconditional call is handed the
    unconditional prediction solved from the guided one, which costs a few float32 roundings (``atol``)."""
    own = call(pipe, guidance_scale=4.0, **extra)
    assert np.abs(own - call(pipe, guidance_scale=1.0, **extra)).max() > 1e-3, "CFG must change this model's output"
    before = pipeline_snapshot(pipe)
    with guide(pipe, CFG(4.0)):
        np.testing.assert_allclose(call(pipe, guidance_scale=1.0, **extra), own, atol=atol)
    with guide(pipe, PAG(1.0)):  # perturbations alone keep the pipeline's own CFG
        composed = call(pipe, guidance_scale=4.0, **extra)
    with guide(pipe, CFG(4.0), PAG(1.0)):
        np.testing.assert_allclose(call(pipe, **extra), composed, atol=atol)
    assert np.abs(composed - own).max() > 1e-3
    assert pipeline_snapshot(pipe) == before


def assert_batched_equals_own_calls(pipe: Any, call: Call, method: Any, atol: float = 2e-6, **extra: Any) -> None:
    """With APG, ``method``'s branch batched with the others equals it run as calls of its own, and changes the
    result."""
    with guide(pipe, APG(4.0), method):
        batched = call(pipe, **extra)
    with guide(pipe, APG(4.0), method, sequential=True):
        np.testing.assert_allclose(call(pipe, **extra), batched, atol=atol)
    with guide(pipe, APG(4.0)):
        assert np.abs(batched - call(pipe, **extra)).max() > 1e-3


def scheduler_x0(pipe: Any, time_scale: float = 1.0) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """The scheduler's ``x0 = a x + b output`` (its schedule and prediction type) at the denoiser's timestep times
    ``time_scale`` (1000 where a flow pipeline passes sigma = t / 1000)."""
    schedule = schedule_of(pipe.scheduler)

    def coefficients(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        a, b = schedule.coefficients(*schedule.alpha_sigma(t.float() * time_scale))
        return broadcast(a, x), broadcast(b, x)

    return coefficients


def assert_apg_equals_the_formula(
    pipe: Any,
    call: Call,
    family: str,
    x0: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
    guided: Callable[[Tensor, Tensor, Tensor], Tensor] = lambda x, t, prediction: prediction,
    steps: int = 3,
    atol: float = 1e-5,
    sequential: bool = False,
    latents: Callable[[Tensor], Tensor] = lambda x: x,
    generated: tuple[int, slice] | None = None,
) -> None:
    """``APG(6)`` (x0 space, the auto norm threshold) with the pipeline's CFG branch: what the scheduler gets at
    each step is ``c + APG(a x + b c, a x + b u) / b`` on the recorded branches, ``x0(x, t) = (a, b)`` reading x0
    off the denoiser's output; ``guided(x, t, prediction)`` turns the scheduler's prediction back into the
    denoiser's output space (where the pipeline converts it). The branches come from one batched call, the
    unconditional half first, or (``sequential``) from a conditional call and then an unconditional one;
    ``latents(x)``: the generated latents in a denoiser input that holds condition channels beside them.
    ``generated``: ``(dim, slice)`` where the generated latents sit among condition ones (the first frame of an
    image-to-video call): the formula on them alone, which differs from the formula over everything there; a
    timestep per token is read as the step's, the generated tokens' (their maximum)."""
    method = APG(6.0)

    def run() -> None:
        with guide(pipe, method):
            call(pipe)

    calls, predictions = recorded_run(pipe, run)
    state = method.new_state(family)
    assert len(predictions) == steps and len(calls) == (2 if sequential else 1) * steps
    if sequential:
        branches = [(x, t, c, u) for (x, t, c), (_, _, u) in zip(calls[::2], calls[1::2])]
    else:
        cond_half = lambda t, n: t[n:] if t.ndim and t.numel() > 1 else t  # SD's UNet gets one 0-dim timestep
        branches = [(x[n:], cond_half(t, n), out[n:], out[:n]) for (x, t, out), n in zip(calls, map(len, predictions))]
    whole, apart = method.new_state(family), 0.0  # the formula over every token, condition ones included
    for (x, t, cond, uncond), prediction in zip(branches, predictions):
        x, cond, uncond = latents(x).float(), cond.float(), uncond.float()
        t = t.flatten(1).amax(dim=1) if t.ndim >= 2 else t  # a timestep per token (B, N) or frame (B, 1, F, 1, 1)
        expected = guided(x, t, prediction.float())
        if generated is not None:
            index = (slice(None),) * generated[0] + (generated[1],)
            a, b = x0(x, t)
            everything = cond + method.update(a * x + b * cond, a * x + b * uncond, whole) / b
            apart = max(apart, (everything[index] - expected[index]).abs().max().item())
            x, cond, uncond, expected = x[index], cond[index], uncond[index], expected[index]
        a, b = x0(x, t)
        reference = cond + method.update(a * x + b * cond, a * x + b * uncond, state) / b
        torch.testing.assert_close(expected, reference, rtol=1e-4, atol=atol)
    assert generated is None or apart > 1e-3, "the condition latents must matter to the formula over everything"


def assert_slg_leaves_the_block_out(pipe: Any, kwargs: dict[str, Any], block: str, pair: str | None) -> None:
    """SLG's weak branch (called as its own call after the conditional one, without CFG) is the denoiser with
    ``block`` left out: its outputs are its inputs. ``pair``: how a joint block returns its two streams,
    ``"image_first"`` or ``"text_first"``; None: a block returning its hidden states alone."""
    denoiser = getattr(pipe, family_of(pipe).denoiser)
    calls = []
    hook = denoiser.register_forward_hook(
        lambda module, args, kw, out: calls.append(((args, dict(kw)), out[0].clone())), with_kwargs=True
    )
    try:
        with guide(pipe, SLG(2.0, layers=(block,), start=0.0, stop=1.0), sequential=True):
            pipe(**kwargs, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert len(calls) == 2 * kwargs["num_inference_steps"]  # per step: the conditional call, then the weak one
    module = dict(denoiser.named_modules())[block]
    signature = inspect.signature(module.forward)

    def left_out(*args: Any, **kw: Any) -> Any:
        bound = signature.bind_partial(*args, **kw).arguments  # Kandinsky 5: ``visual_embed``, the first
        hidden, text = bound.get("hidden_states", next(iter(bound.values()))), bound.get("encoder_hidden_states")
        return hidden if pair is None else (hidden, text) if pair == "image_first" else (text, hidden)

    module.forward = left_out
    try:
        for (_, cond), (weak_inputs, weak) in zip(calls[::2], calls[1::2]):
            with torch.no_grad():
                without = denoiser(*weak_inputs[0], **weak_inputs[1])[0]  # DiT: the latents by position
            torch.testing.assert_close(weak, without, rtol=1e-5, atol=1e-6)
            assert (weak - cond).abs().max() > 1e-5, "leaving the block out must change the prediction"
    finally:
        del module.forward


def assert_guider_weak_model_acts(pipe: Any, run: Callable[[Any, Any], Any], method: Any) -> None:
    """On a pipeline that runs a diffusers guider (``run(pipe, guider)`` sets it and calls the pipeline): ``method``
    beside APG in :func:`guidance.modular.as_guider` changes the result and leaves the denoiser as found, with no
    call of ours left on it."""
    from guidance.hooks import ACTIVE_RUN, intercepted
    from guidance.modular import as_guider

    own, before = pipe.guider, pipeline_snapshot(pipe, "transformer")
    plain = torch.as_tensor(run(pipe, as_guider(APG(4.0, space="model"))))
    guided = torch.as_tensor(run(pipe, as_guider(APG(4.0, space="model"), method)))
    assert torch.isfinite(guided).all() and (guided - plain).abs().max() > 1e-3
    pipe.guider = own
    assert pipeline_snapshot(pipe, "transformer") == before
    assert not intercepted(pipe.transformer) and ACTIVE_RUN.get() is None


def assert_guide_points_to_the_guider(pipe: Any) -> None:
    """``guide()`` on a pipeline that runs a diffusers guider says to set ``pipe.guider = as_guider(...)``."""
    with pytest.raises(TypeError, match=r"pipe.guider = as_guider"), guide(pipe, CFG(4.0)):
        pass
