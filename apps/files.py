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
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from protect.images import budget_levels, composite_rgb, has_alpha, matching_profile, stored_rgb, to_8bit, to_srgb

MAX_BYTES = 20 * 1024 * 1024  # 20 MB per file
MAX_PIXELS = 4096 * 4096  # the cap of protect.protect
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF")
KEPT_MODES = ("RGB", "RGBA", "L", "LA")  # modes a protected file keeps; others become RGB / RGBA
#: a JPEG's scans: every scan walks the whole image, so a small file of many repeated scans decodes for minutes;
#: real files have 1-20 (an embedded thumbnail or a camera's preview adds its own), the bound counts markers
MAX_JPEG_SCANS = 256
#: the fewest pixels a TIFF's strip or tile may average: Pillow builds one object per chunk when it opens the
#: file, so a small image cut into 1x1 tiles costs seconds and gigabytes; real files have at most one chunk per
#: row (strips) or per 16x16 tile (the smallest a TIFF tile may be), per colour plane
MIN_TIFF_CHUNK_PIXELS = 256

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
    """``name`` without directories or extension, restricted to letters (any script), digits and ``._-``
    (``image`` if empty)."""
    stem = Path(str(name).replace("\\", "/")).name.rsplit(".", 1)[0] if name else ""
    stem = re.sub(r"[^\w.-]+", "_", stem).strip("._")[:80]
    return stem or "image"


_TIFF_MAGIC = {b"II*\0": ("<", False), b"MM\0*": (">", False), b"II+\0": ("<", True), b"MM\0+": (">", True)}
_TIFF_VALUE = {3: "H", 4: "I", 16: "Q"}  # SHORT, LONG, LONG8: the first value, stored in the entry itself


def _tiff_chunks(path: Path) -> tuple[int, int, int, int] | None:
    """(width, height, colour planes, strips or tiles) of a TIFF's first directory, read without Pillow (which
    builds every chunk when it opens the file); None when ``path`` is no readable classic or BigTIFF file."""
    with open(path, "rb") as file:
        head = file.read(16)
        if head[:4] not in _TIFF_MAGIC:
            return None
        order, big = _TIFF_MAGIC[head[:4]]
        offset, number, entry = ("Q", "Q", 20) if big else ("I", "H", 12)  # a count has the size of an offset
        try:
            file.seek(struct.unpack_from(order + offset, head, 8 if big else 4)[0])
            (entries,) = struct.unpack(order + number, file.read(struct.calcsize(number)))
            data = file.read(min(entries, 4096) * entry)
        except (struct.error, OSError, OverflowError):
            return None
    counts, value = {}, {}  # per tag: how many values, and the first one
    for start in range(0, len(data) - entry + 1, entry):
        tag, kind = struct.unpack_from(order + "HH", data, start)
        (counts[tag],) = struct.unpack_from(order + offset, data, start + 4)
        at = start + 4 + struct.calcsize(offset)
        value[tag] = struct.unpack_from(order + _TIFF_VALUE[kind], data, at)[0] if kind in _TIFF_VALUE else 0
    planes = value.get(277, 1) if value.get(284, 1) == 2 else 1  # planar configuration 2: chunks per colour plane
    chunks = max(counts.get(273, 0), counts.get(324, 0))  # StripOffsets, TileOffsets
    return value.get(256, 0), value.get(257, 0), max(1, planes), chunks


def _check_structure(path: Path, label: str) -> None:
    """Refuse, before Pillow reads them, files whose cost is not in their pixel count: TIFFs cut into more
    strips or tiles than their size needs (:data:`MIN_TIFF_CHUNK_PIXELS`), JPEGs of more than
    :data:`MAX_JPEG_SCANS` scans."""
    tiff = _tiff_chunks(path)
    if tiff is not None:
        width, height, planes, chunks = tiff
        allowed = planes * (max(height, width * height // MIN_TIFF_CHUNK_PIXELS) + 64)
        if chunks > allowed:
            raise ValueError(
                f"{label}: a TIFF of {width}x{height} pixels stored in {chunks} strips or tiles (at most {allowed}); "
                "save it again, e.g. as PNG"
            )
        return
    with open(path, "rb") as file:
        if file.read(2) == b"\xff\xd8":  # JPEG: a scan starts at each SOS marker (never inside coded data)
            scans = (b"\xff" + file.read()).count(b"\xff\xda")
            if scans > MAX_JPEG_SCANS:
                raise ValueError(
                    f"{label}: a JPEG of {scans} scans (at most {MAX_JPEG_SCANS}), far more than any camera or "
                    "editor writes; save it again as a baseline JPEG or PNG"
                )


def _header(path: Path, label: str, max_pixels: int) -> tuple[str, str, tuple[int, int]]:
    """Format, mode and size from the header alone (no pixel data decoded); raises on non-images / huge headers.

    A JPEG with a camera's preview images (format MPO) is its first image, the photo itself."""
    _check_structure(path, label)
    try:
        with Image.open(path, formats=FORMATS) as image:  # lazy: reads the header only, decodes no pixels
            fmt = "JPEG" if image.format == "MPO" else str(image.format)
            header = fmt, image.mode, image.size
            # is_animated reads the first frame only (a TIFF's n_frames walks every page, quadratic in them)
            animated = image.format != "MPO" and getattr(image, "is_animated", False)
            frames = f"{image.n_frames} frames" if animated and fmt != "TIFF" else "several pages"
    except Image.DecompressionBombError:  # PIL's own guard, for headers above 2 x MAX_IMAGE_PIXELS
        side = int(max_pixels**0.5)
        raise ValueError(f"{label}: the image header claims more pixels than the {side}x{side} limit") from None
    except UnidentifiedImageError:
        raise ValueError(
            f"{label}: not a supported image file; upload a PNG, JPEG, WebP, BMP or TIFF image (checked by content)"
        ) from None
    except _DECODE_ERRORS as error:
        raise ValueError(f"{label}: unreadable image header ({error})") from None
    if animated:  # APNG, animated WebP, multi-page TIFF: one frame would be protected and the others lost
        raise ValueError(
            f"{label}: an animated or multi-page image ({frames}); protect or check each frame as an image of its own"
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
            bits = _grey_bits(image)
            image.load()  # a full decode: truncated data raise here (LOAD_TRUNCATED_IMAGES stays off)
            if bits and isinstance(image.info.get("transparency"), int):  # Pillow scales the values, not the key
                image.info["transparency"] = image.info["transparency"] * 255 // (2**bits - 1)
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


def _grey_bits(image: Image.Image) -> int | None:
    """2 or 4 for a PNG of 2- or 4-bit gray levels (read as 8-bit ``L``), else None: its colour key stays in the
    stored levels."""
    if image.format != "PNG" or image.mode != "L" or not image.tile:
        return None
    return {"L;2": 2, "L;4": 4}.get(str(image.tile[0].args))


def _convert(image: Image.Image, purpose: str) -> Image.Image:
    image = to_srgb(to_8bit(image))  # CMYK through its ICC profile
    if purpose == "detect":
        return composite_rgb(image)
    return image.convert("RGBA" if has_alpha(image) else "RGB")


def restore_mode(image: Image.Image, mode: str, icc_profile: bytes | None = None) -> Image.Image:
    """The protected RGB/RGBA ``image`` back in the input's ``mode`` when that is L or LA (else unchanged), with
    the input's ``icc_profile`` where it fits the mode (:func:`write_new` embeds it).

    Grayscale inputs were protected as R = G = B, each channel within the budget, so their luma stays within it;
    one with transparency (LA, or L with a colour key, protected as RGBA) comes back as LA.
    """
    if mode in ("L", "LA") and image.mode in ("RGB", "RGBA"):
        image = image.convert("LA" if image.mode == "RGBA" else "L")  # a colour-keyed L upload keeps its alpha
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
