"""guide() on Qwen-Image 2.1: one single-stream sequence of [text, generated image] under a block-causal mask, whose
attention runs in segments (each segment's queries over the keys up to its end); a separate unconditional call with
a negative prompt; the denoiser's output covers the whole sequence, the generated image's tokens last, and from the
second step on its prefix cache (``use_kv_cache``, on by default) serves the text, so the output is the image alone.

CFG equals the pipeline's own; APG acts on the generated tokens alone, tested against the formula on the recorded
calls, and equals itself with the cache off; every perturbation batched equals its own calls; with perturbation
guidance the cache is off (refused where the call switches it on); PAG's identity in the segmented attention gives
each token its own value; SLG's weak branch is the denoiser without the block."""

from __future__ import annotations

import pytest
import torch

from guidance import APG, PAG, SLG, TPG, LangevinCorrector, SoftPAG, guide
from tests.factories import qwen21_call_kwargs, recorded_run, tiny_qwen21
from tests.family_checks import (
    assert_batched_equals_own_calls,
    assert_cfg_equals_the_pipelines_own,
    assert_slg_leaves_the_block_out,
    scheduler_x0,
)


@pytest.fixture(scope="module")
def pipe():
    return tiny_qwen21()


def call(pipe, guidance_scale=None, **extra):
    kwargs = qwen21_call_kwargs() | extra
    if guidance_scale is not None:
        kwargs["true_cfg_scale"] = guidance_scale
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images.numpy()


def test_cfg_equals_the_pipelines_own(pipe):
    assert_cfg_equals_the_pipelines_own(pipe, call, atol=1e-5)


def test_apg_acts_on_the_generated_tokens_only(pipe):
    method = APG(6.0)

    def run() -> None:
        with guide(pipe, method):
            call(pipe)

    calls, steps = recorded_run(pipe, run)
    assert len(calls) == 2 * len(steps) == 6
    assert calls[0][2].shape[1] > calls[2][2].shape[1] == steps[0].shape[1] == 16  # then the cache serves the text
    state, x0 = method.new_state("qwenimage21"), scheduler_x0(pipe, 1000.0)  # the denoiser sees sigma = t / 1000
    for (x, t, cond), (_, _, uncond), step in zip(calls[::2], calls[1::2], steps):
        tokens = step.shape[1]
        x, cond, uncond = x.float(), cond[:, -tokens:].float(), uncond[:, -tokens:].float()
        a, b = x0(x, t)
        reference = cond + method.update(a * x + b * cond, a * x + b * uncond, state) / b
        torch.testing.assert_close(step.float(), reference, rtol=1e-4, atol=1e-5)
    with guide(pipe, method):
        torch.testing.assert_close(
            torch.as_tensor(call(pipe, use_kv_cache=False)), torch.as_tensor(call(pipe)), rtol=0, atol=1e-5
        )


@pytest.mark.parametrize(
    "method",
    [
        PAG(1.0),
        SoftPAG(1.0, heads=(("transformer_blocks.0.attn", 1),)),
        TPG(1.0),
        SLG(1.0, layers=(1,), start=0.0, stop=1.0),
    ],
    ids=["pag", "softpag", "tpg", "slg"],
)
def test_perturbations_batched_equal_their_own_calls(pipe, method):
    assert_batched_equals_own_calls(pipe, call, method, atol=1e-5)


def test_perturbations_switch_the_prefix_cache_off(pipe):
    with guide(pipe, APG(4.0), PAG(1.0)):
        default = call(pipe)
        torch.testing.assert_close(torch.as_tensor(call(pipe, use_kv_cache=False)), torch.as_tensor(default))
        with pytest.raises(ValueError, match="use_kv_cache=False"):
            call(pipe, use_kv_cache=True)


def test_pag_gives_each_token_its_own_value_in_the_segmented_attention(pipe):
    """The text segments' queries see the keys up to their end, the image's every key: with PAG on block 0's
    attention, the perturbed rows' attention output is their value on every token, text and image."""
    attention = pipe.transformer.transformer_blocks[0].attn
    seen: dict[str, torch.Tensor] = {}
    handles = [
        attention.to_v.register_forward_hook(lambda m, a, out: seen.setdefault("v", out.clone())),
        attention.to_out[0].register_forward_pre_hook(lambda m, a: seen.setdefault("out", a[0].clone())),
    ]
    try:
        with guide(pipe, PAG(1.0, layers=("transformer_blocks.0",))):
            call(pipe, num_inference_steps=1)  # no CFG: the conditional rows, then the perturbed ones
    finally:
        for handle in handles:
            handle.remove()
    rows = len(seen["v"]) // 2
    torch.testing.assert_close(seen["out"][rows:], seen["v"][rows:])
    assert (seen["out"][:rows] - seen["v"][:rows]).abs().max() > 1e-3


def test_the_slg_weak_branch_is_the_denoiser_without_the_block(pipe):
    kwargs = qwen21_call_kwargs() | {"true_cfg_scale": 1.0, "use_kv_cache": False}
    assert_slg_leaves_the_block_out(pipe, kwargs, "transformer_blocks.0", None)


def test_the_corrector_is_refused(pipe):
    with guide(pipe, PAG(1.0), LangevinCorrector()), pytest.raises(ValueError, match="corrector"):
        call(pipe, use_kv_cache=False)
