"""A small adversarial-detection testbed for EPS-AD at the demo UNet's 16x16 resolution.

The victim is the demo shapes classifier (trained on 32x32 images in ``[-1, 1]``) applied to 16x16 images
upsampled to 32x32 (bilinear, differentiable), wrapped as a module that takes images in ``[0, 1]``
(torchattacks' convention), so attacks and the EPS both live at 16x16. Besides the attacks
(:func:`attack`, through torchattacks) it has the benign changes a real service sees, for measuring false
positives (:data:`BENIGN`), two naive detection baselines (:func:`eps_norm`, :func:`high_frequency_energy`)
and the metrics (:mod:`protect.metrics`: :func:`~protect.metrics.auroc`, :func:`~protect.metrics.tpr_at_fpr`).

Conventions: every function here takes and returns images in ``[0, 1]`` (use :func:`to_unit` /
:func:`to_signed` to convert from / to the ``[-1, 1]`` of the diffusion model and the EPS detector).
Detection scores are oriented "higher = more adversarial".
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .purify import BENIGN as BENIGN_NAMES
from .purify import PURIFICATIONS

ATTACKS: tuple[str, ...] = ("fgsm", "pgd", "pgd_l2", "bim", "mim", "cw", "autoattack")
L2_ATTACKS = frozenset({"pgd_l2", "cw"})
# L2 budgets follow the CIFAR-10 convention (L-inf 8/255 <-> L2 0.5 on 3x32x32), rescaled by sqrt(dim).
_CIFAR_L2_PER_LINF = 0.5 / (8 / 255) / math.sqrt(3 * 32 * 32)


class Victim(nn.Module):
    """``classifier`` (images in ``[-1, 1]`` at ``size`` px) on images in ``[0, 1]`` of any size, resized
    bilinearly (differentiable) to ``size``; returns logits."""

    def __init__(self, classifier: nn.Module, size: int = 32):
        super().__init__()
        self.classifier = classifier
        self.size = size

    def forward(self, images01: Tensor) -> Tensor:
        x = images01 * 2 - 1
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.classifier(x)


def frozen_victim(classifier: nn.Module) -> Victim:
    """``classifier`` (32x32 inputs in [-1, 1]) as a 16x16 [0, 1] victim (eval mode, parameters frozen)."""
    victim = Victim(classifier).eval()
    victim.requires_grad_(False)
    return victim


def to_unit(images: Tensor) -> Tensor:
    """``[-1, 1]`` -> ``[0, 1]``."""
    return ((images + 1) / 2).clamp(0, 1)


def to_signed(images01: Tensor) -> Tensor:
    """``[0, 1]`` -> ``[-1, 1]``."""
    return (images01 * 2 - 1).clamp(-1, 1)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Seed the global RNG (which torchattacks draws its random starts from) for the block only: the caller's
    global RNG state (CPU, and ``device`` if it is CUDA) is saved and restored by ``torch.random.fork_rng``."""
    device = torch.device(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def l2_budget(eps_inf: float, shape: tuple[int, ...]) -> float:
    """The L2 budget matched to an L-inf budget for images of ``shape`` (C, H, W): CIFAR-10's 8/255 <-> 0.5
    ratio rescaled by ``sqrt(C H W)`` (4/255 -> 0.125 at 3x16x16)."""
    return eps_inf * _CIFAR_L2_PER_LINF * math.sqrt(math.prod(shape))


def budget_of(name: str, eps: float, shape: tuple[int, ...]) -> tuple[str, float]:
    """The norm (``"linf"`` or ``"l2"``) and radius that :func:`attack` ``name`` at L-inf ``eps`` keeps to."""
    return ("l2", l2_budget(eps, shape)) if name in L2_ATTACKS else ("linf", eps)


def _project_l2(delta: Tensor, radius: float) -> Tensor:
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    return delta * (radius / norms).clamp(max=1).view(-1, *([1] * (delta.ndim - 1)))


def attack(
    name: str,
    model: nn.Module,
    images01: Tensor,
    labels: Tensor,
    eps: float = 4 / 255,
    *,
    steps: int = 10,
    seed: int = 0,
    cw_steps: int = 50,
    cw_c: float = 1.0,
    batch_size: int = 256,
) -> Tensor:
    """Adversarial versions of ``images01`` (``[0, 1]``) against ``model``, untargeted on the true ``labels``.

    ``eps`` is the L-inf budget; the L2 attacks (``pgd_l2``, ``cw``) use :func:`l2_budget` of it. Iterative
    L-inf attacks take ``steps`` steps of ``2.5 eps / steps`` (PGD with a random start). CW (L2, ``c``,
    ``kappa = 0``, ``cw_steps`` Adam steps) has no budget of its own: its perturbation is projected onto the L2
    ball afterwards, so every attack here keeps its budget. ``autoattack`` is torchattacks' standard L-inf
    AutoAttack (slow on a CPU). Random starts are seeded with ``seed`` without touching the caller's RNG.
    """
    import torchattacks

    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose from {ATTACKS}")
    if images01.min() < 0 or images01.max() > 1:
        raise ValueError("attack() takes images in [0, 1]")
    norm, radius = budget_of(name, eps, tuple(images01.shape[1:]))
    alpha = 2.5 * eps / steps
    factories: dict[str, Callable[[], torchattacks.Attack]] = {
        "fgsm": lambda: torchattacks.FGSM(model, eps=eps),
        "pgd": lambda: torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True),
        "pgd_l2": lambda: torchattacks.PGDL2(
            model, eps=radius, alpha=2.5 * radius / steps, steps=steps, random_start=True
        ),
        "bim": lambda: torchattacks.BIM(model, eps=eps, alpha=alpha, steps=steps),
        "mim": lambda: torchattacks.MIFGSM(model, eps=eps, alpha=alpha, steps=steps, decay=1.0),
        "cw": lambda: torchattacks.CW(model, c=cw_c, kappa=0, steps=cw_steps, lr=0.01),
        "autoattack": lambda: torchattacks.AutoAttack(
            model, norm="Linf", eps=eps, version="standard", n_classes=_num_classes(model), seed=seed
        ),
    }
    runner = factories[name]()
    outputs = []
    with seeded(seed, images01.device):
        for x, y in zip(images01.split(batch_size), labels.split(batch_size)):
            outputs.append(runner(x, y).detach())
    adversarial = torch.cat(outputs)
    delta = adversarial - images01
    if norm == "l2":
        delta = _project_l2(delta, radius)
    else:
        delta = delta.clamp(-eps, eps)
    return (images01 + delta).clamp(0, 1)


def _num_classes(model: nn.Module) -> int:
    classifier = getattr(model, "classifier", model)
    config = getattr(classifier, "config", None)
    return int(getattr(config, "num_classes", 10))


# ----------------------------------------------------------------------------- benign changes


BENIGN: dict[str, Callable[[Tensor], Tensor]] = {name: PURIFICATIONS[name] for name in BENIGN_NAMES}


# ----------------------------------------------------------------------------- baselines and metrics


def eps_norm(eps: Tensor) -> Tensor:
    """Naive baseline: the L2 norm of each image's EPS, ``(N,)``."""
    return eps.flatten(1).norm(dim=1)


_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def high_frequency_energy(images: Tensor) -> Tensor:
    """Naive baseline: mean squared response of a 3x3 Laplacian (reflect padding), per image, ``(N,)``."""
    c = images.shape[1]
    kernel = _LAPLACIAN.to(images).expand(c, 1, 3, 3)
    response = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="reflect"), kernel, groups=c)
    return response.pow(2).flatten(1).mean(1)


@torch.no_grad()
def success_rate(model: nn.Module, clean01: Tensor, adversarial01: Tensor, labels: Tensor) -> float:
    """Attack success rate: fraction of the images ``model`` gets right that it gets wrong after the attack."""
    correct = model(clean01).argmax(1) == labels
    fooled = model(adversarial01).argmax(1) != labels
    return (fooled & correct).sum().item() / max(1, correct.sum().item())
