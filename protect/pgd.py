"""Batched L-infinity projected gradient descent (Madry et al. 2018), the optimiser behind per-image protections.

``pgd`` MINIMISES a per-image loss with signed gradient steps from a random start inside the eps-ball, and
projects onto the ball intersected with [0, 1] after every step. The arithmetic runs in float32 (or float64);
the result is returned in the input dtype and rounded so that it still lies inside the ball and [0, 1] when
compared in float32. A ``callback`` sees every step and may stop the attack there (return ``False`` or raise
:class:`Cancelled`): the way an application reports progress and honours a cancellation or a time limit.
``robust`` adds expectation over transformations (Athalye et al. 2018): each step sees the iterate through one
random, differentiable purification of :data:`protect.purify.PURIFICATIONS` (the :data:`protect.purify.EOT`
names: JPEG, resizing, blur and noise, the purifications that Hönig et al. (2024, "Adversarial Perturbations
Cannot Reliably Protect Artists From Generative AI") use).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .purify import EOT, PURIFICATIONS, Transform
from .rng import Generators, check_generators, draw

Tensor = torch.Tensor

__all__ = [
    "MAX_EPS",
    "Cancelled",
    "check_budget",
    "exact_dtype",
    "fit_to_ball",
    "pgd",
    "random_transform",
]


MAX_EPS = 64 / 255  # the largest L-infinity budget accepted (the field evaluates 4-16/255)


def check_budget(eps: float, *, allow_zero: bool = True) -> None:
    """Raise ``ValueError`` unless ``eps`` is an L-infinity budget in [0, 1] pixel units, at most :data:`MAX_EPS`:
    a budget given in levels of 255 (``eps=8``) would otherwise silently replace the image."""
    number = isinstance(eps, int | float) and not isinstance(eps, bool)
    if not (number and (eps >= 0 if allow_zero else eps > 0) and eps <= MAX_EPS):
        raise ValueError(
            f"eps is an L-infinity budget in [0, 1] pixel units and must lie in {'[' if allow_zero else '('}0, "
            f"64/255 = {MAX_EPS:.3f}], got {eps!r} (for 8 levels of 255 pass eps=8/255)"
        )


class Cancelled(RuntimeError):
    """A long computation was stopped between two steps (by its caller's callback: a cancellation, a time limit)."""


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
    start: Tensor | None = None,
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
        robust: names from :data:`protect.purify.EOT`; each step applies one of them, drawn from ``generator``.
        callback: ``callback(i, x, loss)`` after computing the loss of iterate ``i`` (x before its update); it
            stops the attack by returning ``False`` (:class:`Cancelled` is raised) or by raising an exception.
        start: the first iterate (projected onto the ball around ``images``), to go on with an earlier attack
            (ASPL's rounds); no random start is drawn then.
    """
    check_budget(eps)
    if steps < 0:
        raise ValueError(f"steps must be non-negative, got {steps}")
    if step is not None and not (isinstance(step, int | float) and 0 < step <= 1):
        raise ValueError(f"step must be a step size in (0, 1] pixel units (None: 2.5 eps / steps), got {step!r}")
    unknown = set(robust or ()) - set(EOT)
    if unknown:
        raise ValueError(f"unknown robustness transforms {sorted(unknown)}; choose from {sorted(EOT)}")
    check_generators(generator, images.shape[0])
    step = 2.5 * eps / max(steps, 1) if step is None else step
    work = torch.promote_types(images.dtype, torch.float32)
    x0 = images.detach().to(work)
    lower, upper = (x0 - eps).clamp(0, 1), (x0 + eps).clamp(0, 1)
    x = x0.clone()
    if start is not None:
        if start.shape != images.shape:
            raise ValueError(f"start has shape {tuple(start.shape)}, the images {tuple(images.shape)}")
        x = torch.maximum(torch.minimum(start.detach().to(work), upper), lower)
    elif random_start:
        start = draw("rand", x0.shape, generator, x0, work)
        x = x0 + eps * (2 * start - 1)
        x = torch.maximum(torch.minimum(x, upper), lower)
    transforms = [PURIFICATIONS[name] for name in robust or ()]
    for i in range(steps):
        x.requires_grad_(True)
        view = random_transform(transforms, x, generator) if transforms else x
        loss = loss_fn(view)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        if callback is not None and callback(i, x.detach(), loss.detach()) is False:
            raise Cancelled(f"stopped after {i} of {steps} PGD steps")
        x = torch.maximum(torch.minimum(x.detach() - step * grad.sign(), upper), lower)
    return fit_to_ball(x.detach(), images.detach(), eps, images.dtype)
