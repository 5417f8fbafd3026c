"""guide() on SANA-Sprint (text- and image-to-image): a guidance-distilled model (its ``guidance_scale`` feeds a
guidance embedding), so perturbation guidance only; its TrigFlow scheduler's pipeline hands the flow transformer the
flow-path sample at ``s = sin t / (sin t + cos t)`` and turns the transformer's velocity into a TrigFlow one: the
methods act on the transformer's velocity, before that."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from guidance import APG, CFG, PAG, SLG, TPG, guide
from tests.factories import recorded_run, sana_call_kwargs, tiny_sana_sprint


def call(pipe, prompts=1, **extra):
    kwargs = {k: v for k, v in sana_call_kwargs().items() if not k.startswith("negative")}
    kwargs = {k: v for k, v in kwargs.items() if k != "complex_human_instruction"} | {"num_inference_steps": 2}
    for name in ("prompt_embeds", "prompt_attention_mask"):
        kwargs[name] = kwargs[name].repeat(prompts, *[1] * (kwargs[name].ndim - 1))
    if prompts > 1:  # another prompt
        kwargs["prompt_embeds"][1:] = torch.randn(
            kwargs["prompt_embeds"][1:].shape, generator=torch.Generator().manual_seed(4)
        )
    if "strength" in inspect.signature(pipe.__call__).parameters:  # image-to-image
        image = torch.rand(prompts, 3, 32, 32, generator=torch.Generator().manual_seed(5))
        kwargs |= {"image": image, "strength": 0.8}
    return pipe(**(kwargs | extra), generator=torch.Generator().manual_seed(0)).images


@pytest.fixture(scope="module", params=[False, True], ids=["text", "image"])
def pipe(request):
    return tiny_sana_sprint(img2img=request.param)


def test_pag_adds_its_update_to_the_transformers_velocity(pipe):
    """What the scheduler gets is the pipeline's TrigFlow conversion of ``c + s (c - p)`` on the transformer's
    outputs, the perturbed branch run as its own call here."""
    scale, sigma_data = 2.0, pipe.scheduler.config.sigma_data

    def run():
        with guide(pipe, PAG(scale), sequential=True):
            call(pipe)

    calls, steps = recorded_run(pipe, run)
    assert len(calls) == 2 * len(steps)
    for (x, t, cond), (_, _, perturbed), step in zip(calls[::2], calls[1::2], steps):
        s = t.reshape(-1, 1, 1, 1)
        v = cond + scale * (cond - perturbed)
        trig = ((1 - 2 * s) * x + (1 - 2 * s + 2 * s**2) * v) / torch.sqrt(s**2 + (1 - s) ** 2) * sigma_data
        torch.testing.assert_close(step, trig, rtol=1e-5, atol=1e-5)
        assert (cond - perturbed).abs().max() > 1e-3


@pytest.mark.parametrize(
    "method", [PAG(3.0), TPG(2.0), SLG(2.0, layers=(1,), start=0.0, stop=1.0)], ids=["pag", "tpg", "slg"]
)
def test_each_perturbation_batched_equals_its_own_calls(pipe, method):
    with guide(pipe, method):
        batched = call(pipe, prompts=2)
    with guide(pipe, method, sequential=True):
        np.testing.assert_allclose(call(pipe, prompts=2), batched, atol=2e-5)
    assert np.abs(batched - call(pipe, prompts=2)).max() > 1e-3


@pytest.mark.parametrize("method", [CFG(3.0), APG(3.0)], ids=["cfg", "apg"])
def test_cfg_type_methods_are_refused_with_the_reason(pipe, method):
    with pytest.raises(ValueError, match="runs no unconditional branch"), guide(pipe, method):
        call(pipe)
