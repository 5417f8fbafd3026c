"""Image and detection metrics, one place for the library, the app and the benchmarks.

* invisibility: :func:`psnr`, :func:`psnr_ssim` (SSIM of Wang et al. 2004, via kornia);
* distribution distance: :func:`frechet_distance` between Gaussians fitted to features (the FID formula of
  Heusel et al. 2017, ``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2)``);
* detection: :func:`auroc`, :func:`threshold_at_fpr`, :func:`tpr_at_fpr`, :func:`flag_rate`.
"""

from __future__ import annotations

import math

import kornia
import torch
from torch import Tensor

__all__ = [
    "auroc",
    "feature_statistics",
    "flag_rate",
    "frechet_distance",
    "psnr",
    "psnr_ssim",
    "threshold_at_fpr",
    "tpr_at_fpr",
]


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Per-image PSNR (N,) in dB of images in [0, 1] (capped at 120 dB for identical images)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-12))


def psnr_ssim(clean: Tensor, protected: Tensor) -> tuple[list[float], list[float]]:
    """Per-image PSNR (dB) and SSIM (11x11 Gaussian window of sigma 1.5, smaller for tiny images) of images in
    [0, 1]. SSIM averages the windows that lie inside the image, as Wang et al.'s reference code and
    ``skimage.metrics.structural_similarity`` do (kornia's default reflect-pads the border, which reads low on
    small images)."""
    clean, protected = clean.float(), protected.float()
    window = min(11, min(clean.shape[-2:]) - (1 - min(clean.shape[-2:]) % 2))
    ssim = kornia.metrics.ssim(clean, protected, window_size=window, padding="valid").flatten(1).mean(1)
    return psnr(clean, protected).tolist(), ssim.tolist()


def feature_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and covariance (float64) of features (N, D)."""
    features = features.double()
    return features.mean(0), torch.cov(features.T)


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D), via a symmetric eigen-decomposition."""
    mu_a, cov_a = feature_statistics(features_a)
    mu_b, cov_b = feature_statistics(features_b)
    eigvals, eigvecs = torch.linalg.eigh(cov_a)
    sqrt_a = eigvecs @ torch.diag(eigvals.clamp(min=0).sqrt()) @ eigvecs.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


def auroc(negative: Tensor, positive: Tensor) -> float:
    """Area under the ROC curve: P(positive score > negative score), ties counting 1/2."""
    negative, positive = negative.detach().double().flatten().cpu(), positive.detach().double().flatten().cpu()
    if len(negative) == 0 or len(positive) == 0:
        raise ValueError("auroc needs at least one negative and one positive score")
    total = 0.0
    for chunk in positive.split(1024):
        diff = chunk[:, None] - negative[None]
        total += ((diff > 0).double() + 0.5 * (diff == 0).double()).sum().item()
    return total / (len(negative) * len(positive))


def threshold_at_fpr(negative: Tensor, fpr: float = 0.05) -> float:
    """The threshold that flags (``score > threshold``) ``floor(fpr n)`` of the ``n`` negative scores, the most
    that stays within ``fpr``: the order statistic ``sorted[n - 1 - floor(fpr n)]`` (fewer with ties). (The
    ``1 - fpr`` quantile with "higher" interpolation was one order statistic too high: 0 of 20 flagged at 5 %.)"""
    scores = negative.detach().double().flatten().cpu().sort().values
    if len(scores) == 0:
        raise ValueError("threshold_at_fpr needs at least one negative score")
    allowed = math.floor(fpr * len(scores) + 1e-9)
    return float(scores[max(0, len(scores) - 1 - allowed)])


def tpr_at_fpr(negative: Tensor, positive: Tensor, fpr: float = 0.05) -> float:
    """True positive rate at the threshold that flags at most ``fpr`` of the ``negative`` scores."""
    threshold = threshold_at_fpr(negative, fpr)
    return (positive.detach().double().cpu() > threshold).double().mean().item()


def flag_rate(scores: Tensor, threshold: float) -> float:
    """Fraction of ``scores`` above ``threshold`` (the FPR on benign inputs, the TPR on adversarial ones)."""
    return (scores.detach().double().cpu() > threshold).double().mean().item()
