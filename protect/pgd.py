"""Batched L-infinity projected gradient descent (Madry et al. 2018), the optimiser behind per-image protections.

``pgd`` MINIMISES a per-image loss with signed gradient steps from a random start inside the eps-ball, and
projects onto the ball intersected with [0, 1] after every step. The arithmetic runs in float32 (or float64);
the result is returned in the input dtype and rounded so that it still lies inside the ball and [0, 1] when
compared in float32. ``robust`` adds expectation over transformations (Athalye et al. 2018) with kornia's
differentiable ops: the perturbation must survive JPEG, resizing, blur and noise, the purifications that
Hönig et al. (2024, "Adversarial Perturbations Cannot Reliably Protect Artists From Generative AI") use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import kornia
import torch
import torch.nn.functional as F

Tensor = torch.Tensor
Transform = Callable[[Tensor, torch.Generator | None], Tensor]

__all__ = ["TRANSFORMS", "exact_dtype", "fit_to_ball", "pgd"]


def _rng_device(generator: torch.Generator | None, like: Tensor) -> torch.device:
    """Draw on the generator's device (then move to ``like``'s), so a CPU generator drives a GPU attack."""
    return generator.device if generator is not None else like.device


def _uniform(low: float, high: float, n: int, generator: torch.Generator | None, like: Tensor) -> Tensor:
    rand = torch.rand(n, generator=generator, device=_rng_device(generator, like))
    return (low + (high - low) * rand).to(like.device)


def _jpeg(x: Tensor, generator: torch.Generator | None) -> Tensor:
    quality = _uniform(50.0, 95.0, x.shape[0], generator, x)
    return kornia.enhance.jpeg_codec_differentiable(x, quality)


def _resize(x: Tensor, generator: torch.Generator | None) -> Tensor:
    scale = _uniform(0.5, 0.9, 1, generator, x).item()
    size = x.shape[-2:]
    small = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False, antialias=True)
    return F.interpolate(small, size=size, mode="bilinear", align_corners=False)


def _blur(x: Tensor, generator: torch.Generator | None) -> Tensor:
    sigma = _uniform(0.5, 1.5, x.shape[0], generator, x)
    return kornia.filters.gaussian_blur2d(x, (5, 5), torch.stack([sigma, sigma], dim=1))


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    std = _uniform(0.0, 0.05, x.shape[0], generator, x).view(-1, 1, 1, 1)
    noise = torch.randn(x.shape, generator=generator, device=_rng_device(generator, x)).to(x)
    return (x + std * noise).clamp(0, 1)


TRANSFORMS: dict[str, Transform] = {"jpeg": _jpeg, "resize": _resize, "blur": _blur, "noise": _noise}
if not hasattr(kornia.enhance, "jpeg_codec_differentiable"):  # older kornia
    del TRANSFORMS["jpeg"]


def exact_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it: differences of float32 pixels are exact there (Apple MPS lacks it)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _round_into(bound: Tensor, dtype: torch.dtype, up: bool) -> Tensor:
    """``bound`` rounded to ``dtype`` toward the inside: up for a lower bound, down for an upper one."""
    out = bound.to(dtype)
    outside = out.to(bound.dtype) < bound if up else out.to(bound.dtype) > bound
    toward = torch.full_like(out, 1.0 if up else 0.0)
    return torch.where(outside, torch.nextafter(out, toward), out)  # round-to-nearest is off by <= 1 ulp


def fit_to_ball(x: Tensor, center: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """Cast ``x`` to ``dtype`` inside ``|x - center| <= eps`` and [0, 1], the bounds taken in :func:`exact_dtype`.

    ``center`` must be representable in ``dtype`` (it is the caller's input), so the rounded bounds contain it.
    """
    exact = exact_dtype(x.device)
    c = center.to(exact)
    lower = _round_into((c - eps).clamp(0, 1), dtype, up=True)
    upper = _round_into((c + eps).clamp(0, 1), dtype, up=False)
    return torch.minimum(torch.maximum(x.to(dtype), lower), upper)


def pgd(
    images: Tensor,
    loss_fn: Callable[[Tensor], Tensor],
    *,
    eps: float = 8 / 255,
    step: float | None = None,
    steps: int = 100,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    robust: Sequence[str] | None = None,
    callback: Callable[[int, Tensor, Tensor], None] | None = None,
) -> Tensor:
    """Minimise ``loss_fn`` (images in [0, 1] -> per-image losses (N,)) over ``|x - images|_inf <= eps``.

    Args:
        images: (N, C, H, W) float tensor in [0, 1]; its dtype and device are kept.
        eps: L-infinity budget in [0, 1] pixel units.
        step: signed-gradient step size; default ``2.5 * eps / steps`` (Madry et al.).
        steps: number of gradient steps.
        random_start: start from a uniform draw inside the ball (drawn from ``generator``).
        generator: the only source of randomness (start, transformations, and whatever ``loss_fn`` closes over).
        robust: names from :data:`TRANSFORMS`; each step applies one of them, drawn from ``generator``.
        callback: ``callback(i, x, loss)`` after computing the loss of iterate ``i`` (x before its update).
    """
    if eps < 0 or steps < 0:
        raise ValueError(f"eps and steps must be non-negative, got eps={eps}, steps={steps}")
    unknown = set(robust or ()) - set(TRANSFORMS)
    if unknown:
        raise ValueError(f"unknown robustness transforms {sorted(unknown)}; choose from {sorted(TRANSFORMS)}")
    step = 2.5 * eps / max(steps, 1) if step is None else step
    work = torch.promote_types(images.dtype, torch.float32)
    x0 = images.detach().to(work)
    lower, upper = (x0 - eps).clamp(0, 1), (x0 + eps).clamp(0, 1)
    x = x0.clone()
    if random_start:
        start = torch.rand(x0.shape, generator=generator, device=_rng_device(generator, x0), dtype=work)
        x = x0 + eps * (2 * start.to(x0.device) - 1)
        x = torch.maximum(torch.minimum(x, upper), lower)
    transforms = [TRANSFORMS[name] for name in robust or ()]
    for i in range(steps):
        x.requires_grad_(True)
        view = x
        if transforms:
            pick = torch.randint(len(transforms), (1,), generator=generator, device=_rng_device(generator, x)).item()
            view = transforms[pick](x, generator)
        loss = loss_fn(view)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        if callback is not None:
            callback(i, x.detach(), loss.detach())
        x = torch.maximum(torch.minimum(x.detach() - step * grad.sign(), upper), lower)
    return fit_to_ball(x.detach(), images.detach(), eps, images.dtype)
