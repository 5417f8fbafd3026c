"""The photo detection benchmark's parts: the benign changes decode like uploads, the metrics are right."""

import numpy as np
import pytest
import torch

from benchmarks.bench_detect_photos import BENIGN, augment, benign, fpr_at_tpr


def test_fpr_at_tpr():
    negative = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert fpr_at_tpr(negative, torch.tensor([2.5, 3.5, 4.0, 5.0]), tpr=1.0) == 0.25  # threshold 2.5
    assert fpr_at_tpr(negative, torch.tensor([10.0, 11.0]), tpr=0.95) == 0.0


@pytest.mark.parametrize("change", BENIGN)
def test_benign_changes_keep_the_size_and_stay_close(change, tmp_path):
    rng = np.random.default_rng(0)
    small = rng.integers(30, 220, size=(6, 5, 3), dtype=np.uint8)
    from PIL import Image

    array = np.asarray(Image.fromarray(small).resize((40, 48), Image.Resampling.BICUBIC))
    (out,) = benign([array], change, tmp_path)
    assert out.shape == array.shape and out.dtype == np.uint8
    grey = np.asarray(Image.fromarray(array).convert("L"), np.float64)[..., None]
    target = grey if change == "16bit" else array.astype(np.float64)
    assert np.abs(out.astype(np.float64) - target).mean() < 12, change  # a benign change, not another image
    if change == "png":
        assert np.array_equal(out, array)


def test_operating_points_trade_benign_false_alarms_against_detection():
    from benchmarks.bench_detect_photos import operating_points

    def row(kind, name, scores, budget="-"):
        return {"kind": kind, "name": name, "budget": budget, "scores": {"eps_ad": scores}}

    rows = [
        row("clean", "clean (held-out test crops)", [0.0, 0.1, 0.2, 0.3]),
        row("benign", "noise2_8bit", [0.5, 0.6, 0.7, 0.8]),  # a benign change that scores like an attack
        row("benign", "jpeg75", [0.0, 0.0, 0.1, 0.1]),
        row("attack", "photoguard@1", [0.6, 0.9, 1.0, 1.2], "8/255"),
        row("attack", "photoguard@1", [9.0, 9.0, 9.0, 9.0], "16/255"),  # another budget: not counted
    ]
    points = operating_points(rows, calibrated=0.3, budget="8/255")
    assert [p["threshold"] for p in points] == sorted(p["threshold"] for p in points)
    at_calibrated = next(p for p in points if p["label"].startswith("calibrated"))
    assert at_calibrated["clean"] == 0.0 and at_calibrated["worst_benign"] == 1.0
    assert at_calibrated["worst_benign_change"] == "noise2_8bit"
    assert at_calibrated["detected"] == {"photoguard@1": 1.0}
    strictest = points[-1]  # no benign change above 5 %: noise's maximum is the threshold
    assert strictest["threshold"] == 0.8 and strictest["worst_benign"] == 0.0
    assert strictest["detected"] == {"photoguard@1": 0.75}


def test_clean_augmentation_is_the_benign_change_with_other_noise(tmp_path):
    """Fit-time augmentation: the same change as the benign test row (same size, bounded change) but never the
    test crops' noise draws."""
    from protect.purify import PURIFICATIONS

    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, h, 40, generator=g) * 1.6 - 0.8 for h in (40, 56)]  # sizes differ
    noisy = augment(images, "noise2_8bit", seed=0)
    assert [x.shape for x in noisy] == [x.shape for x in images]
    for x, y in zip(images, noisy):
        step = (y - x).abs().max().item()
        assert 0 < step <= 2 * (8 / 255 + 1 / 255)  # 8-bit rounding plus ~4 sigma of 2/255, on the signed scale
    from benchmarks.bench_detect_photos import CALIBRATION_NOISE_SEED, TEST_NOISE_SEED
    from protect.purify import gaussian_noise_8bit

    for base in (0, CALIBRATION_NOISE_SEED, TEST_NOISE_SEED):  # other draws than the calibration and test rows'
        row = gaussian_noise_8bit(images[0][None].add(1).div(2), std=2 / 255, seed=base)[0].mul(2).sub(1)
        assert not torch.allclose(noisy[0], row)
    blurred = augment(images[:1], "blur1_pil", seed=1)[0]
    expected = PURIFICATIONS["blur1_pil"](images[0][None].add(1).div(2))[0].mul(2).sub(1)
    torch.testing.assert_close(blurred, expected)


def test_calibration_and_test_crops_share_no_pixel_and_no_noise_draw(tmp_path):
    """The threshold is set on crops the test rows never see: opposite halves of each held-out photo, and benign
    noise from other seeds (before, test crop i overlapped calibration crops by 67-95 % and got their noise)."""
    from apps.demo.photos import HELD_OUT, photo_uint8
    from benchmarks.bench_detect_photos import (
        CALIBRATION_HALF,
        CALIBRATION_NOISE_SEED,
        TEST_HALF,
        TEST_NOISE_SEED,
        crops,
    )

    held = list(HELD_OUT)
    for name in held:
        photo = photo_uint8(name)
        h, w = photo.shape[:2]
        # where each crop lies: find it in the photo by its exact pixels (the crops are native, never resized)
        boxes = {}
        for half, seed in ((CALIBRATION_HALF, 100), (TEST_HALF, 200)):
            boxes[half] = []
            for crop in crops([name], 6, 256, seed, half=half):
                assert crop.shape == (256, 256, 3)  # the halves of these photos hold a full 256 px crop
                hits = [
                    (r, c)
                    for r in range(h - 255)
                    for c in range(w - 255)
                    if photo[r, c, 0] == crop[0, 0, 0] and np.array_equal(photo[r : r + 256, c : c + 256], crop)
                ]
                assert hits
                boxes[half].append(hits[0])
        for r0, c0 in boxes[CALIBRATION_HALF]:
            for r1, c1 in boxes[TEST_HALF]:
                assert abs(r0 - r1) >= 256 or abs(c0 - c1) >= 256, name  # disjoint
    assert CALIBRATION_HALF != TEST_HALF and abs(CALIBRATION_NOISE_SEED - TEST_NOISE_SEED) >= 1000
    rng = np.random.default_rng(0)
    array = rng.integers(30, 220, size=(40, 40, 3), dtype=np.uint8)
    a = benign([array], "noise2_8bit", tmp_path, seed=CALIBRATION_NOISE_SEED)[0]
    b = benign([array], "noise2_8bit", tmp_path, seed=TEST_NOISE_SEED)[0]
    assert not np.array_equal(a, b)
    with pytest.raises(ValueError, match="half"):
        crops(held, 1, 64, 0, half=2)
