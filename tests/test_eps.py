"""EPS-AD on a tiny random UNet: the EPS, the deep-kernel MMD and the detector's plumbing."""

import math

import pytest
import torch

from guidance.denoisers import DiffusersDenoiser
from protect.detector import WEIGHTS_NAME, EPSDetector
from protect.eps import expected_perturbation_score, perturbation_timesteps
from protect.mmd import DeepKernel, conv_featurizer, mmd2, mmd2_per_sample, power_criterion, train_kernel
from tests.factories import random_pixel_unet, tiny_pixel_unet

T = 4  # perturbation levels: enough to exercise the batching, cheap on shared cores


@pytest.fixture(scope="module")
def unet():
    return random_pixel_unet()


@pytest.fixture(scope="module")
def denoiser(unet):
    return DiffusersDenoiser(*unet)


def _images(n, seed=0, size=8, amplitude=0.8):
    """Smooth images in [-amplitude, amplitude]: upsampled 2x2 noise."""
    low = (torch.rand(n, 3, 2, 2, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * amplitude
    return torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)


def _auroc(negative, positive):
    """Probability that a positive scores above a negative (ties count 1/2)."""
    diff = positive[:, None] - negative[None]
    return ((diff > 0).double() + 0.5 * (diff == 0).double()).mean().item()


# --- EPS ---


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


# --- MMD ---


def _kernel(channels=1, seed=0):
    kernel = DeepKernel(
        conv_featurizer(channels, channels=(4,), feature_dim=8, generator=torch.Generator().manual_seed(seed))
    )
    return kernel.eval()


def test_mmd_of_a_sample_with_itself_is_about_zero_and_grows_with_a_shift():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 4, 4, generator=gen), torch.randn(64, 1, 4, 4, generator=gen)
    kernel = _kernel()
    kernel.init_bandwidths(x, y)
    with torch.no_grad():
        same = mmd2(x, y, kernel).item()
        shifted = [mmd2(x, y + shift, kernel).item() for shift in (0.5, 1.0, 2.0)]
        per_sample = mmd2_per_sample(x, torch.cat([y[:8], y[:8] + 2.0]), kernel)
    assert abs(same) < 0.02
    assert same < shifted[0] < shifted[1] < shifted[2]
    assert per_sample[8:].min() > per_sample[:8].max()


def test_training_raises_test_power_on_a_toy_shift():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1, 4, 4, generator=gen)
    y = torch.randn(64, 1, 4, 4, generator=gen)
    y[:, :, :2, :2] += 0.7  # a shift in a few pixels, diluted in the raw-input distance
    kernel = _kernel(seed=1)
    kernel.init_bandwidths(x, y)
    with torch.no_grad():
        before = power_criterion(x, y, kernel).item()
    trained = train_kernel(x, y, kernel=kernel, epochs=60, lr=5e-3, batch_size=32, generator=gen)
    with torch.no_grad():
        after = power_criterion(x, y, trained).item()
    assert after > 1.5 * before > 0


# --- detector ---


def _sign_noise(images, seed):
    """An easy synthetic shift: strong sign noise (not an attack; the random UNet only tests the plumbing)."""
    noise = torch.sign(torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)))
    return (images + 0.5 * noise).clamp(-1, 1)


def _detector(unet, **overrides):
    return EPSDetector(*unet, timesteps=T, kernel_batch_size=8, channels=(4,), feature_dim=16, **overrides)


@pytest.fixture(scope="module")
def fitted(unet):
    clean = _images(24, seed=1, amplitude=0.3)
    return _detector(unet, epochs=10).fit(clean, _sign_noise(clean, 2))


def test_detector_separates_an_easy_shift(fitted):
    clean = _images(16, seed=3, amplitude=0.3)
    noisy = _sign_noise(clean, 4)
    assert _auroc(fitted.score(clean), fitted.score(noisy)) > 0.9
    assert fitted.predict(noisy).float().mean() > 0.5 > fitted.predict(clean).float().mean()
    # each image's score depends on the image only: alone (the CLI) or anywhere in a batch (the app)
    scores = fitted.score(noisy)
    for i in (0, 5, 15):
        torch.testing.assert_close(fitted.score(noisy[i : i + 1]), scores[i : i + 1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fitted.score(noisy.flip(0)).flip(0), scores, rtol=1e-4, atol=1e-5)


def test_one_verdict_for_predict_and_the_app(fitted, unet):
    images = torch.cat([_images(4, seed=3, amplitude=0.3), _sign_noise(_images(4, seed=3, amplitude=0.3), 4)])
    scores, flags = fitted.score(images), fitted.predict(images)
    assert torch.equal(fitted.is_adversarial(scores), flags)
    assert [fitted.verdict(s) for s in scores] == ["adversarial" if f else "clean" for f in flags.tolist()]
    threshold = fitted.threshold  # a score at the threshold is clean, just above it adversarial
    assert fitted.verdict(threshold) == "clean" and fitted.verdict(math.nextafter(threshold, math.inf)) == "adversarial"
    assert fitted.is_adversarial(threshold) is False
    with pytest.raises(RuntimeError, match="not calibrated"):
        _detector(unet).is_adversarial(torch.zeros(2))


def test_detector_refuses_unit_range_images_unless_told(fitted):
    clean = _images(6, seed=3, amplitude=0.3)
    unit = (clean + 1) / 2  # the same images in [0, 1]
    with pytest.raises(ValueError, match=r"look like \[0, 1\] data.*value_range=\(0, 1\)"):
        fitted.score(unit)
    with pytest.raises(ValueError, match="look like"):
        fitted.predict(unit)
    torch.testing.assert_close(fitted.score(unit, value_range=(0, 1)), fitted.score(clean), rtol=1e-4, atol=1e-5)
    bright = clean.abs()  # [-1, 1] images that happen to have no negative pixel: accepted when said so
    assert fitted.score(bright, value_range=(-1, 1)).isfinite().all()
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        fitted.score(unit * 2, value_range=(0, 1))
    with pytest.raises(ValueError, match="value_range must be"):
        fitted.score(clean, value_range=(0, 255))


def test_half_precision_gives_the_float32_scores_and_leaves_the_kernel_in_float32(fitted):
    x = _sign_noise(_images(4, seed=7, amplitude=0.3), 8).half()
    reference = fitted.score(x.float())
    half = fitted.score(x)
    assert half.isfinite().all() and half.dtype == torch.float32
    torch.testing.assert_close(half, reference, rtol=1e-3, atol=1e-4)
    assert all(p.dtype == torch.float32 for p in fitted.kernel.parameters())
    torch.testing.assert_close(fitted.score(x.float()), reference, rtol=0, atol=0)  # later float32 calls unchanged


def test_fit_leaves_the_global_rng_alone(unet):
    state = torch.get_rng_state()
    _detector(unet, epochs=1).fit(_images(6), _images(4, seed=1))
    assert torch.equal(torch.get_rng_state(), state)


def test_save_and_load_round_trip(fitted, unet, tmp_path):
    fitted.save_pretrained(tmp_path)
    loaded = EPSDetector.from_pretrained(tmp_path, *unet)
    x = _images(4, seed=5)
    assert loaded.threshold == fitted.threshold and loaded.config == fitted.config
    torch.testing.assert_close(loaded.score(x), fitted.score(x), rtol=0, atol=0)


def test_saved_detector_names_and_checks_its_diffusion_model(fitted, unet, tmp_path):
    fitted.save_pretrained(tmp_path, diffusion_model="demo/unet_x")
    loaded = EPSDetector.from_pretrained(tmp_path, *unet)
    assert loaded.diffusion_model == "demo/unet_x"
    torch.testing.assert_close(loaded.calibration_scores, fitted.calibration_scores.float())
    other = tiny_pixel_unet()  # same architecture, other weights
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    with pytest.warns(UserWarning, match="another diffusion model"):
        EPSDetector.from_pretrained(tmp_path, other, unet[1])


def test_loading_rejects_missing_and_corrupt_files(fitted, unet, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved EPSDetector"):
        EPSDetector.from_pretrained(tmp_path, *unet)
    fitted.save_pretrained(tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="corrupt"):
        EPSDetector.from_pretrained(tmp_path, *unet)
    fitted.save_pretrained(tmp_path)
    config = tmp_path / "config.json"
    config.write_text(config.read_text().replace('"feature_dim": 16', '"feature_dim": 17'))
    with pytest.raises(ValueError, match="do not match"):
        EPSDetector.from_pretrained(tmp_path, *unet)


def test_detector_rejects_bad_inputs(unet, fitted):
    detector = EPSDetector(*unet, timesteps=T)
    with pytest.raises(RuntimeError, match="not fitted"):
        detector.score(_images(2))
    with pytest.raises(ValueError, match="too few"):
        detector.fit(_images(3), _images(3, seed=1))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        detector.fit(_images(8) * 2, _images(8))
    with pytest.raises(ValueError, match="fitted on"):
        fitted.score(_images(2, size=16))
    with pytest.raises(ValueError, match="fpr"):
        EPSDetector(*unet, fpr=1.5)
    with pytest.raises(ValueError, match="scheduler"):
        EPSDetector(unet[0])
