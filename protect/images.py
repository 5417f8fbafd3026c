"""Images and tensors for protection: one place for the EXIF orientation, the mode, the alpha channel and the
8-bit rounding of the budget, used by :func:`protect.protect` and by the app's file handling (``apps.files``).

A protected image perturbs the stored colours of RGB, RGBA (its alpha is put back unchanged), L and LA files;
other transparent modes are composited on white first. 16-bit and float grayscale become 8 bits. The budget
holds in 8-bit levels: every stored value moves by at most ``floor(255 eps)``.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I", "F")  # grayscale modes with more than 8 bits
EXIF_ORIENTATION = 0x0112

__all__ = [
    "budget_levels",
    "composite_rgb",
    "has_alpha",
    "oriented",
    "protected_image",
    "to_8bit",
    "to_tensor",
]


def oriented(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation says (the same object when there is nothing to turn)."""
    if image.getexif().get(EXIF_ORIENTATION, 1) == 1:
        return image
    return ImageOps.exif_transpose(image)


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit / float grayscale as 8-bit ``L`` (scaled, not clipped: 65535 -> 255; float by its maximum)."""
    if image.mode not in HIGH_DEPTH:
        return image
    pixels = np.asarray(image, dtype=np.float64)
    pixels = pixels / 65535.0 if image.mode != "F" else pixels / max(1.0, float(np.nanmax(pixels)))
    return Image.fromarray(np.round(np.nan_to_num(pixels).clip(0, 1) * 255).astype(np.uint8), "L")


def has_alpha(image: Image.Image) -> bool:
    """Whether ``image`` has transparency (an alpha channel, or a transparent palette entry)."""
    return image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info)


def composite_rgb(image: Image.Image) -> Image.Image:
    """``image`` as RGB, transparency composited on white."""
    if image.mode not in ("RGBA", "LA", "PA") and not (image.mode == "P" and "transparency" in image.info):
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def to_tensor(image: Image.Image) -> Tensor:
    """The (3, H, W) float tensor in [0, 1] that :func:`protect.protect` perturbs: RGBA's stored colours (the
    alpha is kept aside), other transparent modes composited on white, grayscale as R = G = B."""
    image = to_8bit(oriented(image))
    image = image.convert("RGB") if image.mode == "RGBA" else composite_rgb(image)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def budget_levels(eps: float) -> float:
    """The budget in 8-bit levels, ``floor(255 eps)`` (with a tolerance for eps given as k / 255)."""
    return float(np.floor(eps * 255 + 1e-4))


def protected_image(x: Tensor, clean: Tensor, eps: float, original: Image.Image) -> Image.Image:
    """The 8-bit RGB(A) image of the protected ``x`` (3, H, W), rounded within the budget around the 8-bit
    ``clean`` image; an RGBA ``original`` gets its alpha channel back unchanged."""
    levels, budget = (clean.float() * 255).round(), budget_levels(eps)
    pixels = (x.float() * 255).round().clamp(0, 255)
    pixels = torch.minimum(torch.maximum(pixels, levels - budget), levels + budget)
    pixels = pixels.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    out = Image.fromarray(pixels, "RGB")
    if original.mode == "RGBA":
        out.putalpha(oriented(original).getchannel("A"))
    return out
