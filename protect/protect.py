"""Per-image protection against mimicry: PhotoGuard, Mist and Diff-Protect (SDS) attacks run by batched PGD.

>>> protected, report = protect(images, method="photoguard", vae=vae, generator=torch.Generator().manual_seed(0))

``images`` is a float tensor (N, 3, H, W) in [0, 1] or a list of PIL images; the same kind comes back. PIL
inputs get their EXIF orientation applied; RGBA images are protected in their stored colours and come back as
RGBA with the alpha untouched (so every stored value stays within the budget); LA / transparent palette images
are composited on white; grayscale and 16-bit images become 8-bit RGB. These baselines
are what FastProtect (Ahn et al., CVPR 2025) amortises: ``method="amortized"`` runs a pre-trained
:class:`protect.amortized.AmortizedProtector` instead (one forward pass, no PGD; pass ``protector=``).

Default target (PhotoGuard and Mist): :func:`default_target`, a deterministic high-frequency texture (a 4-pixel
checkerboard crossed with diagonal colour stripes), in the spirit of Mist's repeated target pattern.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import kornia
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from PIL import Image, ImageOps

from .amortized import AmortizedProtector
from .losses import Denoiser, encoder_loss, latent, mist_loss, sds_loss
from .pgd import TRANSFORMS, Generators, exact_dtype, pgd

Tensor = torch.Tensor
METHODS = ("photoguard", "mist", "sds", "amortized")
MAX_PIXELS = 4096 * 4096
MAX_EPS = 64 / 255  # the largest L-infinity budget accepted (the field evaluates 4-16/255)

__all__ = ["MAX_EPS", "MAX_PIXELS", "METHODS", "ProtectionReport", "default_target", "protect"]


@dataclass(frozen=True, kw_only=True)
class ProtectionReport:
    """What one :func:`protect` call did: per-image quality and budget, the loss trace, and the wall time."""

    method: str
    psnr: list[float]
    ssim: list[float]
    linf: list[float]
    losses: list[list[float]]  # [step][image], the loss of each PGD iterate
    seconds: float


def default_target(height: int, width: int) -> Tensor:
    """Deterministic high-frequency target pattern (3, H, W) in [0, 1]: 4-px checker x diagonal colour stripes."""
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    checker = ((yy // 4 + xx // 4) % 2).float()
    stripes = torch.stack([((xx + yy + 3 * c) // 3 % 3 == 0).float() for c in range(3)])
    return (0.6 * checker + 0.4 * stripes).clamp(0, 1)


def _from_pil(image: Image.Image) -> Tensor:
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        gray = np.asarray(image, dtype=np.float64) / 65535.0
        image = Image.fromarray(np.round(gray.clip(0, 1) * 255).astype(np.uint8)).convert("RGB")
    elif image.mode == "RGBA":  # perturb the stored colours; the alpha is put back unchanged by _to_pil
        image = image.convert("RGB")
    elif image.mode in ("LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    else:
        image = image.convert("RGB")
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def _to_pil(x: Tensor, clean: Tensor, eps: float, original: Image.Image) -> Image.Image:
    """8-bit image of ``x``, rounded within the budget around the 8-bit ``clean`` image."""
    levels, budget = (clean.float() * 255).round(), np.floor(eps * 255 + 1e-4)
    pixels = (x.float() * 255).round().clamp(0, 255)
    pixels = torch.minimum(torch.maximum(pixels, levels - budget), levels + budget)
    pixels = pixels.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    out = Image.fromarray(pixels, "RGB")
    if original.mode == "RGBA":
        out.putalpha(ImageOps.exif_transpose(original).getchannel("A"))
    return out


def _validate(images: Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"expected a float tensor in [0, 1], got dtype {images.dtype}")
    if images.shape[0] == 0:
        raise ValueError("expected at least one image")
    height, width = images.shape[-2:]
    if min(height, width) < 2:
        raise ValueError(f"images must be at least 2x2 pixels, got {height}x{width}")
    if height * width > MAX_PIXELS:
        raise ValueError(f"images of {height}x{width} exceed the {MAX_PIXELS}-pixel cap (4096x4096)")
    if torch.isnan(images).any():
        raise ValueError("images contain NaN")
    if images.min() < 0 or images.max() > 1:
        raise ValueError(f"images must lie in [0, 1], got [{images.min().item():.3g}, {images.max().item():.3g}]")


def _target_latent(vae: AutoencoderKL, target: Tensor | Image.Image | str | None, like: Tensor) -> Tensor | None:
    """Latent of the target pattern resized to ``like``'s size; ``"zero"`` gives the zero latent (None)."""
    if isinstance(target, str):
        if target != "zero":
            raise ValueError(f"unknown target {target!r}; pass an image, 'zero' or None")
        return None
    if target is None:
        pattern = default_target(*like.shape[-2:])
    elif isinstance(target, Image.Image):
        pattern = _from_pil(target)
    else:
        pattern = target if target.dim() == 4 else target.unsqueeze(0)
        _validate(pattern)
    pattern = pattern.reshape(-1, *pattern.shape[-3:]).to(like.device, torch.float32)
    pattern = F.interpolate(pattern, size=like.shape[-2:], mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        return latent(vae, pattern.clamp(0, 1))


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Per-image PSNR (N,) in dB of images in [0, 1] (capped at 120 dB for identical images)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-12))


def _psnr_ssim(clean: Tensor, protected: Tensor) -> tuple[list[float], list[float]]:
    clean, protected = clean.float(), protected.float()
    window = min(11, min(clean.shape[-2:]) - (1 - min(clean.shape[-2:]) % 2))
    ssim = kornia.metrics.ssim(clean, protected, window_size=window).flatten(1).mean(1)
    return psnr(clean, protected).tolist(), ssim.tolist()


def protect(
    images: Tensor | list[Image.Image],
    method: str = "photoguard",
    *,
    vae: AutoencoderKL,
    denoiser: Denoiser | None = None,
    eps: float = 8 / 255,
    steps: int = 100,
    step: float | None = None,
    target: Tensor | Image.Image | str | None = None,
    weight: float = 1.0,
    generator: Generators = None,
    robust: bool | tuple[str, ...] = False,
    protector: AmortizedProtector | str | None = None,
    alphas_cumprod: Tensor | None = None,
    min_strength: float | None = None,
) -> tuple[Tensor | list[Image.Image], ProtectionReport]:
    """Protect ``images`` against mimicry by an L-infinity PGD attack on ``vae`` (and ``denoiser``).

    Args:
        method: "photoguard" (encoder attack toward ``target``), "mist" (textural + ``weight`` x semantic loss,
            needs ``denoiser``) or "sds" (Diff-Protect SDS+, needs ``denoiser``).
        denoiser: ``eps(z_t, t)`` on scaled latents; used by "mist" and "sds".
        eps, steps, step: PGD budget (in [0, 1] pixel units), iterations and step size (see :func:`protect.pgd.pgd`).
        target: target pattern for "photoguard"/"mist": an image (tensor in [0, 1] or PIL), "zero" for the zero
            latent, or None for :func:`default_target`.
        generator: the only randomness (PGD start, timesteps, noise, robustness transforms); a list of one
            generator per image makes each result independent of the batch (same seed, same protection).
        robust: True for every transform in :data:`protect.pgd.TRANSFORMS`, or a tuple of their names.
        alphas_cumprod: the denoiser's noise schedule for "mist" and "sds" (default: Stable Diffusion's).
        protector: for "amortized": a trained :class:`~protect.amortized.AmortizedProtector` or its folder
            (``steps``, ``step``, ``target``, ``generator`` and ``robust`` do not apply: it was trained robust).
        min_strength: for "amortized": the budget share on flat regions (1 = full ``eps`` everywhere; default:
            the protector's trained value).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if not (isinstance(eps, int | float) and 0 < eps <= MAX_EPS):
        raise ValueError(
            f"eps is an L-infinity budget in [0, 1] pixel units and must lie in (0, 64/255 = {MAX_EPS:.3f}], got "
            f"{eps!r} (for 8 levels of 255 pass eps=8/255)"
        )
    if method == "sds" and denoiser is None:
        raise ValueError("method 'sds' needs a denoiser eps(z_t, t)")
    if method == "mist" and denoiser is None:
        raise ValueError(
            "method 'mist' needs a denoiser eps(z_t, t) (a latent diffusion model on this VAE) for its semantic "
            "loss; without one it is PhotoGuard's encoder attack: use method='photoguard'"
        )
    if method == "sds" and target is not None:
        raise ValueError("method 'sds' has no target; pass target=None")
    if method != "mist" and weight != 1.0:
        raise ValueError(f"weight is Mist's semantic-loss weight; method {method!r} does not use it")
    if method == "photoguard" and denoiser is not None:
        raise ValueError("method 'photoguard' attacks the encoder only; pass denoiser=None")
    if (method == "amortized") != (protector is not None):
        raise ValueError("method 'amortized' needs protector= (a trained AmortizedProtector); other methods take none")
    if method == "amortized" and (denoiser is not None or target is not None or robust):
        raise ValueError("method 'amortized' takes no denoiser, target or robust option (its training fixed them)")
    if min_strength is not None and method != "amortized":
        raise ValueError("min_strength applies to method 'amortized' only")
    if isinstance(protector, str | Path):
        protector = AmortizedProtector.from_pretrained(str(protector))
    is_pil = isinstance(images, list | tuple)
    if is_pil:
        if not images or not all(isinstance(im, Image.Image) for im in images):
            raise ValueError("expected a non-empty list of PIL images or a tensor")
        tensors = [_from_pil(im) for im in images]
        if len({t.shape for t in tensors}) != 1:
            raise ValueError("PIL images must share one size to be protected as a batch; call protect per size")
        batch = torch.stack(tensors).to(next(vae.parameters()).device)
    elif isinstance(images, torch.Tensor):
        batch = images
    else:
        raise ValueError(f"expected a tensor or a list of PIL images, got {type(images).__name__}")
    _validate(batch)

    start = time.perf_counter()
    trace: list[list[float]] = []
    if method == "amortized":
        protector = protector.to(batch.device)
        protected, _ = protector.protect(batch, vae, eps=eps, min_strength=min_strength)
    elif method == "sds":
        loss_fn = partial(sds_loss, vae, denoiser, alphas_cumprod=alphas_cumprod, generator=generator)
    else:
        target_latent = _target_latent(vae, target, batch)
        if method == "photoguard":
            loss_fn = partial(encoder_loss, vae, target_latent=target_latent)
        else:
            loss_fn = partial(
                mist_loss,
                vae,
                denoiser,
                target_latent=target_latent,
                weight=weight,
                alphas_cumprod=alphas_cumprod,
                generator=generator,
            )
    if method != "amortized":
        transforms = tuple(TRANSFORMS) if robust is True else tuple(robust or ())
        protected = pgd(
            batch,
            loss_fn,
            eps=eps,
            step=step,
            steps=steps,
            generator=generator,
            robust=transforms,
            callback=lambda i, x, loss: trace.append(loss.float().tolist()),
        )
    seconds = time.perf_counter() - start
    if is_pil:  # the budget holds in 8-bit levels: |q - k| <= floor(255 eps)
        outputs = [_to_pil(x, c, eps, im) for x, c, im in zip(protected, batch, images)]
        final = torch.stack([_from_pil(im.convert("RGB")) for im in outputs]).to(batch.device)
        linf = ((final * 255).round() - (batch * 255).round()).abs().flatten(1).amax(1).double() / 255
    else:
        outputs = final = protected
        exact = exact_dtype(batch.device)
        linf = (final.to(exact) - batch.to(exact)).abs().flatten(1).amax(1)
    psnr_values, ssim_values = _psnr_ssim(batch, final)
    report = ProtectionReport(
        method=method, psnr=psnr_values, ssim=ssim_values, linf=linf.tolist(), losses=trace, seconds=seconds
    )
    return outputs, report
