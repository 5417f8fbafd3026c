"""Maximum mean discrepancy with a trained deep kernel (Liu et al., ICML 2020, "Learning Deep Kernels for
Non-Parametric Two-Sample Tests"; the MMD-D test that EPS-AD runs on EPS images).

Deep kernel (Liu et al. 2020, Sec. 3), ``k_a`` and ``k_b`` Gaussian with learnable bandwidths:

    k(x, y) = [(1 - eps) k_a(phi(x), phi(y)) + eps] k_b(x, y),   k_c(u, v) = exp(-|u - v|^2 / sigma_c^2)

Unbiased U-statistic of ``MMD^2`` between samples ``X`` (n) and ``Y`` (m):

    MMD^2_u = sum_{i != j} k(x_i, x_j) / n(n-1) + sum_{i != j} k(y_i, y_j) / m(m-1) - 2 sum_ij k(x_i, y_j) / nm

Test-power criterion maximised in training (paired samples, n = m), ``J = MMD^2_u / sqrt(var_H1)`` with
``H_ij = k(x_i, x_j) + k(y_i, y_j) - k(x_i, y_j) - k(x_j, y_i)`` and
``var_H1 = 4 / n^3 sum_i (sum_j H_ij)^2 - 4 / n^4 (sum_ij H_ij)^2``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def conv_featurizer(
    in_channels: int,
    *,
    channels: Sequence[int] = (16, 32),
    feature_dim: int = 300,
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """``phi``: stride-2 3x3 convolutions with leaky ReLUs, a 4x4 average pool and a linear map to ``feature_dim``.

    Weights are drawn from ``generator`` (PyTorch's default initialisation), never from the global RNG.
    """
    if not channels or any(c < 1 for c in channels) or feature_dim < 1 or in_channels < 1:
        raise ValueError(f"need positive channels and feature_dim, got {in_channels}, {tuple(channels)}, {feature_dim}")
    layers: list[nn.Module] = []
    for c_in, c_out in zip((in_channels, *channels), channels):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, device="meta"), nn.LeakyReLU(0.2)]
    layers += [nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(channels[-1] * 16, feature_dim, device="meta")]
    net = nn.Sequential(*layers).to_empty(device="cpu")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    for layer in net:
        if isinstance(layer, nn.Conv2d | nn.Linear):
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
            bound = 1 / math.sqrt(layer.weight[0].numel())
            nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return net


def _sqdist(a: Tensor, b: Tensor) -> Tensor:
    a, b = a.flatten(1), b.flatten(1)
    return (a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None] - 2 * a @ b.T).clamp_min(0)


class DeepKernel(nn.Module):
    """The deep kernel ``k(x, y)`` of Liu et al. (2020): Gram matrices through :meth:`forward`.

    Inputs are divided by a fixed ``scale`` first (set with the bandwidths by :meth:`init_bandwidths`), so
    raw EPS values of any magnitude train alike. ``eps = sigmoid(eps_logit)`` starts at 1/2 as in the
    official code.
    """

    def __init__(self, featurizer: nn.Module) -> None:
        super().__init__()
        self.featurizer = featurizer
        self.log_bandwidth_a = nn.Parameter(torch.zeros(()))  # log sigma_a^2
        self.log_bandwidth_b = nn.Parameter(torch.zeros(()))  # log sigma_b^2
        self.eps_logit = nn.Parameter(torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))

    @torch.no_grad()
    def init_bandwidths(self, x: Tensor, y: Tensor) -> None:
        """Median heuristic on the pooled samples for both bandwidths; ``scale`` = their root mean square."""
        pooled = torch.cat([x, y]).to(self.scale)
        self.scale.copy_(pooled.pow(2).mean().sqrt().clamp_min(1e-12))
        pooled = pooled / self.scale
        dist_b, dist_a = _sqdist(pooled, pooled), _sqdist(*[self.featurizer(pooled)] * 2)
        off = ~torch.eye(len(pooled), dtype=torch.bool, device=pooled.device)
        self.log_bandwidth_b.copy_(dist_b[off].median().clamp_min(1e-12).log())
        self.log_bandwidth_a.copy_(dist_a[off].median().clamp_min(1e-12).log())

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """The Gram matrix ``k(x_i, y_j)``, ``(n, m)``."""
        x, y = x / self.scale, y / self.scale
        eps = torch.sigmoid(self.eps_logit)
        k_a = torch.exp(-_sqdist(self.featurizer(x), self.featurizer(y)) / self.log_bandwidth_a.exp())
        k_b = torch.exp(-_sqdist(x, y) / self.log_bandwidth_b.exp())
        return ((1 - eps) * k_a + eps) * k_b


def _within(gram: Tensor) -> Tensor:
    """Mean of the off-diagonal entries, ``sum_{i != j} K_ij / n(n-1)``."""
    n = gram.shape[0]
    return (gram.sum() - gram.diagonal().sum()) / (n * (n - 1))


def _check_two(x: Tensor, y: Tensor) -> None:
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"the U-statistic needs at least 2 samples per set, got {len(x)} and {len(y)}")


def mmd2(x: Tensor, y: Tensor, kernel: nn.Module) -> Tensor:
    """Unbiased ``MMD^2_u`` between samples ``x`` (n, ...) and ``y`` (m, ...) (Gretton et al. 2012; Liu et al. 2020)."""
    _check_two(x, y)
    return _within(kernel(x, x)) + _within(kernel(y, y)) - 2 * kernel(x, y).mean()


def mmd2_per_sample(reference: Tensor, samples: Tensor, kernel: nn.Module) -> Tensor:
    """``MMD^2`` of each sample against the reference set, ``(m,)``, as the official EPS-AD ``MMD_batch``:

    ``sum_{i != j} k(r_i, r_j) / n(n-1) - 2 mean_i k(r_i, y) + k(y, y)``, where ``k(y, y) = 1``.
    """
    _check_two(reference, reference)
    return _within(kernel(reference, reference)) - 2 * kernel(reference, samples).mean(0) + 1


def mmd2_to_reference(
    reference: Tensor, samples: Tensor, kernel: nn.Module, independent: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The set statistic and the per-sample ones of ``samples`` (m, ...) against ``reference`` (n, ...).

    Returns the unbiased ``MMD^2_u`` between the two sets (:func:`mmd2`) and :func:`mmd2_per_sample`, ``(m,)``,
    from one pass over the kernel. ``independent`` ``(m, m)`` (bool) names the pairs of samples that may stand
    as independent draws in the within-sample term (default: every pair ``i != j``; overlapping image patches
    are near-copies, and their ``k`` near 1 would bias the statistic up). With no such pair (one sample, or
    samples that all overlap) the reference's own within term stands in for it: the same expectation under
    the null, so a clean set's statistic has mean 0 whatever its size.
    """
    _check_two(reference, reference)
    k_rr, k_ry = _within(kernel(reference, reference)), kernel(reference, samples)
    per_sample = k_rr - 2 * k_ry.mean(0) + 1
    m = len(samples)
    pairs = ~torch.eye(m, dtype=torch.bool, device=samples.device)
    if independent is not None:
        if independent.shape != (m, m):
            raise ValueError(f"independent must be ({m}, {m}), got {tuple(independent.shape)}")
        pairs &= independent.to(device=samples.device, dtype=torch.bool)
    k_yy = kernel(samples, samples)[pairs].mean() if bool(pairs.any()) else k_rr
    return k_rr + k_yy - 2 * k_ry.mean(), per_sample


def power_criterion(x: Tensor, y: Tensor, kernel: nn.Module, reg: float = 1e-8) -> Tensor:
    """Liu et al.'s criterion ``MMD^2_u / sqrt(var_H1 + reg)`` on paired samples (``len(x) == len(y)``)."""
    _check_two(x, y)
    if len(x) != len(y):
        raise ValueError(f"the test-power estimate pairs the samples: got {len(x)} and {len(y)}")
    n = len(x)
    k_xy = kernel(x, y)
    h = kernel(x, x) + kernel(y, y) - k_xy - k_xy.T
    mmd = (h.sum() - h.diagonal().sum()) / (n * (n - 1))
    var = 4 * (h.sum(1).pow(2).sum() / n**3 - (h.sum() / n**2) ** 2)
    return mmd / torch.sqrt(var.clamp_min(0) + reg)


def train_kernel(
    x: Tensor,
    y: Tensor,
    *,
    kernel: DeepKernel | None = None,
    epochs: int = 200,
    lr: float = 5e-4,
    batch_size: int = 100,
    generator: torch.Generator | None = None,
) -> DeepKernel:
    """Fit a :class:`DeepKernel` to separate ``x`` (clean EPS) from ``y`` (adversarial EPS) by maximising
    :func:`power_criterion` with Adam over paired minibatches (Liu et al. 2020, Alg. 1).

    ``kernel`` defaults to a :func:`conv_featurizer` deep kernel; its bandwidths are reset by the median
    heuristic first. The minibatches and new weights come from ``generator`` (seed 0 if none).
    """
    _check_two(x, y)
    if x.shape[1:] != y.shape[1:]:
        raise ValueError(f"the two samples differ in shape: {tuple(x.shape[1:])} and {tuple(y.shape[1:])}")
    if epochs < 0 or lr <= 0 or batch_size < 2:
        raise ValueError(f"need epochs >= 0, lr > 0 and batch_size >= 2, got {epochs}, {lr}, {batch_size}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    if kernel is None:
        kernel = DeepKernel(conv_featurizer(x.shape[1], generator=generator))
    kernel = kernel.to(device=x.device, dtype=x.dtype)
    kernel.init_bandwidths(x, y)
    optimizer = torch.optim.Adam(kernel.parameters(), lr=lr)
    n = min(len(x), len(y))
    kernel.train()
    for _ in range(epochs):
        ix, iy = torch.randperm(len(x), generator=generator)[:n], torch.randperm(len(y), generator=generator)[:n]
        for start in range(0, n - 1, batch_size):  # so a trailing batch of one sample is dropped
            bx, by = ix[start : start + batch_size].to(x.device), iy[start : start + batch_size].to(y.device)
            loss = -power_criterion(x[bx], y[by], kernel)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return kernel.eval()
