"""Does a protection survive the cheap purifications? One measurement, shown by ``steerguard protect`` (its
``report.json`` and its output) and by the app's Protect tab.

For each image, :func:`report` measures the latent distortion ``d(x) = ||E(x) - E(c)|| / ||E(c)||`` in the
VAE's latent space (posterior mean, :func:`protect.losses.latent`), where ``c`` is the clean image:

* unpurified: ``d_0 = d(protected)`` against the clean image's latent, and ``n_0`` for same-budget random noise
  (``clean + eps * random signs``, ``eps`` the protected image's own L-infinity distance to the clean one);
* after each purification ``P`` (default :data:`SURVIVAL_PURIFICATIONS`: JPEG q75 and noisy upscaling, the
  strongest cheap purification of Hönig et al. 2024, here in its bicubic form), against the purified clean
  image: ``d_P = ||E(P(protected)) - E(P(c))|| / ||E(P(c))||`` and ``n_P`` for the purified random noise.

Reported per purification: ``kept = d_P / d_0`` (how much of the latent shift survives) and ``vs_noise = d_P /
n_P`` (how it compares to same-budget random noise after the same purification). **The rule**: the protection
*survives* ``P`` when ``d_P >= margin * n_P`` (default :data:`MARGIN` = 2: it still moves the latent at least twice
as far as random noise of its budget would after the same purification), else it *does not survive*; the image's
verdict is "survives" only when it survives every purification of the report.

``tile``: encode ``tile`` x ``tile`` crops (the last row and column overlap) and measure the norms over all of
them, so the cost is linear in the pixels (the VAE's self-attention over a whole latent grows with their square);
the cost is ``3 * (1 + len(purifications))`` encodings of the image.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import Tensor

from .losses import latent
from .purifiers import tile_origins
from .purify import PURIFICATIONS, check_images, sign_noise

__all__ = ["MARGIN", "SURVIVAL_PURIFICATIONS", "describe", "latent_distortion", "report"]

SURVIVAL_PURIFICATIONS = ("jpeg75", "noisy_upscale")
MARGIN = 2.0


def _crops(x: Tensor, tile: int | None) -> Tensor:
    """``tile`` x ``tile`` crops covering ``x`` (the last ones overlap), stacked crop-major; ``x`` when None."""
    if tile is None:
        return x
    height, width = x.shape[-2:]
    th, tw = min(tile, height), min(tile, width)
    ys, xs = tile_origins(height, tile, tile), tile_origins(width, tile, tile)
    return torch.cat([x[..., y : y + th, z : z + tw] for y in ys for z in xs])


@torch.no_grad()
def _latents(vae: AutoencoderKL, x: Tensor, tile: int | None, batch_size: int = 16) -> Tensor:
    """Per-image latents of ``x`` flattened over its crops: (N, D)."""
    crops = _crops(x, tile)
    z = torch.cat([latent(vae, chunk) for chunk in crops.split(batch_size)])
    count = len(crops) // len(x)
    return z.reshape(count, len(x), -1).transpose(0, 1).reshape(len(x), -1)


def _distortions(vae: AutoencoderKL, reference: Tensor, *images: Tensor, tile: int | None = None) -> list[Tensor]:
    """``||E(x) - E(reference)|| / ||E(reference)||`` per image (N,), float64, for each ``x`` of ``images``, over
    the :func:`_crops` (the reference encoded once)."""
    zr = _latents(vae, reference, tile).double()
    norm = zr.norm(dim=1).clamp_min(1e-12)
    return [(_latents(vae, x, tile).double() - zr).norm(dim=1) / norm for x in images]


def latent_distortion(vae: AutoencoderKL, reference: Tensor, images: Tensor, tile: int | None = None) -> Tensor:
    """``||E(images) - E(reference)|| / ||E(reference)||`` per image (N,), float64, over the :func:`_crops`."""
    return _distortions(vae, reference, images, tile=tile)[0]


def report(
    vae: AutoencoderKL,
    clean: Tensor,
    protected: Tensor,
    purifications: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
    *,
    margin: float = MARGIN,
    tile: int | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Per image: how much of the protection survives each purification (see the module's docstring for the
    measure and the rule). ``clean`` and ``protected``: images (N, 3, H, W) in [0, 1]; ``purifications`` maps names
    to fixed purifications (default the ``jpeg75`` and ``noisy_upscale`` entries of
    :data:`protect.purify.PURIFICATIONS`); the random noise of image ``i`` is seeded ``seed + i``.

    Each entry: ``eps_255`` (the budget used), ``latent_distortion`` (``d_0``), ``noise_latent_distortion``
    (``n_0``), ``purifications`` (per name: ``latent_distortion`` ``d_P``, ``noise_latent_distortion`` ``n_P``,
    ``kept``, ``vs_noise``, ``verdict``), ``verdict`` and ``rule``.
    """
    check_images(clean, "survival report")
    check_images(protected, "survival report")
    if clean.shape != protected.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and protected {tuple(protected.shape)} images differ in shape")
    if not margin > 0:
        raise ValueError(f"margin must be positive, got {margin}")
    if purifications is None:
        purifications = {name: PURIFICATIONS[name] for name in SURVIVAL_PURIFICATIONS}
    eps = (protected.double() - clean.double()).abs().flatten(1).amax(1)
    noise = torch.cat([sign_noise(c[None], float(e), seed + i) for i, (c, e) in enumerate(zip(clean, eps))])
    d0, n0 = _distortions(vae, clean, protected, noise, tile=tile)
    measured = {
        name: _distortions(vae, purify(clean), purify(protected), purify(noise), tile=tile)
        for name, purify in purifications.items()
    }
    rule = f"survives a purification when its latent distortion after it is >= {margin:g}x same-budget random noise's"
    entries = []
    for i in range(len(clean)):
        per = {}
        for name, (d, n) in measured.items():
            survives = bool(d[i] > 0 and d[i] >= margin * n[i])  # an unchanged image protects nothing
            per[name] = {
                "latent_distortion": d[i].item(),
                "noise_latent_distortion": n[i].item(),
                "kept": (d[i] / d0[i]).item() if d0[i] > 0 else 0.0,
                "vs_noise": (d[i] / n[i]).item() if n[i] > 0 else float("inf"),
                "verdict": "survives" if survives else "does not survive",
            }
        entries.append(
            {
                "eps_255": eps[i].item() * 255,
                "latent_distortion": d0[i].item(),
                "noise_latent_distortion": n0[i].item(),
                "purifications": per,
                "verdict": "survives" if all(p["verdict"] == "survives" for p in per.values()) else "does not survive",
                "rule": rule,
            }
        )
    return entries


def describe(entry: dict[str, Any]) -> str:
    """One line for a person: the verdict per purification, with the share of the latent shift kept and the
    comparison to random noise."""
    parts = [
        f"{name}: {p['verdict']} ({p['kept']:.0%} of the latent shift kept, {p['vs_noise']:.2g}x random noise)"
        for name, p in entry["purifications"].items()
    ]
    return f"{entry['verdict']} — " + "; ".join(parts)
