"""HunyuanVideo 1.5: its pipeline takes a diffusers guider (``pipe.guider``), as HunyuanImage 2.1's, so the methods
serve it as :func:`guidance.modular.as_guider` guiders, one denoiser call per branch.

Our CFG guider equals diffusers' CFG guider; our PAG perturbs the double blocks' joint attention, where diffusers'
``PerturbedAttentionGuidance`` cannot run (0.42 does not know the attention processor); every weak model changes the
result and leaves the pipeline as found; guide() points to the guider."""

from __future__ import annotations

import pytest
import torch

from guidance import CFG, PAG, SLG, TPG, SoftPAG
from tests.factories import hunyuanvideo15_call_kwargs, tiny_hunyuanvideo15
from tests.family_checks import assert_guide_points_to_the_guider, assert_guider_weak_model_acts

guiders = pytest.importorskip("diffusers.guiders")
as_guider = pytest.importorskip("guidance.modular").as_guider


@pytest.fixture(scope="module")
def pipe():
    return tiny_hunyuanvideo15()


def run(pipe, guider):
    pipe.guider = guider
    return pipe(**hunyuanvideo15_call_kwargs(), generator=torch.Generator().manual_seed(0)).frames


def test_cfg_guider_equals_diffusers_cfg_guider(pipe):
    own = run(pipe, guiders.ClassifierFreeGuidance(guidance_scale=4.0))
    assert (own - run(pipe, guiders.ClassifierFreeGuidance(guidance_scale=1.0))).abs().max() > 1e-3
    torch.testing.assert_close(run(pipe, as_guider(CFG(4.0))), own, atol=2e-6, rtol=0)


def test_pag_guider_runs_where_diffusers_perturbed_attention_guidance_cannot(pipe):
    """diffusers 0.42's PAG guider does not know this model's attention processor; ours perturbs it: in the
    perturbed call (one of the three of a step) the double block's attention output is its value on every image
    token, in the others it is not."""
    from diffusers.hooks import LayerSkipConfig

    config = LayerSkipConfig(fqn="transformer_blocks", indices=[0], skip_attention_scores=True)
    theirs = guiders.PerturbedAttentionGuidance(
        guidance_scale=4.0,
        perturbed_guidance_start=0.0,
        perturbed_guidance_stop=1.0,
        perturbed_guidance_config=config,
    )
    with pytest.raises(ValueError, match="not registered"):
        run(pipe, theirs)
    attention = pipe.transformer.transformer_blocks[0].attn
    values, outputs = [], []
    handles = [
        attention.to_v.register_forward_hook(lambda m, a, out: values.append(out.clone())),
        attention.to_out[0].register_forward_pre_hook(lambda m, a: outputs.append(a[0].clone())),
    ]
    try:
        run(pipe, as_guider(CFG(4.0), PAG(2.0, layers=("transformer_blocks.0",))))
    finally:
        for handle in handles:
            handle.remove()
    assert len(values) == len(outputs) == 9  # 3 steps of 3 calls
    identity = [torch.allclose(o, v, atol=1e-6) for o, v in zip(outputs, values)]
    assert identity == [False, False, True] * 3


@pytest.mark.parametrize(
    "method",
    [
        PAG(2.0),
        SoftPAG(2.0, heads=(("transformer_blocks.0.attn", 1),)),
        TPG(1.0),
        SLG(1.0, layers=(1,), start=0.0, stop=1.0),
    ],
    ids=["pag_auto", "softpag", "tpg", "slg"],
)
def test_weak_models_act_and_leave_the_pipeline_as_found(pipe, method):
    assert_guider_weak_model_acts(pipe, run, method)


def test_guide_points_to_the_guider(pipe):
    assert_guide_points_to_the_guider(pipe)
