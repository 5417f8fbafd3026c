"""protect.detector: the EPSDetector's plumbing (fit, score, verdict, persistence, bad inputs) on a tiny random
UNet."""

import math

import pytest
import torch

from protect.detector import WEIGHTS_NAME, EPSDetector
from tests.factories import random_pixel_unet, tiny_pixel_unet
from tests.factories import smooth_images as _images

T = 4  # perturbation levels: enough to exercise the batching, cheap on shared cores


@pytest.fixture(scope="module")
def unet():
    return random_pixel_unet()


def _auroc(negative, positive):
    """Probability that a positive scores above a negative (ties count 1/2)."""
    diff = positive[:, None] - negative[None]
    return ((diff > 0).double() + 0.5 * (diff == 0).double()).mean().item()


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


def test_a_gpu_scores_with_more_evaluations_per_pass_bounded_in_pixels():
    from protect.detector import GPU_PIXELS_PER_PASS, evaluations_per_pass

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert evaluations_per_pass(256, cpu, 16, 16) == 256  # the configured size on the CPU
    assert evaluations_per_pass(256, cuda, 16, 16) == GPU_PIXELS_PER_PASS // 256 == 2560
    assert evaluations_per_pass(4, cuda, 32, 32) == 640
    assert evaluations_per_pass(256, cuda, 512, 512) == 256  # never fewer than configured
