"""Images and tensors for protection: one place for the EXIF orientation, the mode, the alpha channel and the
8-bit rounding of the budget, used by :func:`protect.protect` and by the app's file handling (``apps.files``).

A protected image perturbs the stored colours of RGB, RGBA (its alpha is put back unchanged), L and LA files;
other transparent modes (a palette's or a PNG colour key's transparency) become RGBA first. 16-bit and float
grayscale become 8 bits. CMYK is converted to sRGB through its embedded ICC profile (Pillow's naive formula when
it has none); an RGB or grayscale file's own profile is kept (its stored values are what is perturbed) and goes
with the protected image. The budget holds in 8-bit levels: every stored value moves by at most
``floor(255 eps)``.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps
from torch import Tensor

HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I", "F")  # grayscale modes with more than 8 bits
EXIF_ORIENTATION = 0x0112

__all__ = [
    "budget_levels",
    "composite_rgb",
    "has_alpha",
    "matching_profile",
    "oriented",
    "protected_image",
    "stored_rgb",
    "to_8bit",
    "to_srgb",
    "to_tensor",
]
PROFILE_SPACES = {"RGB": "RGB", "RGBA": "RGB", "L": "GRAY", "LA": "GRAY"}  # image mode -> ICC colour space


def oriented(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation says (the same object when there is nothing to turn)."""
    if image.getexif().get(EXIF_ORIENTATION, 1) == 1:
        return image
    return ImageOps.exif_transpose(image)


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer / float grayscale as 8-bit ``L`` (scaled, not clipped: 65535 -> 255; float by its
    maximum), or ``LA`` when a PNG colour key made one value transparent. A 32-bit integer image whose values
    leave 0..65535 (no photograph's: signed or scientific data) is a ``ValueError``, not a guess."""
    if image.mode not in HIGH_DEPTH:
        return image
    raw = np.asarray(image)
    pixels = raw.astype(np.float64)
    if image.mode == "I" and pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
        raise ValueError(
            f"a 32-bit integer image with values from {int(pixels.min())} to {int(pixels.max())}: only 0..65535 "
            "(16-bit) grayscale is read; export it as an 8- or 16-bit image"
        )
    pixels = pixels / 65535.0 if image.mode != "F" else pixels / max(1.0, float(np.nanmax(pixels)))
    gray = Image.fromarray(np.round(np.nan_to_num(pixels).clip(0, 1) * 255).astype(np.uint8), "L")
    key = image.info.get("transparency")
    if isinstance(key, int) and image.mode != "F":
        gray.putalpha(Image.fromarray(np.where(raw == key, 0, 255).astype(np.uint8), "L"))
    if "icc_profile" in image.info:
        gray.info["icc_profile"] = image.info["icc_profile"]
    return gray


def has_alpha(image: Image.Image) -> bool:
    """Whether ``image`` has transparency (an alpha channel, a transparent palette entry or a PNG colour key)."""
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        return True
    return image.mode in ("P", "1", "L", "RGB") and image.info.get("transparency") is not None


def to_srgb(image: Image.Image) -> Image.Image:
    """A CMYK ``image`` as sRGB through its embedded ICC profile (Pillow's naive formula when it has none or the
    profile is unreadable); any other image unchanged."""
    if image.mode != "CMYK":
        return image
    out, icc = None, image.info.get("icc_profile")
    if icc:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            out = ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass
    out = out if out is not None else image.convert("RGB")
    out.info.pop("icc_profile", None)  # sRGB now: the CMYK profile no longer describes it
    return out


def composite_rgb(image: Image.Image) -> Image.Image:
    """``image`` as RGB, transparency composited on white (CMYK through its ICC profile)."""
    image = to_srgb(image)
    if not has_alpha(image):
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    out = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    out.info.update({k: v for k, v in image.info.items() if k == "icc_profile"})
    return out


def stored_rgb(image: Image.Image) -> Image.Image:
    """The RGB colours :func:`protect.protect` perturbs: RGBA's and LA's stored colours (the alpha kept aside),
    other transparent modes composited on white, grayscale as R = G = B, CMYK through its ICC profile."""
    image = to_srgb(to_8bit(oriented(image)))
    return image.convert("RGB") if image.mode in ("RGBA", "LA") else composite_rgb(image)


def to_tensor(image: Image.Image) -> Tensor:
    """The (3, H, W) float tensor in [0, 1] of :func:`stored_rgb`, what :func:`protect.protect` perturbs."""
    return torch.from_numpy(np.asarray(stored_rgb(image)).copy()).permute(2, 0, 1).float() / 255


def matching_profile(image: Image.Image, profile: bytes | None = None) -> bytes | None:
    """``profile`` (default: ``image``'s own ICC profile) if its colour space fits ``image``'s mode (an RGB profile
    for RGB/RGBA, a gray one for L/LA), else None: what may be embedded when ``image`` is saved."""
    profile = image.info.get("icc_profile") if profile is None else profile
    space = PROFILE_SPACES.get(image.mode)
    if not profile or space is None:
        return None
    try:
        found = ImageCms.ImageCmsProfile(io.BytesIO(profile)).profile.xcolor_space.strip()
    except (ImageCms.PyCMSError, OSError, ValueError):
        return None
    return profile if found == space else None


def budget_levels(eps: float) -> float:
    """The budget in 8-bit levels, ``floor(255 eps)`` (with a tolerance for eps given as k / 255)."""
    return float(np.floor(eps * 255 + 1e-4))


def protected_image(x: Tensor, clean: Tensor, eps: float, original: Image.Image) -> Image.Image:
    """The 8-bit RGB(A) image of the protected ``x`` (3, H, W), rounded within the budget around the 8-bit
    ``clean`` image; an RGBA or LA ``original`` (or a deep gray one with a colour key) gets its alpha channel
    back unchanged (as RGBA)."""
    levels, budget = (clean.float() * 255).round(), budget_levels(eps)
    pixels = (x.float() * 255).round().clamp(0, 255)
    pixels = torch.minimum(torch.maximum(pixels, levels - budget), levels + budget)
    pixels = pixels.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    out = Image.fromarray(pixels, "RGB")
    source = to_8bit(oriented(original))  # a 16-bit gray file with a colour key reads as LA
    if source.mode in ("RGBA", "LA"):
        out.putalpha(source.getchannel("A"))
    profile = matching_profile(out, original.info.get("icc_profile")) if original.mode != "CMYK" else None
    if profile is not None:  # the stored values were perturbed: they still mean what the file's profile says
        out.info["icc_profile"] = profile
    return out
