"""Untrusted image files: the only way a file from outside becomes an image, and the only way one is written.

:func:`open_upload` checks the file size, identifies the format by content (PNG, JPEG, WebP, BMP or TIFF, never
by extension), rejects a header claiming too many pixels *before* anything is decoded, verifies and fully
decodes the data (truncated files fail), applies the EXIF orientation and converts the mode (RGB or RGBA to
protect, RGB to detect). Every failure is a ``ValueError`` with a message fit to show to the person who uploaded
the file. :func:`restore_mode` and :func:`perturbation_image` handle the modes and the 8-bit budget of a
protected file with :mod:`protect.images` (the conversions ``protect()`` itself uses); :func:`write_new` (and
:func:`save_new` for images) never replaces a file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from protect.images import budget_levels, composite_rgb, has_alpha, matching_profile, stored_rgb, to_8bit, to_srgb

MAX_BYTES = 20 * 1024 * 1024  # 20 MB per file
MAX_PIXELS = 4096 * 4096  # the cap of protect.protect
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF")
KEPT_MODES = ("RGB", "RGBA", "L", "LA")  # modes a protected file keeps; others become RGB / RGBA

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError, MemoryError)

__all__ = [
    "FORMATS",
    "KEPT_MODES",
    "MAX_BYTES",
    "MAX_PIXELS",
    "Upload",
    "open_upload",
    "peek",
    "perturbation_image",
    "restore_mode",
    "safe_stem",
    "save_new",
    "write_new",
]


@dataclass(frozen=True)
class Upload:
    """A decoded upload: ``image`` is oriented and converted (RGB/RGBA to protect, RGB to detect)."""

    image: Image.Image
    name: str  # the file's base name, made safe for use in an output file name
    format: str  # "PNG", "JPEG", ...
    mode: str  # the mode of the file as stored
    size: tuple[int, int]  # (width, height) after the EXIF orientation
    #: the file's ICC profile, kept for its protected copy (None without one, and for CMYK: converted to sRGB)
    icc_profile: bytes | None = None


def safe_stem(name: str) -> str:
    """``name`` without directories or extension, restricted to ``[A-Za-z0-9._-]`` (``image`` if empty)."""
    stem = Path(str(name).replace("\\", "/")).name.rsplit(".", 1)[0] if name else ""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[:80]
    return stem or "image"


def _header(path: Path, label: str, max_pixels: int) -> tuple[str, str, tuple[int, int]]:
    """Format, mode and size from the header alone (no pixel data decoded); raises on non-images / huge headers."""
    try:
        with Image.open(path, formats=FORMATS) as image:  # lazy: reads the header only, decodes no pixels
            header = str(image.format), image.mode, image.size
            frames = getattr(image, "n_frames", 1)
    except Image.DecompressionBombError:  # PIL's own guard, for headers above 2 x MAX_IMAGE_PIXELS
        side = int(max_pixels**0.5)
        raise ValueError(f"{label}: the image header claims more pixels than the {side}x{side} limit") from None
    except UnidentifiedImageError:
        raise ValueError(
            f"{label}: not a supported image file; upload a PNG, JPEG, WebP, BMP or TIFF image (checked by content)"
        ) from None
    except _DECODE_ERRORS as error:
        raise ValueError(f"{label}: unreadable image header ({error})") from None
    if frames > 1:  # APNG, animated WebP, multi-page TIFF: one frame would be protected and the others lost
        raise ValueError(
            f"{label}: an animated or multi-page image ({frames} frames); protect or check each frame as an image "
            "of its own"
        )
    return header


def peek(
    path: str | Path, *, name: str | None = None, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS
) -> tuple[str, str, tuple[int, int]]:
    """Format, mode and (width, height) of the image file at ``path`` from its size and header alone: no pixel
    is decoded, so a request's pixels can be counted (and refused) before any decoding.

    Raises ``ValueError`` (naming ``name``, default the file's name) for a missing, empty or too large file, a
    file that is no supported image, or a header claiming more than ``max_pixels``.
    """
    path = Path(path)
    label = Path(name).name if name else path.name
    if path.is_dir():
        raise ValueError(f"{label}: is a folder, not an image file")
    if not path.is_file():
        raise ValueError(f"{label}: no such file" if not path.exists() else f"{label}: not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{label}: the file is empty")
    if size > max_bytes:
        raise ValueError(f"{label}: the file has {size / 1e6:.1f} MB, more than the {max_bytes / 1e6:.0f} MB limit")
    fmt, mode, (width, height) = _header(path, label, max_pixels)
    if width < 1 or height < 1 or width * height > max_pixels:
        side = int(max_pixels**0.5)
        raise ValueError(f"{label}: the image header claims {width}x{height} pixels, more than the {side}x{side} limit")
    return fmt, mode, (width, height)


def open_upload(
    path: str | Path,
    *,
    name: str | None = None,
    purpose: str = "protect",
    max_bytes: int = MAX_BYTES,
    max_pixels: int = MAX_PIXELS,
) -> Upload:
    """Safely decode the image file at ``path`` (a temp file from the upload handler, or a CLI argument).

    Args:
        name: the name to report and to derive output names from (default: the file's name).
        purpose: "protect" (RGB, or RGBA when the image has transparency) or "detect" (RGB).
        max_bytes, max_pixels: caps on the file size and on width x height, both checked before decoding
            (:func:`peek`).
    """
    if purpose not in ("protect", "detect"):
        raise ValueError(f"purpose must be 'protect' or 'detect', got {purpose!r}")
    path = Path(path)
    label = Path(name).name if name else path.name
    fmt, mode, (width, height) = peek(path, name=name, max_bytes=max_bytes, max_pixels=max_pixels)
    try:
        with Image.open(path, formats=FORMATS) as image:
            image.verify()  # chunk CRCs and structure (PNG); must be a fresh object afterwards
        with Image.open(path, formats=FORMATS) as image:
            if image.size != (width, height):
                raise ValueError("the header changed between two reads")
            image.load()  # a full decode: truncated data raise here (LOAD_TRUNCATED_IMAGES stays off)
            image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError:
        raise ValueError(f"{label}: the image claims too many pixels") from None
    except _DECODE_ERRORS as error:
        raise ValueError(f"{label}: corrupt or truncated {fmt} image ({error})") from None
    profile = None if mode == "CMYK" else image.info.get("icc_profile")
    try:
        image = _convert(image, purpose)
    except ValueError as error:  # a mode we do not read (to_8bit says which)
        raise ValueError(f"{label}: {error}") from None
    return Upload(image=image, name=safe_stem(label), format=fmt, mode=mode, size=image.size, icc_profile=profile)


def _convert(image: Image.Image, purpose: str) -> Image.Image:
    image = to_srgb(to_8bit(image))  # CMYK through its ICC profile
    if purpose == "detect":
        return composite_rgb(image)
    return image.convert("RGBA" if has_alpha(image) else "RGB")


def restore_mode(image: Image.Image, mode: str, icc_profile: bytes | None = None) -> Image.Image:
    """The protected RGB/RGBA ``image`` back in the input's ``mode`` when that is L or LA (else unchanged), with
    the input's ``icc_profile`` where it fits the mode (:func:`write_new` embeds it).

    Grayscale inputs were protected as R = G = B, each channel within the budget, so their luma stays within it.
    """
    if mode in ("L", "LA") and image.mode in ("RGB", "RGBA"):
        image = image.convert(mode)
    profile = matching_profile(image, icc_profile) if icc_profile else None
    if profile is not None:
        image.info["icc_profile"] = profile
    return image


def perturbation_image(original: Image.Image, protected: Image.Image, eps: float) -> Image.Image:
    """The perturbation (``protected``'s colours minus ``original``'s, both as :func:`protect.protect` perturbs
    them: an RGBA image's stored colours, never composited), scaled so that ``+-eps`` spans 0..255 around
    mid-grey."""
    budget = max(1.0, budget_levels(eps))
    delta = np.asarray(stored_rgb(protected), dtype=np.float64) - np.asarray(stored_rgb(original), np.float64)
    return Image.fromarray(np.round(127.5 + delta * (127.5 / budget)).clip(0, 255).astype(np.uint8), "RGB")


def write_new(content: str | bytes | Image.Image, directory: Path, stem: str, suffix: str = ".json") -> Path:
    """Write ``content`` (text as UTF-8, bytes, or an image as PNG) to a new file ``directory/stem<suffix>``, or
    ``stem-1<suffix>``, ... : never replaces a file."""
    directory.mkdir(parents=True, exist_ok=True)
    for n in range(10_000):
        path = directory / (f"{stem}{suffix}" if n == 0 else f"{stem}-{n}{suffix}")
        try:
            with open(path, "xb") as file:  # exclusive creation: no race with another writer
                if isinstance(content, Image.Image):
                    # an ICC profile goes along when it fits the mode (None stops Pillow writing info's anyway)
                    content.save(file, format="PNG", icc_profile=matching_profile(content))
                else:
                    file.write(content.encode("utf-8") if isinstance(content, str) else content)
            return path
        except FileExistsError:
            continue
    raise OSError(f"no free file name for {stem}{suffix} in {directory}")


def save_new(image: Image.Image, directory: Path, stem: str, suffix: str = ".png") -> Path:
    """Save ``image`` as PNG in a new file ``directory/stem<suffix>`` (see :func:`write_new`)."""
    return write_new(image, directory, stem, suffix)
