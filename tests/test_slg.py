"""Skip-Layer Guidance (guidance.SLG): equal to diffusers' own SD3 skip-layer guidance, and on every block type its
weak branch is the denoiser with the chosen block left out."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from guidance import APG, CFG, SLG, guide
from guidance.method import Guidance
from tests.factories import BUILDERS, default_call_kwargs
from tests.test_pipeline import assert_images_close, gen


@pytest.fixture(scope="module")
def sd3():
    return BUILDERS["sd3_2layers"]()


@pytest.mark.parametrize("layer", [0, 1])
def test_cfg_plus_slg_equals_the_sd3_pipelines_skip_layer_guidance(sd3, layer):
    kwargs = default_call_kwargs(sd3) | {"guidance_scale": 4.0}
    window = {"skip_layer_guidance_start": 0.01, "skip_layer_guidance_stop": 0.8}  # steps 1 and 2 of 3
    expected = sd3(
        **kwargs, skip_guidance_layers=[layer], skip_layer_guidance_scale=2.8, **window, generator=gen()
    ).images
    assert np.abs(expected - sd3(**kwargs, generator=gen()).images).max() > 1e-4, "SLG must change the output"
    with guide(sd3, CFG(4.0), SLG(2.8, layers=(layer,), start=0.01, stop=0.8)):
        assert_images_close(sd3(**kwargs, generator=gen()).images, expected, atol=1e-4)
    with guide(sd3, APG(4.0), SLG(2.8, layers=(layer,), start=0.01, stop=0.8)):
        assert np.isfinite(sd3(**kwargs, generator=gen()).images).all()
    with guide(sd3, CFG(4.0)), pytest.raises(ValueError, match=r"guidance\.SLG"):
        sd3(**kwargs, skip_guidance_layers=[layer], generator=gen())


def _identity(block):
    """A stand-in for ``block.forward`` that leaves the block out: its outputs are its inputs."""
    signature = inspect.signature(block.forward)

    def forward(*args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments
        output = type(block).forward(block, *args, **kwargs)
        if isinstance(output, torch.Tensor):
            return bound["hidden_states"]
        encoder = None if output[0] is None else bound["encoder_hidden_states"]
        return encoder, bound["hidden_states"]

    return forward


@pytest.mark.parametrize(
    ("name", "block"),
    [
        ("dit", "transformer_blocks.0"),  # BasicTransformerBlock
        ("flux", "transformer_blocks.0"),  # joint double-stream block
        ("flux", "single_transformer_blocks.0"),  # single-stream block
        ("sd3_2layers", "transformer_blocks.0"),  # joint block
    ],
)
def test_the_weak_branch_is_the_denoiser_without_the_block(name, block):
    pipe = BUILDERS[name]()
    denoiser = pipe.transformer
    calls = []
    hook = denoiser.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(((args, dict(kwargs)), out[0].clone())), with_kwargs=True
    )
    kwargs = default_call_kwargs(pipe)
    kwargs["guidance_scale" if name != "flux" else "true_cfg_scale"] = 1.0  # the conditional branch alone
    method = SLG(2.0, layers=(block,), start=0.0, stop=1.0)
    try:
        with guide(pipe, method, sequential=True):  # per step: the conditional call, then the weak one
            pipe(**kwargs, generator=gen())
    finally:
        hook.remove()
    assert len(calls) % 2 == 0 and len(calls) >= 4
    module = dict(denoiser.named_modules())[block]
    module.forward = _identity(module)
    try:
        for (_, cond), (weak_inputs, weak) in zip(calls[::2], calls[1::2]):
            with torch.no_grad():
                left_out = denoiser(*weak_inputs[0], **weak_inputs[1])[0]
            torch.testing.assert_close(weak, left_out, rtol=1e-5, atol=1e-6)
            assert (weak - cond).abs().max() > 1e-5, "leaving the block out must change the prediction"
    finally:
        del module.forward


def test_slg_options_are_checked():
    assert isinstance(SLG(), Guidance) and SLG().layers == (7, 8, 9) and (SLG().start, SLG().stop) == (0.01, 0.2)
    pipe = BUILDERS["sd3_2layers"]()
    assert list(SLG(layers="auto").edits(pipe.transformer)) == ["transformer_blocks.1"]  # the middle of two
    with pytest.raises(ValueError, match="non-empty"):
        SLG(layers=())
    with pytest.raises(ValueError, match="transformer block"), guide(pipe, SLG(layers=(7,))):
        pass
