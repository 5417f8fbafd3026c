"""protect.metrics: PSNR/SSIM, the Fréchet distance and the detection rates on tiny tensors."""

import pytest
import torch

from protect import metrics


def test_frechet_distance_of_identical_and_shifted_features():
    features = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    assert metrics.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    assert metrics.frechet_distance(features, features + 2.0) == pytest.approx(8 * 4.0, rel=1e-6)


def test_detection_rates():
    neg, pos = torch.arange(100.0), torch.arange(100.0) + 1000
    assert metrics.auroc(neg, pos) == 1.0 and metrics.auroc(pos, neg) == 0.0 and metrics.auroc(neg, neg) == 0.5
    assert metrics.tpr_at_fpr(neg, pos) == 1.0 and metrics.tpr_at_fpr(neg, neg) <= 0.05
    assert metrics.flag_rate(neg, metrics.threshold_at_fpr(neg, 0.05)) <= 0.05
    for n in (20, 40, 100, 19):  # the most negatives that stay within 5 %: 1, 2, 5, 0
        scores = torch.randperm(n, generator=torch.Generator().manual_seed(n)).double()
        assert metrics.flag_rate(scores, metrics.threshold_at_fpr(scores, 0.05)) == (n // 20) / n
    with pytest.raises(ValueError, match="at least one"):
        metrics.auroc(neg[:0], pos)


def test_psnr_and_ssim():
    a = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    b = (a + 0.1).clamp(0, 1)
    mse = (a - b).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(metrics.psnr(a, b), -10 * torch.log10(mse))
    psnr, ssim = metrics.psnr_ssim(a, a)
    assert psnr == [pytest.approx(120.0)] * 2 and ssim == [pytest.approx(1.0)] * 2


@pytest.mark.parametrize("size", [(32, 32), (48, 37)])
def test_ssim_matches_the_reference_implementation(size):
    """SSIM against scikit-image's (Gaussian weights, sigma 1.5, population covariance: Wang et al. 2004), at the
    small sizes where a padded border would read 0.006-0.013 low."""
    structural_similarity = pytest.importorskip("skimage.metrics").structural_similarity
    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 3, *size, generator=g)
    b = (a + 0.08 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    _, ssim = metrics.psnr_ssim(a, b)
    for i in range(2):
        expected = structural_similarity(
            a[i].permute(1, 2, 0).double().numpy(),
            b[i].permute(1, 2, 0).double().numpy(),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
            channel_axis=2,
        )
        assert ssim[i] == pytest.approx(expected, abs=2e-4)
