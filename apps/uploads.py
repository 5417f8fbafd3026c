"""Untrusted image uploads, and running the protection library on them, for the app and the CLI.

:func:`open_upload` is the only way an uploaded file becomes an image: it checks the file size, identifies
the format by content (PNG, JPEG, WebP, BMP or TIFF, never by extension), rejects a header claiming too many
pixels *before* anything is decoded, verifies and fully decodes the data (truncated files fail), applies
the EXIF orientation and converts the mode (RGB or RGBA to protect, RGB to detect). Every failure is a
``ValueError`` with a message fit to show to the person who uploaded the file.

:func:`protect_image`, :func:`load_detector` and :func:`detect_images` are the library calls shared by the
Gradio app (``/protect``, ``/detect``) and ``steerguard protect|detect``; :func:`save_new` writes a file
without ever replacing an existing one.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_BYTES = 20 * 1024 * 1024  # 20 MB per file
MAX_PIXELS = 4096 * 4096  # the cap of protect.protect
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF")
KEPT_MODES = ("RGB", "RGBA", "L", "LA")  # modes a protected file keeps; others become RGB / RGBA
PROTECT_METHODS = ("amortized", "photoguard", "mist")  # amortized: the demo protector, one forward pass
PROTECTOR_NAME = "protector"
DETECTOR_NAME = "eps_detector"

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError, MemoryError)

__all__ = [
    "FORMATS",
    "MAX_BYTES",
    "MAX_PIXELS",
    "PROTECT_METHODS",
    "Upload",
    "composite_rgb",
    "default_detector_dir",
    "detect_images",
    "load_detector",
    "mimicry_preview",
    "open_upload",
    "perturbation_image",
    "protect_image",
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


def safe_stem(name: str) -> str:
    """``name`` without directories or extension, restricted to ``[A-Za-z0-9._-]`` (``image`` if empty)."""
    stem = Path(str(name).replace("\\", "/")).name.rsplit(".", 1)[0] if name else ""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[:80]
    return stem or "image"


def _header(path: Path, label: str, max_pixels: int) -> tuple[str, str, tuple[int, int]]:
    """Format, mode and size from the header alone (no pixel data decoded); raises on non-images / huge headers."""
    try:
        with Image.open(path, formats=FORMATS) as image:  # lazy: reads the header only, decodes no pixels
            return str(image.format), image.mode, image.size
    except Image.DecompressionBombError:  # PIL's own guard, for headers above 2 x MAX_IMAGE_PIXELS
        side = int(max_pixels**0.5)
        raise ValueError(f"{label}: the image header claims more pixels than the {side}x{side} limit") from None
    except UnidentifiedImageError:
        raise ValueError(
            f"{label}: not a supported image file; upload a PNG, JPEG, WebP, BMP or TIFF image (checked by content)"
        ) from None
    except _DECODE_ERRORS as error:
        raise ValueError(f"{label}: unreadable image header ({error})") from None


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
        max_bytes, max_pixels: caps on the file size and on width x height, both checked before decoding.
    """
    if purpose not in ("protect", "detect"):
        raise ValueError(f"purpose must be 'protect' or 'detect', got {purpose!r}")
    path = Path(path)
    label = Path(name).name if name else path.name
    if not path.is_file():
        raise ValueError(f"{label}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{label}: the file is empty")
    if size > max_bytes:
        raise ValueError(f"{label}: the file has {size / 1e6:.1f} MB, more than the {max_bytes / 1e6:.0f} MB limit")
    fmt, mode, (width, height) = _header(path, label, max_pixels)
    if width < 1 or height < 1 or width * height > max_pixels:
        side = int(max_pixels**0.5)
        raise ValueError(f"{label}: the image header claims {width}x{height} pixels, more than the {side}x{side} limit")
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
    image = _convert(image, purpose)
    return Upload(image=image, name=safe_stem(label), format=fmt, mode=mode, size=image.size)


def _convert(image: Image.Image, purpose: str) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / float grayscale to 8 bits, not clipped
        pixels = np.asarray(image, dtype=np.float64)
        pixels = pixels / 65535.0 if image.mode != "F" else pixels / max(1.0, float(np.nanmax(pixels)))
        image = Image.fromarray(np.round(np.nan_to_num(pixels).clip(0, 1) * 255).astype(np.uint8), "L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info)
    if purpose == "detect":
        return composite_rgb(image)
    return image.convert("RGBA" if has_alpha else "RGB")


def restore_mode(image: Image.Image, mode: str) -> Image.Image:
    """The protected RGB/RGBA ``image`` back in the input's ``mode`` when that is L or LA (else unchanged).

    Grayscale inputs were protected as R = G = B, each channel within the budget, so their luma stays within it.
    """
    if mode in ("L", "LA") and image.mode in ("RGB", "RGBA"):
        return image.convert(mode)
    return image


def composite_rgb(image: Image.Image) -> Image.Image:
    """``image`` as RGB, transparency composited on white (what :func:`protect.protect` attacks)."""
    if image.mode not in ("RGBA", "LA", "PA") and not (image.mode == "P" and "transparency" in image.info):
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def perturbation_image(original: Image.Image, protected: Image.Image, eps: float) -> Image.Image:
    """The perturbation (``protected``'s colour channels minus ``original`` composited on white, as
    :func:`protect.protect` perturbs it), scaled so that ``+-eps`` spans 0..255 around mid-grey."""
    budget = max(1.0, np.floor(eps * 255 + 1e-4))
    delta = np.asarray(protected.convert("RGB"), dtype=np.float64) - np.asarray(composite_rgb(original), np.float64)
    return Image.fromarray(np.round(127.5 + delta * (127.5 / budget)).clip(0, 255).astype(np.uint8), "RGB")


def save_new(image: Image.Image, directory: Path, stem: str, suffix: str = ".png") -> Path:
    """Save ``image`` as ``directory/stem<suffix>``, or ``stem-1<suffix>``, ... : never replaces a file."""
    directory.mkdir(parents=True, exist_ok=True)
    for n in range(10_000):
        path = directory / (f"{stem}{suffix}" if n == 0 else f"{stem}-{n}{suffix}")
        try:
            with open(path, "xb") as file:  # exclusive creation: no race with another writer
                image.save(file, format="PNG")
            return path
        except FileExistsError:
            continue
    raise OSError(f"no free file name for {stem}{suffix} in {directory}")


def write_new(text: str, directory: Path, stem: str, suffix: str = ".json") -> Path:
    """Write ``text`` to a new file ``directory/stem<suffix>`` (a numbered suffix if taken)."""
    directory.mkdir(parents=True, exist_ok=True)
    for n in range(10_000):
        path = directory / (f"{stem}{suffix}" if n == 0 else f"{stem}-{n}{suffix}")
        try:
            with open(path, "x", encoding="utf-8") as file:
                file.write(text)
            return path
        except FileExistsError:
            continue
    raise OSError(f"no free file name for {stem}{suffix} in {directory}")


_lock = threading.Lock()


@functools.lru_cache(maxsize=2)
def _vae(device: str):
    from .demo import load_vae

    return load_vae(device)


@functools.lru_cache(maxsize=2)
def _protector(device: str):
    from protect import AmortizedProtector

    from .demo import model_path

    return AmortizedProtector.from_pretrained(str(model_path(PROTECTOR_NAME))).to(device).eval()


def protect_image(
    image: Image.Image,
    *,
    method: str = "photoguard",
    eps: float = 8 / 255,
    steps: int = 50,
    seed: int = 0,
    device: str | None = None,
) -> tuple[Image.Image, dict[str, float]]:
    """Protect one RGB/RGBA image against the demo VAE; returns the protected image and its metrics.

    "amortized" runs the demo amortized protector (one forward pass; ``steps`` and ``seed`` do not apply);
    "photoguard" and "mist" run ``steps`` PGD steps from a random start drawn from ``seed``.
    """
    import torch

    from protect import protect

    if method not in PROTECT_METHODS:
        raise ValueError(f"method must be one of {PROTECT_METHODS}, got {method!r}")
    if not 0 < eps <= 32 / 255:
        raise ValueError(f"eps must lie in (0, 32/255], got {eps * 255:g}/255")
    if not 1 <= steps <= 500:
        raise ValueError(f"steps must be between 1 and 500, got {steps}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with _lock:
        vae = _vae(device)
        model = _protector(device) if method == "amortized" else None
    if model is not None:
        (protected,), report = protect([image], method=method, vae=vae, eps=eps, protector=model)
    else:
        generator = torch.Generator(device).manual_seed(seed)
        (protected,), report = protect([image], method=method, vae=vae, eps=eps, steps=steps, generator=generator)
    metrics = {
        "psnr": report.psnr[0],
        "ssim": report.ssim[0],
        "linf_255": round(report.linf[0] * 255, 4),
        "seconds": report.seconds,
    }
    return protected, metrics


@functools.lru_cache(maxsize=2)
def _mimicry_models(device: str):
    from .demo import load_classifier, load_dit_pipeline

    return load_dit_pipeline(device), load_classifier(device)


PREVIEW_CROP = 64  # the mimicry preview edits a native-resolution centre crop (resizing would blur the protection)


def mimicry_preview(
    original: Image.Image,
    protected: Image.Image,
    *,
    strength: float = 0.3,
    seed: int = 0,
    device: str | None = None,
    scale: int = 4,
) -> tuple[Image.Image, Image.Image, dict[str, Any]] | None:
    """SDEdit (img2img) of the original and of the protected image with the demo DiT, on the same centre crop
    (at most 64x64, native resolution) and with the same noise; the class is the demo classifier's guess for
    the original. Returns both edits (enlarged ``scale`` times), and the class and the PSNR between the edits;
    ``None`` for images under 8 pixels a side."""
    import torch

    from protect.evaluate import sdedit
    from protect.protect import psnr

    width, height = original.size
    side = min(PREVIEW_CROP, width, height) // 4 * 4
    if side < 8:
        return None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    left, top = (width - side) // 2, (height - side) // 2
    crops = [
        torch.from_numpy(np.asarray(composite_rgb(im).crop((left, top, left + side, top + side)), np.float32).copy())
        for im in (original, protected)
    ]
    x = (torch.stack(crops).permute(0, 3, 1, 2) / 255).to(device)
    with _lock:
        pipe, classifier = _mimicry_models(device)
    with torch.no_grad():
        small = torch.nn.functional.interpolate(x[:1] * 2 - 1, size=(32, 32), mode="bilinear", antialias=True)
        label = classifier(small).argmax(1)
        generators = [torch.Generator().manual_seed(seed) for _ in range(2)]  # the same noise for both
        edits = sdedit(pipe, x, label.repeat(2), strength=strength, steps=20, generator=generators)
    pictures = [
        Image.fromarray((e.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)).resize(
            (side * scale, side * scale), Image.NEAREST
        )
        for e in edits
    ]
    names = sorted(pipe.labels, key=pipe.labels.get)
    info = {"class": names[int(label)], "psnr_between_edits": psnr(edits[:1], edits[1:]).item(), "crop": side}
    return pictures[0], pictures[1], info


def default_detector_dir() -> Path:
    from .demo import DEMO_DIR

    return DEMO_DIR / DETECTOR_NAME


@functools.lru_cache(maxsize=2)
def _detector(directory: str, device: str):
    from protect import EPSDetector
    from protect.testbed import load_score_model

    meta = json.loads((Path(directory) / "config.json").read_text())
    pipe = load_score_model(meta.get("diffusion_model", "demo/unet"), device)  # the model it was fitted on
    detector = EPSDetector.from_pretrained(directory, pipe.unet, pipe.scheduler)
    clean = meta.get("calibration_scores") or meta.get("clean_scores")
    detector.clean_scores = [float(s) for s in clean] if isinstance(clean, list) else None
    return detector


def load_detector(directory: str | Path | None = None, device: str | None = None):
    """The EPS-AD detector saved in ``directory`` (default ``demo_models/eps_detector``), around the score model
    its ``config.json`` names (``diffusion_model``; the demo detector runs on ``demo/unet_eps``).

    Raises ``FileNotFoundError`` ("no detector available ...") when there is none.
    """
    import torch

    directory = Path(directory) if directory is not None else default_detector_dir()
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"no detector available: {directory} holds no saved EPSDetector (fit one and save_pretrained it there)"
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with _lock:
        return _detector(str(directory.resolve()), device)


def detect_images(detector: Any, images: list[Image.Image]) -> list[dict[str, Any]]:
    """Score RGB ``images`` resized to the detector's resolution: ``score``, ``threshold``, ``verdict`` each."""
    import torch

    height, width = detector.reference.shape[-2:]
    batch = []
    for image in images:
        small = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC, reducing_gap=None)
        batch.append(torch.from_numpy(np.asarray(small, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1)
    device = detector.reference.device if detector.reference is not None else "cpu"
    with _lock:
        scores = detector.score(torch.stack(batch).to(device)).double().cpu().tolist()
    threshold = float(detector.threshold)
    return [
        {
            "score": float(s),
            "threshold": threshold,
            "verdict": "adversarial" if s > threshold else "clean",
            "resized_to": [width, height],
        }
        for s in scores
    ]
