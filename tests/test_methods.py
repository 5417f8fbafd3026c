"""CFG and APG as pure tensor math, and their method objects."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from guidance import APG, CFG, Guidance
from guidance.apg import Momentum, apg_update, clip_norm, project
from guidance.cfg import cfg_update


def _pair(seed, shape=(3, 4, 6, 6), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)


def _dot(a, b):
    return (a * b).flatten(1).sum(1)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_projection_is_orthogonal_and_complete(seed):
    v, u = _pair(seed, dtype=torch.float64)
    par, orth = project(v, u)
    torch.testing.assert_close(par + orth, v)
    assert _dot(orth, u).abs().max() < 1e-9 * _dot(u, u).max()
    # the parallel part is a per-sample multiple of u
    ratio = par / u
    torch.testing.assert_close(ratio, ratio.flatten(1)[:, :1, None, None].expand_as(ratio))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), r=st.floats(0.01, 100))
def test_norm_threshold_caps_each_sample(seed, r):
    v, _ = _pair(seed)
    v = v * torch.tensor([0.001, 1.0, 100.0])[:, None, None, None]
    out = clip_norm(v, r)
    norms, before = out.flatten(1).norm(dim=1), v.flatten(1).norm(dim=1)
    assert torch.all(norms <= r * (1 + 1e-5))
    small = before <= r
    torch.testing.assert_close(out[small], v[small])  # untouched below the threshold
    torch.testing.assert_close(norms[~small], torch.full_like(norms[~small], r))


def test_momentum_is_a_running_average():
    m = Momentum(-0.5)
    d1, d2, d3 = torch.ones(1), 2 * torch.ones(1), 4 * torch.ones(1)
    assert m.update(d1).item() == 1.0
    assert m.update(d2).item() == 2 - 0.5
    assert m.update(d3).item() == 4 - 0.5 * 1.5


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), w=st.floats(0, 30))
def test_apg_with_eta_one_and_no_extras_is_cfg(seed, w):
    c, u = _pair(seed)
    apg = APG(w, eta=1.0, norm_threshold=None, momentum=0.0)
    torch.testing.assert_close(apg.update(c, u, apg.new_state()), CFG(w).update(c, u), rtol=1e-4, atol=1e-4)


def test_apg_with_eta_zero_drops_the_parallel_component():
    c, u = _pair(1)
    update = apg_update(c, u, 5.0, eta=0.0)
    assert _dot(update, c).abs().max() < 1e-3 * _dot(c, c).max() ** 0.5


@pytest.mark.parametrize("threshold", [None, 3.0])
@pytest.mark.parametrize("beta", [None, -0.5, 0.3])
@pytest.mark.parametrize("eta", [0.0, 0.4, 1.0])
def test_model_space_apg_matches_diffusers_normalized_guidance(threshold, beta, eta):
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

    w = 6.0
    ours = APG(w, eta=eta, norm_threshold=threshold, momentum=beta or 0.0, space="model")
    state = ours.new_state()
    buffer = MomentumBuffer(beta) if beta is not None else None
    for step in range(4):  # momentum carries over steps
        c, u = _pair(step)
        expected = normalized_guidance(c, u, w - 1, buffer, eta, threshold or 0.0, use_original_formulation=True)
        torch.testing.assert_close(c + ours.update(c, u, state), expected, rtol=1e-5, atol=1e-5)


def test_apg_auto_threshold_scales_with_sample_size():
    apg = APG(7.0)
    assert apg.new_state("sdxl").momentum.beta == -0.5
    checkerboard = (torch.arange(128)[:, None] + torch.arange(128)) % 2 * 2.0 - 1
    c = 1e-3 * checkerboard.expand(1, 4, 128, 128)
    u = c - 1.0  # delta = 1 everywhere: orthogonal to D_c, ||delta|| = 256 >> r = 15 at SDXL size
    update = apg.update(c, u, apg.new_state("sdxl"))
    assert abs(update.norm().item() - 6 * 15) < 1e-3


def test_apg_update_keeps_input_dtype():
    c, u = _pair(0, dtype=torch.bfloat16)
    assert APG(5.0).update(c, u, APG(5.0).new_state()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scale": float("nan")}, "scale"),
        ({"scale": True}, "scale"),
        ({"scale": "7"}, "scale"),
        ({"scale": 5, "eta": 1.5}, "eta"),
        ({"scale": 5, "norm_threshold": 0}, "norm_threshold"),
        ({"scale": 5, "norm_threshold": -1.0}, "norm_threshold"),
        ({"scale": 5, "momentum": 1.0}, "momentum"),
        ({"scale": 5, "space": "eps"}, "space"),
    ],
)
def test_apg_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        APG(**kwargs)


def test_methods_are_frozen_keyword_validated_and_serialisable():
    apg = APG(7.5, eta=0.2, norm_threshold=10.0, momentum=-0.3, space="model")
    with pytest.raises(dataclasses.FrozenInstanceError):
        apg.scale = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        APG(7.5, 0.2)  # type: ignore[misc]  (options are keyword-only)
    assert Guidance.from_dict(apg.to_dict()) == apg
    assert Guidance.from_dict(CFG(3.0).to_dict()) == CFG(3.0)
    with pytest.raises(ValueError, match="unknown guidance method"):
        Guidance.from_dict({"method": "nope", "scale": 1.0})
    with pytest.raises(ValueError, match="scale"):
        CFG(float("inf"))


@pytest.mark.parametrize("cls", ["cfg", "apg", "pag", "softpag", "tpg"])
def test_negative_scales_are_refused_and_zero_is_allowed(cls):
    from guidance.method import REGISTRY

    extra = {"heads": ((0, 0),)} if cls == "softpag" else {}
    method = REGISTRY[cls]
    assert method(0.0, **extra).scale == 0.0  # 0: no update (CFG: the unconditional prediction)
    assert method(0.5, **extra).scale == 0.5
    with pytest.raises(ValueError, match=r"scale must be >= 0 .*got -3"):
        method(-3, **extra)


def test_cfg_update_is_the_pipeline_formula():
    c, u = _pair(3)
    torch.testing.assert_close(c + cfg_update(c, u, 7.5), u + 7.5 * (c - u), rtol=1e-5, atol=1e-5)


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
