"""Purifications: the benign or deliberate changes a protected image meets on its way (JPEG, resizing, noise,
blur), in one table for the mimicry evaluation (:mod:`protect.evaluate`, :data:`EVALUATION`) and the detector
testbed (:mod:`protect.testbed`, :data:`BENIGN`). The random, differentiable versions that PGD averages over
(expectation over transformations) are :data:`protect.pgd.TRANSFORMS`.

Every function takes and returns images ``(N, 3, H, W)`` in [0, 1], in the input's dtype and device.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from functools import partial

import kornia
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .pgd import draw

__all__ = [
    "BENIGN",
    "EVALUATION",
    "PURIFICATIONS",
    "blur",
    "gaussian_noise",
    "jpeg",
    "purify",
    "resize_roundtrip",
    "sign_noise",
]


def jpeg(images: Tensor, quality: int = 75) -> Tensor:
    """JPEG re-compression: a PIL round trip through 8 bits at ``quality``."""
    out = []
    for image in images:
        pixels = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
        decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")).copy()
        out.append(torch.from_numpy(decoded).permute(2, 0, 1).float() / 255)
    return torch.stack(out).to(images)


def resize_roundtrip(images: Tensor, factor: float = 0.5, mode: str = "bilinear") -> Tensor:
    """Downscale by ``factor`` (antialiased) and back up to the original size, both with ``mode``."""
    size = images.shape[-2:]
    small = F.interpolate(images.float(), scale_factor=factor, mode=mode, align_corners=False, antialias=True)
    return F.interpolate(small, size=size, mode=mode, align_corners=False).clamp(0, 1).to(images)


def gaussian_noise(images: Tensor, std: float = 2 / 255, seed: int = 0, per_image: bool = False) -> Tensor:
    """Additive Gaussian noise of standard deviation ``std``, clipped to [0, 1]; drawn from one generator seeded
    ``seed``, or with ``per_image`` from one generator per image (``seed + i``: independent of the batch)."""
    if per_image:
        gens = [torch.Generator().manual_seed(seed + i) for i in range(len(images))]
        noise = draw("randn", images.shape, gens, images)
    else:
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)).to(images)
    return (images + std * noise).clamp(0, 1)


def sign_noise(images: Tensor, eps: float = 4 / 255, seed: int = 0) -> Tensor:
    """Random ``+-eps`` per pixel (the L-inf budget of an attack, but no gradient), clipped to [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, images.shape, generator=g).to(images) * 2 - 1
    return (images + eps * signs).clamp(0, 1)


def blur(images: Tensor, sigma: float = 1.0) -> Tensor:
    """Gaussian blur, 5x5 kernel of standard deviation ``sigma``."""
    return kornia.filters.gaussian_blur2d(images.float(), (5, 5), (sigma, sigma)).clamp(0, 1).to(images)


PURIFICATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "none": lambda x: x,
    "jpeg75": partial(jpeg, quality=75),
    "resize0.5": partial(resize_roundtrip, factor=0.5, mode="bicubic"),
    "noise4": partial(gaussian_noise, std=4 / 255, per_image=True),
    "blur1": partial(blur, sigma=1.0),
    "resize_x0.5": partial(resize_roundtrip, factor=0.5, mode="bilinear"),
    "gauss_2/255": partial(gaussian_noise, std=2 / 255),
    "sign_4/255": partial(sign_noise, eps=4 / 255),
}
EVALUATION = ("none", "jpeg75", "resize0.5", "noise4", "blur1")  # what the mimicry evaluation reports
BENIGN = ("jpeg75", "resize_x0.5", "gauss_2/255", "sign_4/255")  # the detector's false-positive checks


def purify(images: Tensor, name: str) -> Tensor:
    """Apply purification ``name`` of :data:`PURIFICATIONS` to images in [0, 1]."""
    if name not in PURIFICATIONS:
        raise ValueError(f"unknown purification {name!r}; choose from {sorted(PURIFICATIONS)}")
    return PURIFICATIONS[name](images)
