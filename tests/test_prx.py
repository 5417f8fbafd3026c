"""guide() on PRX (Photoroom) and PRXPixel: one batched CFG call (the unconditional half first) of blocks whose one
attention runs the image queries over [text, image] keys and values; the timestep is sigma in [0, 1].

CFG equals the pipeline's own; APG equals the formula on the recorded branches; PAG's identity maps each image
token to its own value among the last keys (tested on the block's projections), ``joint="image"`` keeps the text
keys and the call's own text padding mask (tested against explicit masks); the perturbations batched equal them as
calls of their own, in latent and in pixel space; the pipeline is left as found."""

from __future__ import annotations

import pytest
import torch

from guidance import PAG, SLG, TPG, SoftPAG, guide
from guidance.prediction import broadcast
from tests.factories import prx_call_kwargs, tiny_prx
from tests.family_checks import (
    assert_apg_equals_the_formula,
    assert_batched_equals_own_calls,
    assert_cfg_equals_the_pipelines_own,
    scheduler_x0,
)


@pytest.fixture(scope="module", params=[False, True], ids=["latent", "pixel"])
def pipe(request):
    return tiny_prx(pixel=request.param)


def call(pipe, **extra):
    return pipe(**prx_call_kwargs() | extra, generator=torch.Generator().manual_seed(0)).images


def test_cfg_equals_the_pipelines_own(pipe):
    assert_cfg_equals_the_pipelines_own(pipe, call)


def test_apg_equals_the_formula_on_the_recorded_branches(pipe):
    """PRX predicts the flow velocity; PRXPixel predicts x0 itself, which its pipeline turns into the velocity
    ``(x - x0) / max(sigma, 0.05)`` after CFG: there APG acts on the outputs as they are."""
    if type(pipe).__name__ == "PRXPixelPipeline":
        x0 = lambda x, t: (torch.zeros_like(x), torch.ones_like(x))
        guided = lambda x, t, velocity: x - velocity * broadcast(t.float().clamp(min=0.05), x)
        assert_apg_equals_the_formula(pipe, call, "prx_pixel", x0, guided, atol=1e-4)
    else:
        assert_apg_equals_the_formula(pipe, call, "prx", scheduler_x0(pipe, 1000))  # the pipeline passes t / 1000


@pytest.mark.parametrize(
    "method",
    [
        PAG(1.0),
        PAG(1.0, layers=("blocks.0",), joint="image"),
        SoftPAG(1.0, heads=(("blocks.2.attention", 1),)),
        TPG(1.0),
        SLG(1.0, layers=(1,), start=0.0, stop=1.0),
    ],
    ids=["pag", "pag-image", "softpag", "tpg", "slg"],
)
def test_perturbations_batched_equal_their_own_calls(pipe, method):
    assert_batched_equals_own_calls(pipe, call, method, atol=1e-5)


def test_pag_maps_each_image_token_to_its_own_value(pipe):
    """On the perturbed row the attention's output is its output projection of the image tokens' own values."""
    attention = pipe.transformer.blocks[1].attention
    seen = []
    hook = attention.register_forward_hook(
        lambda module, args, kwargs, out: seen.append((kwargs["hidden_states"], out)), with_kwargs=True
    )
    try:
        with guide(pipe, PAG(1.0, layers=("blocks.1",))):  # batched: the conditional row, then the perturbed one
            call(pipe, guidance_scale=1.0, num_inference_steps=1)
    finally:
        hook.remove()
    ((hidden, out),) = seen
    batch, tokens, _ = hidden.shape
    values = attention.img_qkv_proj(hidden).reshape(batch, tokens, 3, -1)[:, :, 2]  # heads laid out head-major
    identity = attention.to_out[0](values)
    torch.testing.assert_close(out[1], identity[1], rtol=1e-5, atol=1e-6)
    assert (out[0] - identity[0]).abs().max() > 1e-3, "the conditional row keeps its attention"


def test_the_identity_on_image_queries_over_text_and_image_keys():
    """SDPA with 4 image queries over [2 text, 4 image] keys: "full" gives each query its own value, "image" keeps
    the text keys (and the call's own padding mask) and leaves each image query its own image key."""
    from guidance import perturbation

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 4, 8, generator=g)
    k, v = (torch.randn(2, 2, 6, 8, generator=g) for _ in range(2))
    padding = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    padding[1, ..., 1] = False  # row 1: text token 1 is padding
    with perturbation._AttentionMode([(slice(1, 2), None, 1.0, None)], 2, "attn", image_queries=True):
        full = perturbation.SDPA(q, k, v, attn_mask=padding)
    torch.testing.assert_close(full[1:], v[1:, :, 2:])
    torch.testing.assert_close(full[:1], perturbation.SDPA(q[:1], k[:1], v[:1], attn_mask=padding[:1]))

    allowed = torch.zeros(4, 6, dtype=torch.bool)
    allowed[:, :2] = True  # every text key
    allowed[:, 2:] = torch.eye(4, dtype=torch.bool)  # and its own image key
    allowed = allowed & padding[1:2]
    with perturbation._AttentionMode([(slice(1, 2), None, 1.0, (2, 4))], 2, "attn", image_queries=True):
        image = perturbation.SDPA(q, k, v, attn_mask=padding)
    torch.testing.assert_close(image[1:], perturbation.SDPA(q[1:], k[1:], v[1:], attn_mask=allowed))
    assert (image[1:] - full[1:]).abs().max() > 1e-3

    mode = perturbation._AttentionMode(
        [(slice(1, 2), None, 1.0, None)], 2, "attn"
    )  # other families: not self-attention
    with mode:
        plain = perturbation.SDPA(q, k, v)
    assert mode.calls == 0 and torch.equal(plain, perturbation.SDPA(q, k, v))


def test_the_corrector_is_refused_on_pixel_prx():
    from guidance import LangevinCorrector

    pipe = tiny_prx(pixel=True)
    with pytest.raises(ValueError, match="Langevin corrector is not supported on this pipeline"):
        with guide(pipe, PAG(1.0), LangevinCorrector()):
            call(pipe)


def test_the_default_layers_are_the_middle_block(pipe):
    assert list(PAG(2.0).edits(pipe.transformer)) == ["blocks.1.attention"]
    assert list(TPG(2.0).edits(pipe.transformer)) == ["blocks.1"]
