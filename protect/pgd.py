"""Batched L-infinity projected gradient descent (Madry et al. 2018), the optimiser behind per-image protections.

``pgd`` MINIMISES a per-image loss with signed gradient steps from a random start inside the eps-ball, and
projects onto the ball intersected with [0, 1] after every step. The arithmetic runs in float32 (or float64);
the result is returned in the input dtype and rounded so that it still lies inside the ball and [0, 1] when
compared in float32. A ``callback`` sees every step and may stop the attack there (return ``False`` or raise
:class:`Cancelled`): the way an application reports progress and honours a cancellation or a time limit.
``robust`` adds expectation over transformations (Athalye et al. 2018) with kornia's differentiable ops: the
perturbation must survive JPEG, resizing, blur and noise, the purifications that Hönig et al. (2024,
"Adversarial Perturbations Cannot Reliably Protect Artists From Generative AI") use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import kornia
import torch
import torch.nn.functional as F

Tensor = torch.Tensor
Transform = Callable[[Tensor, torch.Generator | None], Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None

__all__ = [
    "TRANSFORMS",
    "Cancelled",
    "Generators",
    "check_generators",
    "draw",
    "exact_dtype",
    "fit_to_ball",
    "pgd",
    "random_transform",
]


class Cancelled(RuntimeError):
    """A long computation was stopped between two steps (by its caller's callback: a cancellation, a time limit)."""


def _rng_device(generator: torch.Generator | None, like: Tensor) -> torch.device:
    """Draw on the generator's device (then move to ``like``'s), so a CPU generator drives a GPU attack."""
    return generator.device if generator is not None else like.device


def check_generators(generator: Generators, n: int) -> None:
    """Raises when a list of generators does not hold one per image of a batch of ``n``."""
    if isinstance(generator, list | tuple) and len(generator) != n:
        raise ValueError(f"got {len(generator)} generators for a batch of {n} images; pass one per image")


def draw(kind: str | int, shape: Sequence[int], generator: Generators, like: Tensor, dtype: torch.dtype | None = None):
    """``torch.rand`` / ``randn`` / ``randint(high)`` of ``shape`` (batch first) on ``like``'s device.

    ``kind`` is "rand", "randn" or an int ``high`` for ``randint``. With a list of generators, image ``i`` draws
    from ``generator[i]`` alone, so its numbers do not depend on the batch it is in (diffusers' convention).
    """
    if isinstance(generator, list | tuple):
        check_generators(generator, shape[0])
        return torch.cat([draw(kind, (1, *shape[1:]), g, like, dtype) for g in generator])
    device = _rng_device(generator, like)
    if isinstance(kind, int):
        out = torch.randint(kind, tuple(shape), generator=generator, device=device)
    else:
        fn = torch.rand if kind == "rand" else torch.randn
        out = fn(tuple(shape), generator=generator, device=device, dtype=dtype or like.dtype)
    return out.to(like.device)


def _uniform(low: float, high: float, n: int, generator: torch.Generator | None, like: Tensor) -> Tensor:
    return low + (high - low) * draw("rand", (n,), generator, like, torch.float32)


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
    noise = draw("randn", x.shape, generator, x)
    return (x + std * noise).clamp(0, 1)


TRANSFORMS: dict[str, Transform] = {"jpeg": _jpeg, "resize": _resize, "blur": _blur, "noise": _noise}
if not hasattr(kornia.enhance, "jpeg_codec_differentiable"):  # older kornia
    del TRANSFORMS["jpeg"]


def random_transform(transforms: Sequence[Transform], x: Tensor, generator: Generators) -> Tensor:
    """One transformation drawn from ``generator`` (per image with a list of generators) applied to ``x``."""
    if isinstance(generator, list | tuple):
        return torch.cat([random_transform(transforms, x[i : i + 1], g) for i, g in enumerate(generator)])
    pick = int(draw(len(transforms), (1,), generator, x).item())
    return transforms[pick](x, generator)


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
    generator: Generators = None,
    robust: Sequence[str] | None = None,
    callback: Callable[[int, Tensor, Tensor], bool | None] | None = None,
) -> Tensor:
    """Minimise ``loss_fn`` (images in [0, 1] -> per-image losses (N,)) over ``|x - images|_inf <= eps``.

    Args:
        images: (N, C, H, W) float tensor in [0, 1]; its dtype and device are kept.
        eps: L-infinity budget in [0, 1] pixel units.
        step: signed-gradient step size; default ``2.5 * eps / steps`` (Madry et al.).
        steps: number of gradient steps.
        random_start: start from a uniform draw inside the ball (drawn from ``generator``).
        generator: the only source of randomness (start, transformations, and whatever ``loss_fn`` closes over);
            a list of one generator per image makes each image's attack independent of the batch it is in.
        robust: names from :data:`TRANSFORMS`; each step applies one of them, drawn from ``generator``.
        callback: ``callback(i, x, loss)`` after computing the loss of iterate ``i`` (x before its update); it
            stops the attack by returning ``False`` (:class:`Cancelled` is raised) or by raising an exception.
    """
    if eps < 0 or steps < 0:
        raise ValueError(f"eps and steps must be non-negative, got eps={eps}, steps={steps}")
    unknown = set(robust or ()) - set(TRANSFORMS)
    if unknown:
        raise ValueError(f"unknown robustness transforms {sorted(unknown)}; choose from {sorted(TRANSFORMS)}")
    check_generators(generator, images.shape[0])
    step = 2.5 * eps / max(steps, 1) if step is None else step
    work = torch.promote_types(images.dtype, torch.float32)
    x0 = images.detach().to(work)
    lower, upper = (x0 - eps).clamp(0, 1), (x0 + eps).clamp(0, 1)
    x = x0.clone()
    if random_start:
        start = draw("rand", x0.shape, generator, x0, work)
        x = x0 + eps * (2 * start - 1)
        x = torch.maximum(torch.minimum(x, upper), lower)
    transforms = [TRANSFORMS[name] for name in robust or ()]
    for i in range(steps):
        x.requires_grad_(True)
        view = random_transform(transforms, x, generator) if transforms else x
        loss = loss_fn(view)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        if callback is not None and callback(i, x.detach(), loss.detach()) is False:
            raise Cancelled(f"stopped after {i} of {steps} PGD steps")
        x = torch.maximum(torch.minimum(x.detach() - step * grad.sign(), upper), lower)
    return fit_to_ball(x.detach(), images.detach(), eps, images.dtype)
