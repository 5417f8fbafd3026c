"""Skip-Layer Guidance (guidance.SLG): equal to diffusers' own SD3 skip-layer guidance, and on every block type its
weak branch is the denoiser with the chosen block left out."""

from __future__ import annotations

import numpy as np
import pytest

from guidance import APG, CFG, SLG, guide
from guidance.method import Guidance
from tests.factories import BUILDERS, default_call_kwargs
from tests.family_checks import assert_slg_leaves_the_block_out
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


@pytest.mark.parametrize(
    ("name", "block", "pair"),
    [
        ("dit", "transformer_blocks.0", None),  # BasicTransformerBlock
        ("flux", "transformer_blocks.0", "text_first"),  # joint double-stream block
        ("flux", "single_transformer_blocks.0", "text_first"),  # single-stream block, given text and image apart
        ("sd3_2layers", "transformer_blocks.0", "text_first"),  # joint block
    ],
)
def test_the_weak_branch_is_the_denoiser_without_the_block(name, block, pair):
    pipe = BUILDERS[name]()
    kwargs = default_call_kwargs(pipe)
    kwargs["guidance_scale" if name != "flux" else "true_cfg_scale"] = 1.0  # the conditional branch alone
    assert_slg_leaves_the_block_out(pipe, kwargs, block, pair)


def test_slg_options_are_checked():
    assert isinstance(SLG(), Guidance) and SLG().layers == (7, 8, 9) and (SLG().start, SLG().stop) == (0.01, 0.2)
    pipe = BUILDERS["sd3_2layers"]()
    assert list(SLG(layers="auto").edits(pipe.transformer)) == ["transformer_blocks.1"]  # the middle of two
    with pytest.raises(ValueError, match="non-empty"):
        SLG(layers=())
    with pytest.raises(ValueError, match="transformer block"), guide(pipe, SLG(layers=(7,))):
        pass
