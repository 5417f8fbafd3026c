"""protect.mmd: the deep-kernel MMD of EPS-AD and its test-power training, on toy samples."""

import torch

from protect.mmd import DeepKernel, conv_featurizer, mmd2, mmd2_per_sample, power_criterion, train_kernel


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
