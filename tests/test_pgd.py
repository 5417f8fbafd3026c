"""protect.pgd: the PGD result is cast into the budget and [0, 1] in every dtype (the attacks themselves are tested
through protect() in test_protect.py)."""

import pytest
import torch

from protect.pgd import fit_to_ball

EPS = 8 / 255


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fit_to_ball_rounds_inside(dtype):
    center = torch.rand(4096, generator=_gen()).to(dtype)
    raw = (center.float() + EPS * torch.randn(4096, generator=_gen(1)).sign()).clamp(0, 1)
    out = fit_to_ball(raw, center, EPS, dtype)
    assert out.dtype == dtype and (out.double() - center.double()).abs().max() <= EPS
    assert out.min() >= 0 and out.max() <= 1
