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
    test_row = PURIFICATIONS["noise2_8bit"](images[0][None].add(1).div(2))[0].mul(2).sub(1)
    assert not torch.allclose(noisy[0], test_row)  # other seeds than the test crops' 0..n
    blurred = augment(images[:1], "blur1_pil", seed=1)[0]
    expected = PURIFICATIONS["blur1_pil"](images[0][None].add(1).div(2))[0].mul(2).sub(1)
    torch.testing.assert_close(blurred, expected)
