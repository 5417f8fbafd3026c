"""guide() on Kandinsky 3: its CFG is ``(s + 1) c - s u``, run only for ``s > 1`` (a weight above 2), so CFG-type
methods below that switch its branch on at a scale of their own; its attention modules all call themselves
cross-attention, and PAG finds the self-attention blocks by name; a UNet without a middle block, whose default
layers are its bottleneck."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from guidance import APG, CFG, PAG, SLG, TPG, SoftPAG, guide
from guidance.layers import default_layers, self_attention_layers
from tests.factories import kandinsky3_call_kwargs, pipeline_snapshot, recorded_run, tiny_kandinsky3
from tests.family_checks import assert_apg_equals_the_formula, scheduler_x0


def call(pipe, prompts=1, **extra):
    kwargs = kandinsky3_call_kwargs(prompts)
    if "image" in inspect.signature(pipe.__call__).parameters:  # image-to-image
        kwargs = {k: v for k, v in kwargs.items() if k not in ("height", "width")}
        image = torch.rand(prompts, 3, 32, 32, generator=torch.Generator().manual_seed(5))
        kwargs |= {"image": image, "strength": 0.75, "num_inference_steps": 3}
    return pipe(**(kwargs | extra), generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("img2img", [False, True], ids=["text", "image"])
def test_cfg_at_weight_w_equals_the_pipelines_own_at_scale_w_minus_1(img2img):
    pipe = tiny_kandinsky3(img2img)
    before = pipeline_snapshot(pipe)
    own = call(pipe, guidance_scale=3.0)  # (3 + 1) c - 3 u: the weight 4
    assert np.abs(own - call(pipe, guidance_scale=1.0)).max() > 1e-3, "CFG must change this model's output"
    with guide(pipe, CFG(4.0)):
        np.testing.assert_allclose(call(pipe, guidance_scale=1.0), own, atol=2e-5)
    with guide(pipe, CFG(4.0)):
        np.testing.assert_allclose(call(pipe, guidance_scale=0.5), own, atol=2e-5)
    with guide(pipe, PAG(2.0)):  # a perturbation alone keeps the pipeline's own CFG ...
        composed = call(pipe, guidance_scale=3.0)
    with guide(pipe, CFG(4.0), PAG(2.0)):  # ... which is CFG at its weight
        np.testing.assert_allclose(call(pipe, guidance_scale=0.0), composed, atol=2e-5)
    assert np.abs(composed - own).max() > 1e-3
    assert pipeline_snapshot(pipe) == before


@pytest.mark.parametrize("weight", [1.5, 2.0])
def test_cfg_at_a_weight_the_pipeline_does_not_run_switches_its_branch_on(weight):
    """Weights up to 2 are scales up to 1, where the pipeline runs no unconditional branch: the guided step is
    still ``u + w (c - u)`` on the branches (the pipeline is run at a scale of its own and handed the result)."""
    pipe = tiny_kandinsky3()

    def run():
        with guide(pipe, CFG(weight)):
            call(pipe, guidance_scale=1.0)

    calls, predictions = recorded_run(pipe, run)
    assert len(calls) == len(predictions) == 2
    for (_, _, out), prediction in zip(calls, predictions):
        assert out.shape[0] == 2 * prediction.shape[0], "the unconditional branch must run"
        uncond, cond = out.chunk(2)
        torch.testing.assert_close(prediction, uncond + weight * (cond - uncond), rtol=1e-4, atol=1e-5)


def test_apg_equals_the_formula_on_the_pipelines_branches():
    pipe = tiny_kandinsky3()
    assert_apg_equals_the_formula(pipe, call, "kandinsky3", scheduler_x0(pipe), steps=2)


def test_pag_perturbs_the_self_attention_blocks_of_the_bottleneck():
    pipe = tiny_kandinsky3()
    found = self_attention_layers(pipe.unet)
    assert sorted(found) == [
        f"{block}.attentions.0.attention" for block in ("down_blocks.1", "up_blocks.0", "up_blocks.1")
    ]
    assert all(module.is_cross_attention for module in found.values())  # as every attention module here says
    assert default_layers(found) == [r"^down_blocks\.1\.", r"^up_blocks\.0\."]
    with guide(pipe, CFG(4.0)):
        cfg = call(pipe)
    with guide(pipe, CFG(4.0), PAG(3.0)):
        pag = call(pipe)
    assert np.abs(pag - cfg).max() > 1e-3


@pytest.mark.parametrize("method", [TPG(2.0), SLG(2.0)], ids=["tpg", "slg"])
def test_token_methods_say_the_unet_has_no_transformer_blocks(method):
    """TPG and SLG act on transformer blocks' token sequences; this UNet's attention blocks take feature maps."""
    pipe = tiny_kandinsky3()
    with pytest.raises(ValueError, match="the model has 0 transformer blocks"), guide(pipe, method):
        call(pipe)


@pytest.mark.parametrize(
    "method", [PAG(3.0), SoftPAG(3.0, heads=(("up_blocks.0.attentions.0.attention", 1),))], ids=["pag", "softpag"]
)
def test_batched_equals_sequential_on_two_prompts(method):
    pipe = tiny_kandinsky3()
    with guide(pipe, APG(4.0), method):
        batched = call(pipe, prompts=2)
    with guide(pipe, APG(4.0), method, sequential=True):
        np.testing.assert_allclose(call(pipe, prompts=2), batched, atol=2e-5)
    with guide(pipe, APG(4.0)):
        assert np.abs(batched - call(pipe, prompts=2)).max() > 1e-3
