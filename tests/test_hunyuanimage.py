"""HunyuanImage 2.1: its pipeline takes a diffusers guider (``pipe.guider``), so the methods serve it as
:func:`guidance.modular.as_guider` guiders, one denoiser call per branch.

Our CFG guider equals diffusers' CFG guider and our PAG equals diffusers' ``PerturbedAttentionGuidance`` in the
pipeline; every weak model changes the result; the pipeline is left as found; guide() points to the guider."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidance import CFG, PAG, SLG, TPG, SoftPAG
from tests.factories import hunyuanimage_call_kwargs, tiny_hunyuanimage
from tests.family_checks import assert_guide_points_to_the_guider, assert_guider_weak_model_acts

guiders = pytest.importorskip("diffusers.guiders")
as_guider = pytest.importorskip("guidance.modular").as_guider


@pytest.fixture(scope="module")
def pipe():
    return tiny_hunyuanimage()


def run(pipe, guider):
    kwargs = hunyuanimage_call_kwargs(2, 5)  # masks keep 5 of the 7 tokens
    pipe.guider = guider
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images


def test_cfg_guider_equals_diffusers_cfg_guider(pipe):
    own = run(pipe, guiders.ClassifierFreeGuidance(guidance_scale=4.0))
    assert np.abs(own - run(pipe, guiders.ClassifierFreeGuidance(guidance_scale=1.0))).max() > 1e-3
    np.testing.assert_allclose(run(pipe, as_guider(CFG(4.0))), own, atol=2e-6, rtol=0)


def test_pag_guider_equals_diffusers_perturbed_attention_guidance(pipe):
    """diffusers' guider perturbs at steps start * n < i < stop * n (step 0 never), so ours starts at 0.3 of 3; its
    layer is the double block's joint attention (``^`` keeps the single block of the same index out)."""
    from diffusers.hooks import LayerSkipConfig

    config = LayerSkipConfig(fqn="transformer_blocks", indices=[0], skip_attention_scores=True)
    theirs = guiders.PerturbedAttentionGuidance(
        guidance_scale=4.0,
        perturbed_guidance_scale=2.0,
        perturbed_guidance_start=0.0,
        perturbed_guidance_stop=1.0,
        perturbed_guidance_config=config,
    )
    expected = run(pipe, theirs)
    ours = run(pipe, as_guider(CFG(4.0), PAG(2.0, layers="^transformer_blocks.0", start=0.3)))
    np.testing.assert_allclose(ours, expected, atol=2e-6, rtol=0)
    assert np.abs(ours - run(pipe, as_guider(CFG(4.0)))).max() > 1e-3


@pytest.mark.parametrize(
    "method",
    [
        PAG(2.0),
        SoftPAG(2.0, heads=(("single_transformer_blocks.0.attn", 1),)),
        TPG(1.0),
        SLG(1.0, layers=(1,), start=0.0, stop=1.0),
    ],
    ids=["pag_auto", "softpag", "tpg", "slg"],
)
def test_weak_models_act_and_leave_the_pipeline_as_found(pipe, method):
    assert_guider_weak_model_acts(pipe, run, method)


def test_guide_points_to_the_guider(pipe):
    assert_guide_points_to_the_guider(pipe)
