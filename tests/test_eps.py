"""protect.eps: the Expected Perturbation Score of EPS-AD on a tiny random UNet."""

import pytest
import torch

from guidance.denoisers import DiffusersDenoiser
from protect.eps import expected_perturbation_score, perturbation_timesteps
from tests.factories import random_pixel_unet
from tests.factories import smooth_images as _images

T = 4  # perturbation levels: enough to exercise the batching, cheap on shared cores


@pytest.fixture(scope="module")
def unet():
    return random_pixel_unet()


@pytest.fixture(scope="module")
def denoiser(unet):
    return DiffusersDenoiser(*unet)


def test_eps_is_seeded_and_batch_size_independent(denoiser):
    x = _images(5)
    eps = expected_perturbation_score(denoiser, x, timesteps=T, generator=3, batch_size=64)
    assert eps.shape == x.shape
    torch.testing.assert_close(expected_perturbation_score(denoiser, x, timesteps=T, generator=3, batch_size=64), eps)
    for batch_size in (1, 3, 7):
        small = expected_perturbation_score(denoiser, x, timesteps=T, generator=3, batch_size=batch_size)
        torch.testing.assert_close(small, eps, rtol=1e-4, atol=1e-3)  # |eps| ~ 10: float32 summation order
    # every image draws the same noise: an image alone gets the EPS it gets anywhere in a batch
    prefix = expected_perturbation_score(denoiser, x[:2], timesteps=T, generator=3)
    torch.testing.assert_close(prefix, eps[:2], rtol=1e-4, atol=1e-3)
    for i in range(len(x)):
        alone = expected_perturbation_score(denoiser, x[i : i + 1], timesteps=T, generator=3)
        torch.testing.assert_close(alone, eps[i : i + 1], rtol=1e-4, atol=1e-3)
    shuffled = expected_perturbation_score(denoiser, x.flip(0), timesteps=T, generator=3)
    torch.testing.assert_close(shuffled.flip(0), eps, rtol=1e-4, atol=1e-3)
    assert not torch.allclose(expected_perturbation_score(denoiser, x, timesteps=T, generator=4), eps)


def test_one_level_is_minus_eps_over_sqrt_one_minus_abar(unet, denoiser):
    model, scheduler = unet
    x, k = _images(3), 7
    t = perturbation_timesteps(denoiser, timesteps=1, t_max=k / 1000)
    assert t.tolist() == [k]
    z = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(10)).expand(3, -1, -1, -1)  # the same noise
    abar = scheduler.alphas_cumprod[k]
    x_t = abar.sqrt() * x + (1 - abar).sqrt() * z
    with torch.no_grad():
        expected = -model(x_t, k).sample / (1 - abar).sqrt()
    eps = expected_perturbation_score(denoiser, x, timesteps=1, t_max=k / 1000, generator=10)
    torch.testing.assert_close(eps, expected, rtol=1e-4, atol=1e-3)  # VE round trip in float32


def test_antithetic_pairs_neighbouring_levels_with_opposite_noise(unet, denoiser):
    model, scheduler = unet
    x = _images(2)
    z = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(10)).expand(2, -1, -1, -1)  # the same noise
    expected = 0
    for k, noise in ((1, z), (2, -z)):
        abar = scheduler.alphas_cumprod[k]
        with torch.no_grad():
            expected = expected - model(abar.sqrt() * x + (1 - abar).sqrt() * noise, k).sample / (1 - abar).sqrt() / 2
    eps = expected_perturbation_score(denoiser, x, timesteps=2, t_max=2 / 1000, generator=10, antithetic=True)
    torch.testing.assert_close(eps, expected, rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="even"):
        expected_perturbation_score(denoiser, x, timesteps=3, antithetic=True)


def test_default_levels_are_the_official_ones(denoiser):
    assert perturbation_timesteps(denoiser).tolist() == pytest.approx(list(range(1, 21)))


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.zeros(3, 8, 8), "N, C, H, W"),
        (torch.full((1, 3, 8, 8), float("nan")), "NaN"),
        (torch.full((1, 3, 8, 8), 1.5), r"\[-1, 1\]"),
        (torch.zeros(1, 1, 8, 8), "channels"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.long), "float"),
    ],
)
def test_eps_rejects_bad_images(denoiser, images, match):
    with pytest.raises(ValueError, match=match):
        expected_perturbation_score(denoiser, images, timesteps=T)
