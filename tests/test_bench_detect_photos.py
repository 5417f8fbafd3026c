"""The photo detection benchmark's parts: the benign changes decode like uploads, the metrics are right."""

import numpy as np
import pytest
import torch

from benchmarks.bench_detect_photos import BENIGN, benign, fpr_at_tpr


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
