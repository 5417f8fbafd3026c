"""guide() on SkyReels V2 text- and image-to-video (a Wan-style transformer on latents ``(B, C, F, H, W)``, a
separate unconditional call; image-to-video: the condition's mask and latents after the latents' channels, a CLIP
image embedding beside the text): CFG equals the pipeline's own, APG equals the formula on the recorded calls (on
the generated channels), the perturbations batched equal their own calls. The diffusion-forcing pipelines (a
timestep per frame, frames at different noise levels) are not served."""

from __future__ import annotations

import pytest
import torch

from guidance import CFG, PAG, SLG, TPG, guide
from tests.factories import tiny_skyreels_v2, wan_call_kwargs
from tests.family_checks import (
    assert_apg_equals_the_formula,
    assert_batched_equals_own_calls,
    assert_cfg_equals_the_pipelines_own,
    scheduler_x0,
)


@pytest.fixture(scope="module", params=[False, True], ids=["t2v", "i2v"])
def pipe(request):
    return tiny_skyreels_v2(image=request.param)


def call(pipe, **extra):
    kwargs = wan_call_kwargs(pipe) | {"output_type": "latent"} | extra
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames.numpy()


def test_cfg_equals_the_pipelines_own(pipe):
    assert_cfg_equals_the_pipelines_own(pipe, call, atol=1e-5)


def test_apg_equals_the_formula_on_the_recorded_calls(pipe):
    x0 = scheduler_x0(pipe)
    assert_apg_equals_the_formula(pipe, call, "skyreels-v2", x0, steps=4, sequential=True, latents=lambda x: x[:, :16])


@pytest.mark.parametrize(
    "method", [PAG(1.0), TPG(1.0), SLG(1.0, layers=(1,), start=0.0, stop=1.0)], ids=["pag", "tpg", "slg"]
)
def test_perturbations_batched_equal_their_own_calls(pipe, method):
    assert_batched_equals_own_calls(pipe, call, method, atol=1e-5)


def test_the_diffusion_forcing_pipelines_are_not_served():
    import diffusers

    pipe = tiny_skyreels_v2()
    forcing = diffusers.SkyReelsV2DiffusionForcingPipeline(**pipe.components)
    with pytest.raises(TypeError, match="cannot serve SkyReelsV2DiffusionForcingPipeline"):
        with guide(forcing, CFG(4.0)):
            pass
