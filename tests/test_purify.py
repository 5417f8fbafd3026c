"""protect.purify: one table of purifications for the evaluation, the detector testbed, EOT and the photo benchmark."""

import numpy as np
import pytest
import torch

from protect import purify, testbed
from protect.evaluate import PURIFICATIONS as EVALUATED


def test_one_table_serves_the_evaluation_and_the_testbed():
    assert EVALUATED["jpeg75"] is testbed.BENIGN["jpeg75"] is purify.PURIFICATIONS["jpeg75"]
    assert set(EVALUATED) == set(purify.EVALUATION) and set(testbed.BENIGN) == set(purify.BENIGN)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for name in purify.PURIFICATIONS:
        y = purify.purify(x, name)
        assert y.shape == x.shape and y.dtype == x.dtype and 0 <= y.min() and y.max() <= 1
    with pytest.raises(ValueError, match="unknown purification"):
        purify.purify(x, "diffpure")


def test_per_image_noise_does_not_depend_on_the_batch():
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    noisy = purify.gaussian_noise(x, std=0.1, per_image=True)
    assert torch.equal(purify.gaussian_noise(x[:1], std=0.1, per_image=True), noisy[:1])
    assert (purify.sign_noise(x, eps=4 / 255) - x).abs().max() <= 4 / 255 + 1e-6


def test_one_table_serves_eot_and_the_photo_benchmark():
    from benchmarks import bench_detect_photos
    from protect.pgd import pgd

    assert purify.EOT == ("jpeg", "resize", "blur", "noise")  # the names protect(robust=...) takes
    assert all(purify.PURIFICATIONS[name].random and purify.PURIFICATIONS[name].differentiable for name in purify.EOT)
    assert set(bench_detect_photos.PIXEL_CHANGES) <= set(purify.PURIFICATIONS)
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"unknown robustness transforms \['jpeg75'\]; choose from"):
        pgd(x, lambda v: v.sum((1, 2, 3)), steps=1, robust=("jpeg75",))  # fixed, not differentiable: not for EOT


@pytest.mark.parametrize("name", list(purify.PURIFICATIONS))
def test_entries_keep_shape_range_dtype_and_their_flags(name):
    entry = purify.PURIFICATIONS[name]
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    generator = (lambda seed: torch.Generator().manual_seed(seed)) if entry.random else (lambda seed: None)
    y = entry(x, generator(1))
    assert y.shape == x.shape and y.dtype == x.dtype and 0 <= y.min() and y.max() <= 1
    assert torch.equal(entry(x, generator(1)), y)  # seeded: by its generator, or by its own fixed seeds
    if entry.random:
        assert not torch.equal(entry(x, generator(2)), y)
    else:
        with pytest.raises(ValueError, match="takes no generator"):
            entry(x, torch.Generator())
    if entry.differentiable:
        leaf = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(entry(leaf, generator(1)).sum(), leaf)
        assert grad.isfinite().all() and grad.abs().sum() > 0


def test_eight_bit_changes_match_pil_on_one_image():
    from PIL import Image, ImageFilter

    x = torch.rand(1, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    pixels = (x[0] * 255).round().byte().permute(1, 2, 0).numpy()
    blurred = np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(1)))
    assert torch.equal(purify.purify(x, "blur1_pil")[0], torch.from_numpy(blurred.copy()).permute(2, 0, 1) / 255)
    noisy = purify.purify(torch.cat([x, x]), "noise2_8bit")
    assert torch.equal(purify.purify(x, "noise2_8bit"), noisy[:1]) and not torch.equal(noisy[0], noisy[1])
    assert ((noisy * 255 - (noisy * 255).round()).abs() < 1e-4).all()  # 8-bit levels


def test_the_training_blur_serves_images_down_to_the_two_pixels_protect_accepts():
    from protect import protect
    from protect.purify import random_blur
    from tests.factories import tiny_vae

    for shape in [(1, 3, 2, 9), (2, 3, 2, 2), (1, 3, 3, 5)]:
        x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
        blurred = random_blur(x, torch.Generator().manual_seed(1))
        assert blurred.shape == x.shape and torch.isfinite(blurred).all()
    out, report = protect(torch.rand(1, 3, 2, 9), vae=tiny_vae(), robust=("blur",), steps=2)
    assert out.shape == (1, 3, 2, 9) and max(report.linf) <= 8 / 255 + 1e-6
