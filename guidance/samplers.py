"""Score-based samplers on the VE scale: annealed Langevin dynamics and predictor-corrector.

Every sampler has k-diffusion's shape ``sample_x(model, x, sigmas, *, generator, callback,
**options) -> x`` over the denoiser contract of :mod:`.denoisers` (``model(x, sigma) -> x0``,
score ``(x0 - x) / sigma^2``). ``sigmas`` are the noise levels ``sigma_1 > ... > sigma_L > 0``
(a trailing 0 is allowed and changes nothing); ``x`` starts at the first level, e.g.
``sigma_1 * randn``. Noise comes only from ``generator``: one generator, or one per sample so
that a sample's noise does not depend on the batch it is drawn in (the corrector's step size does:
it is a batch mean, as in the reference code, see :func:`langevin_correct`).

* Annealed Langevin dynamics: Song & Ermon, "Generative Modeling by Estimating Gradients of the
  Data Distribution" (2019), Algorithm 1; final denoising step of Jolicoeur-Martineau et al.,
  "Adversarial score matching and improved sampling for image generation" (2020).
* Predictor-corrector: Song et al., "Score-Based Generative Modeling through Stochastic
  Differential Equations" (2021), Algorithms 2 and 4 (VE SDE).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .denoisers import DenoiseFn, per_sample, score_from_denoised
from .method import check_real

Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclasses.dataclass(frozen=True)
class Step:
    """What a sampler reports after noise level ``i``: its sigma, the updated sample, the last denoised estimate."""

    i: int
    sigma: float
    x: Tensor
    denoised: Tensor


Callback = Callable[[Step], None]


def geometric_sigmas(sigma_max: float, sigma_min: float, n: int) -> Tensor:
    """``n`` noise levels in geometric progression from ``sigma_max`` to ``sigma_min`` (NCSN; Song & Ermon 2019)."""
    _check_positive("sigma_min", sigma_min)
    check_real("sigma_max", sigma_max, low=sigma_min)
    _check_count("n", n, low=1)
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()


@torch.no_grad()
def sample_annealed_langevin(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    steps_per_level: int = 100,
    epsilon: float = 2e-5,
    final_denoise: bool = True,
    generator: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """Annealed Langevin dynamics, Algorithm 1 of Song & Ermon (2019), optionally ending with ``x = D(x, sigma_L)``."""
    levels = _levels(sigmas)
    _check_count("steps_per_level", steps_per_level, low=1)
    _check_positive("epsilon", epsilon)
    generator = _generator(generator, x)
    given, x = x.dtype, _working(x)
    for i, sigma in enumerate(levels):
        alpha = epsilon * sigma**2 / levels[-1] ** 2  # step size alpha_i = eps sigma_i^2 / sigma_L^2
        for _ in range(steps_per_level):
            denoised, grad = _evaluate(model, x, sigma)
            # x_t = x_{t-1} + alpha_i / 2 s(x_{t-1}, sigma_i) + sqrt(alpha_i) z_t
            x = x + alpha / 2 * grad + math.sqrt(alpha) * _randn(x, generator)
        if callback is not None:
            callback(Step(i, sigma, x, denoised))
    if final_denoise:  # Tweedie: E[x0 | x] at the last level (Jolicoeur-Martineau et al. 2020)
        x, _ = _evaluate(model, x, levels[-1])
    return x.to(given)


def predict_reverse_diffusion(
    x: Tensor, grad: Tensor, sigma: float, sigma_next: float, generator: Generators
) -> tuple[Tensor, Tensor]:
    """Reverse-diffusion predictor for the VE SDE (Song et al. 2021, Algorithm 2): ``(x, x_mean)``."""
    g2 = sigma**2 - sigma_next**2
    x_mean = x + g2 * grad  # x' = x + (sigma_i^2 - sigma_{i+1}^2) s(x, sigma_i)
    return x_mean + math.sqrt(g2) * _randn(x, generator), x_mean


def predict_euler(
    x: Tensor, grad: Tensor, sigma: float, sigma_next: float, generator: Generators
) -> tuple[Tensor, Tensor]:
    """Euler step of the probability-flow ODE ``dx/dsigma = -sigma s(x, sigma)`` (Song et al. 2021, eq. 13)."""
    x = x + sigma * (sigma - sigma_next) * grad
    return x, x


PREDICTORS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "reverse_diffusion": predict_reverse_diffusion,
    "euler": predict_euler,
}


@torch.no_grad()
def langevin_correct(
    model: DenoiseFn,
    x: Tensor,
    sigma: float | Tensor,
    *,
    steps: int = 1,
    snr: float = 0.16,
    generator: Generators = None,
) -> tuple[Tensor, Tensor]:
    """Langevin corrector, Algorithm 4 of Song et al. (2021), with the reference code's batch-mean step size.

    The step is ``e = 2 (r mean_b ||z_b|| / mean_b ||s_b||)^2``, one value for the whole batch, as
    score_sde's ``LangevinCorrector`` computes it. A per-sample ratio ``||z_b|| / ||s_b||`` would be
    correlated with the sample itself (samples far out have large scores, hence small steps) and does
    not leave the noisy marginal invariant in few dimensions: from the exact marginal of a 2-D
    Gaussian its variance grows x4 after one step. The batch-mean step does, so the step (not the
    noise) of a sample depends on the batch it is corrected in, as in the reference.
    """
    _check_count("steps", steps, low=0)
    _check_positive("snr", snr)
    generator = _generator(generator, x)
    given, x = x.dtype, _working(x)
    x_mean = x
    for _ in range(steps):
        _, grad = _evaluate(model, x, sigma)
        z = _randn(x, generator)
        step = 2 * (snr * _norm(z).mean() / _norm(grad).mean()) ** 2  # eps = 2 (r mean||z|| / mean||g||)^2
        x_mean = x + step * grad
        x = x_mean + torch.sqrt(2 * step) * z
    return x.to(given), x_mean.to(given)


@torch.no_grad()
def sample_predictor_corrector(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    predictor: str = "reverse_diffusion",
    corrector_steps: int = 1,
    snr: float = 0.16,
    generator: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """Predictor-corrector sampling of the VE SDE, Algorithm 2 of Song et al. (2021); returns the noise-free mean."""
    levels = _levels(sigmas)
    if predictor not in PREDICTORS:
        raise ValueError(f"unknown predictor {predictor!r}; known: {sorted(PREDICTORS)}")
    generator = _generator(generator, x)
    given, x = x.dtype, _working(x)
    for i, (sigma, sigma_next) in enumerate(itertools.pairwise([*levels, 0.0])):
        # corrector then predictor at each level, as the reference code; the last step lands on sigma = 0
        x, _ = langevin_correct(model, x, sigma, steps=corrector_steps, snr=snr, generator=generator)
        denoised, grad = _evaluate(model, x, sigma)
        x, x_mean = PREDICTORS[predictor](x, grad, sigma, sigma_next, generator)
        if callback is not None:
            callback(Step(i, sigma, x, denoised))
    return x_mean.to(given)


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "annealed_langevin": sample_annealed_langevin,
    "predictor_corrector": sample_predictor_corrector,
}


def _working(x: Tensor) -> Tensor:
    """The sampler's state in at least float32: Langevin steps are small against the state (in bfloat16 they
    round away) and sigma^2 overflows float16 above 256; the denoiser casts to its model's dtype itself."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _evaluate(model: DenoiseFn, x: Tensor, sigma: float | Tensor) -> tuple[Tensor, Tensor]:
    """The denoised estimate and the score at noise level ``sigma``."""
    sigma = per_sample(sigma, x).to(x.dtype)
    denoised = model(x, sigma)
    if denoised.shape != x.shape:
        raise ValueError(f"the denoiser returned shape {tuple(denoised.shape)} for input {tuple(x.shape)}")
    return denoised, score_from_denoised(denoised, x, sigma)


def _norm(v: Tensor) -> Tensor:
    return v.flatten(1).norm(dim=1)


def _generator(generator: Generators, x: Tensor) -> torch.Generator | Sequence[torch.Generator]:
    """The given generator(s), or a freshly seeded one: the global RNG is never used."""
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch (B, ...), got shape {tuple(x.shape)}")
    if generator is None:
        generator = torch.Generator(x.device)
        generator.seed()
    elif not isinstance(generator, torch.Generator) and len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
    return generator


def _randn(x: Tensor, generator: torch.Generator | Sequence[torch.Generator]) -> Tensor:
    """Standard normal noise like ``x``, drawn on the generator's device (one generator per sample if a list)."""
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
    return torch.stack([_randn(row, g) for row, g in zip(x, generator)])


def _levels(sigmas: Tensor | Sequence[float]) -> list[float]:
    """The positive noise levels of a strictly decreasing 1-D schedule (a trailing 0 dropped)."""
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1:
        raise ValueError(f"sigmas must be a 1-D tensor, got shape {tuple(sigmas.shape)}")
    levels = sigmas.tolist()
    if levels and levels[-1] == 0:
        levels.pop()
    if not levels or not all(math.isfinite(s) and s > 0 for s in levels):
        raise ValueError(f"sigmas must be finite and positive (a trailing 0 aside), got {levels}")
    if any(a <= b for a, b in itertools.pairwise(levels)):
        raise ValueError(f"sigmas must be strictly decreasing, got {levels}")
    return levels


def _check_positive(name: str, value: float) -> None:
    check_real(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")


def _check_count(name: str, value: int, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
