"""Expected Perturbation Score (Zhang et al., ICML 2023, "Detecting Adversarial Data by Probing Multiple
Perturbations Using Expected Perturbation Score"; official code ZSHsh98/EPS-AD).

The score of one noisy copy of an image is a noisy statistic; EPS averages it over ``T`` small VP
perturbations of the clean image, one noise draw per level (the paper's ``EPS(x) = E_t E_z s(x_t, t)``):

    EPS(x) = 1/T sum_{k=1..T} s(x_{t_k}, t_k),   x_t = sqrt(abar_t) x + sqrt(1 - abar_t) z,   z ~ N(0, I)

with the VP score ``s(x_t, t) = -eps_theta(x_t, t) / sqrt(1 - abar_t)`` of a pre-trained diffusion model and
the official levels ``t_k = k / 1000`` of the diffusion time (``T = 20`` on CIFAR-10). For a discrete model of
``N`` training steps, ``t_k`` is the (fractional) timestep ``t_k N``: timestep ``k`` for ``N = 1000``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from guidance import prediction as P
from guidance.denoisers import DiffusersDenoiser, score_from_denoised

Generators = torch.Generator | Sequence[torch.Generator] | int


def as_denoiser(model: Any, scheduler: Any = None) -> DiffusersDenoiser:
    """``model`` itself if it is a :class:`DiffusersDenoiser`, else the VP denoiser of ``(model, scheduler)``."""
    if isinstance(model, DiffusersDenoiser):
        denoiser = model
    elif scheduler is None:
        raise ValueError("pass a DiffusersDenoiser, or the diffusion model together with its scheduler")
    else:
        denoiser = DiffusersDenoiser(model, scheduler)
    if denoiser.alphas_cumprod is None:
        raise ValueError("EPS needs a VP diffusion model (a scheduler with alphas_cumprod), not flow matching")
    return denoiser


def perturbation_timesteps(denoiser: DiffusersDenoiser, timesteps: int = 20, t_max: float | None = None) -> Tensor:
    """The model timesteps of the levels ``t_k = k t_max / T``, ``k = 1..T`` (``t_max = T / 1000`` by default)."""
    if isinstance(timesteps, bool) or not isinstance(timesteps, int) or timesteps < 1:
        raise ValueError(f"timesteps must be a positive int, got {timesteps!r}")
    t_max = timesteps / 1000 if t_max is None else float(t_max)
    if not 0 < t_max <= 1:
        raise ValueError(f"t_max must lie in (0, 1] (diffusion time), got {t_max}")
    levels = torch.arange(1, timesteps + 1, dtype=torch.float64) * (t_max / timesteps)
    return (levels * denoiser.num_train_timesteps).clamp(max=denoiser.timestep_range[1])


def check_images(images: Tensor, name: str = "images", channels: int | None = None) -> None:
    """Raise a ``ValueError`` unless ``images`` is a finite ``(N, C, H, W)`` batch in ``[-1, 1]``."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[0] == 0:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a non-empty (N, C, H, W) tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be a float tensor scaled to [-1, 1], got {images.dtype}")
    if channels is not None and images.shape[1] != channels:
        raise ValueError(f"{name} have {images.shape[1]} channels, the model expects {channels}")
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    low, high = images.min().item(), images.max().item()
    if low < -1 - 1e-4 or high > 1 + 1e-4:
        raise ValueError(f"{name} must be scaled to [-1, 1], got values in [{low:.3g}, {high:.3g}]")


ValueRange = tuple[float, float] | None


def signed_images(images: Tensor, value_range: ValueRange = None, name: str = "images") -> Tensor:
    """``images`` checked and mapped to the score model's ``[-1, 1]``.

    ``value_range`` is ``(-1, 1)`` or ``(0, 1)``, the convention the images are in. ``None`` (the default) means
    ``[-1, 1]`` but refuses a batch that looks like ``[0, 1]`` data (no negative value at all, nothing above 1):
    scored as ``[-1, 1]`` such images would all be flagged, so the caller must say which convention they use.
    """
    if value_range is not None and tuple(value_range) not in ((-1, 1), (0, 1)):
        raise ValueError(f"value_range must be (-1, 1) or (0, 1), got {value_range!r}")
    if value_range is not None and tuple(value_range) == (0, 1):
        check_images(images * 2 - 1 if isinstance(images, Tensor) and images.is_floating_point() else images, name)
        return images * 2 - 1
    check_images(images, name)
    if value_range is None and images.min().item() >= 0:
        raise ValueError(
            f"{name} have no negative values: they look like [0, 1] data, and the score model expects [-1, 1]; "
            "pass value_range=(0, 1) to convert them, or value_range=(-1, 1) if they are [-1, 1] images"
        )
    return images


@torch.no_grad()
def expected_perturbation_score(
    denoiser: DiffusersDenoiser,
    images: Tensor,
    *,
    timesteps: int = 20,
    t_max: float | None = None,
    generator: Generators = 0,
    batch_size: int = 256,
    antithetic: bool = False,
) -> Tensor:
    """EPS of each image, ``(N, C, H, W)``, on the model's VP scale (Zhang et al. 2023).

    Args:
        denoiser: a VP :class:`DiffusersDenoiser` (see :func:`as_denoiser`).
        images: ``(N, C, H, W)`` in ``[-1, 1]``; the device of the result follows them, and so does the dtype
            for float32 and float64. float16 and bfloat16 inputs are computed in, and returned as, float32 (at
            half precision ``1 / sigma`` of the smallest levels and the averaged scores overflow).
        timesteps: ``T``, the number of perturbation levels, one noise draw each.
        t_max: the largest level in diffusion time, ``T / 1000`` by default (the official levels).
        generator: an int seed (every image draws the *same* ``(T, C, H, W)`` noise, from a generator seeded
            with it, so an image's EPS depends on its pixels only, never on its position in the batch or on the
            other images), one generator per image, or one generator that draws image by image in order. Either
            way the result does not depend on ``batch_size``.
        batch_size: model evaluations per forward pass (the ``N T`` perturbed copies are stacked and chunked).
        antithetic: pair the noise draws of neighbouring levels, ``z`` at level ``2j - 1`` and ``-z`` at level
            ``2j`` (``T`` even): each level still sees ``N(0, I)`` noise, so the expectation is the same, but the
            part of the score that is linear in ``z`` (large at small levels, ``-z / sigma``) nearly cancels
            within each pair instead of averaging out slowly.
    """
    check_images(images, channels=getattr(getattr(denoiser.model, "config", None), "in_channels", None))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if antithetic and timesteps % 2:
        raise ValueError(f"antithetic noise pairs the levels: timesteps must be even, got {timesteps}")
    if images.dtype in (torch.float16, torch.bfloat16):
        images = images.float()  # the model may still run in half precision; the averaging does not
    sigma = denoiser.t_to_sigma(perturbation_timesteps(denoiser, timesteps, t_max)).to(images)  # VE levels (T,)
    alpha, _ = P.ve_to_vp(sigma)  # sqrt(abar_t)
    generators = _generators(generator, images.shape[0])
    per_chunk = max(1, batch_size // timesteps)
    chunks = []
    for start in range(0, images.shape[0], per_chunk):
        x = images[start : start + per_chunk]
        noise = torch.stack(
            [perturbation_noise(timesteps, x, g, antithetic) for g in generators[start : start + len(x)]]
        )
        # x_t / sqrt(abar_t) = x + sigma_ve z: the same perturbation on the denoiser's VE scale
        x_ve = (x[:, None] + P.broadcast(sigma, noise[0])[None] * noise).flatten(0, 1)
        score = _score(denoiser, x_ve, sigma.repeat(len(x)), batch_size)
        score = score / P.broadcast(alpha.repeat(len(x)), score)  # VE score -> VP score: d/dx_t = d/dx_ve / alpha
        chunks.append(score.unflatten(0, (len(x), timesteps)).mean(1))
    return torch.cat(chunks)


def _score(denoiser: DiffusersDenoiser, x: Tensor, sigma: Tensor, batch_size: int) -> Tensor:
    """The VE score ``(D(x, sigma) - x) / sigma^2``, ``batch_size`` samples per model call."""
    parts = [(x[i : i + batch_size], sigma[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return torch.cat([score_from_denoised(denoiser(xi, si), xi, si) for xi, si in parts])


def _generators(generator: Generators, n: int) -> list[torch.Generator]:
    if isinstance(generator, torch.Generator):
        return [generator] * n
    if isinstance(generator, int) and not isinstance(generator, bool):
        return [torch.Generator().manual_seed(generator) for _ in range(n)]  # the same noise for every image
    if isinstance(generator, Sequence) and all(isinstance(g, torch.Generator) for g in generator):
        if len(generator) != n:
            raise ValueError(f"got {len(generator)} generators for {n} images")
        return list(generator)
    raise ValueError(f"generator must be an int seed, a torch.Generator or one per image, got {generator!r}")


def perturbation_noise(timesteps: int, x: Tensor, generator: torch.Generator, antithetic: bool) -> Tensor:
    """One image's ``(T, C, H, W)`` noise: ``T`` draws, or ``T / 2`` draws interleaved with their negatives."""
    if not antithetic:
        return _randn((timesteps, *x.shape[1:]), generator, x)
    half = _randn((timesteps // 2, *x.shape[1:]), generator, x)
    return torch.stack([half, -half], 1).flatten(0, 1)


def _randn(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    """Noise drawn on the generator's device, then moved to ``like``'s device and dtype."""
    return torch.randn(shape, generator=generator, device=generator.device).to(like)
