"""protect.purify: one table of purifications for the evaluation and the detector testbed."""

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
