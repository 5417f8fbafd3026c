"""guidance.apg: APG (Sadat et al. 2024) as pure tensor math (projection, norm threshold, momentum) and its
method object."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from guidance import APG, CFG
from guidance.apg import Momentum, apg_update, clip_norm, project
from tests.factories import guidance_pair as _pair


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
