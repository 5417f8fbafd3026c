"""guidance.modular: the methods as diffusers modular-pipeline guiders, against diffusers' own guiders."""

import pytest
import torch

from guidance import APG, CFG
from tests.factories import guidance_pair as _pair


def test_modular_guiders_match_diffusers_guiders():
    guiders = pytest.importorskip("diffusers.guiders")
    from guidance.modular import as_guider

    pairs = [
        (as_guider(CFG(5.0)), guiders.ClassifierFreeGuidance(guidance_scale=5.0)),
        (
            as_guider(APG(6.0, eta=0.3, norm_threshold=4.0, momentum=-0.5, space="model")),
            guiders.AdaptiveProjectedGuidance(
                guidance_scale=5.0,
                eta=0.3,
                adaptive_projected_guidance_rescale=4.0,
                adaptive_projected_guidance_momentum=-0.5,
                use_original_formulation=True,
            ),
        ),
    ]
    for run in range(2):  # state resets at step 0 of every run
        for step in range(3):
            c, u = _pair(10 * run + step)
            for ours, theirs in pairs:
                outputs = []
                for guider in (ours, theirs):  # the protocol a modular denoise loop follows
                    guider.set_state(step, 3, torch.tensor(999 - step))
                    batches = guider.prepare_inputs({"prompt_embeds": (torch.ones(1), torch.zeros(1))})
                    for batch in batches:
                        batch.noise_pred = {"pred_cond": c, "pred_uncond": u}[getattr(batch, guider._identifier_key)]
                    outputs.append(guider(batches).pred)
                torch.testing.assert_close(*outputs, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="space='model'"):
        as_guider(APG(5.0))


@pytest.mark.parametrize(
    ("method", "options", "active"),
    [
        (CFG(5.0, start=0.5), {}, [False, False, True, True]),
        (CFG(5.0, stop=0.5), {}, [True, True, False, False]),
        (CFG(5.0, start=0.3, stop=0.8), {}, [False, False, True, True]),  # as guide(): 0.3 <= i / 4 < 0.8
        (CFG(5.0), {"start": 0.25}, [False, True, True, True]),
        (CFG(5.0, start=0.5), {"start": 0.0, "stop": 0.25}, [True, False, False, False]),
    ],
)
def test_modular_guider_follows_the_methods_interval(method, options, active):
    pytest.importorskip("diffusers.guiders")
    from guidance.modular import as_guider

    guider = as_guider(method, **options)
    c, u = _pair(0)
    got = []
    for step in range(4):
        guider.set_state(step, 4, torch.tensor(999 - step))
        batches = guider.prepare_inputs({"prompt_embeds": (torch.ones(1), torch.zeros(1))})
        for batch in batches:
            batch.noise_pred = {"pred_cond": c, "pred_uncond": u}[getattr(batch, guider._identifier_key)]
        pred = guider(batches).pred
        guided = not torch.equal(pred, c)
        assert len(batches) == (2 if guided else 1)
        if guided:
            torch.testing.assert_close(pred, u + 5.0 * (c - u))
        got.append(guided)
    assert got == active
    assert got == [method.active(i / 4) for i in range(4)] or options
