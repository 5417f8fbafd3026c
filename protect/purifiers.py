"""Model-based purifications: the attacks that broke every published protection (Hönig et al. 2024, "Adversarial
Perturbations Cannot Reliably Protect Artists From Generative AI"), built from models the caller passes.

* :func:`noisy_upscale` — Gaussian noise, then a 2x upscale and back to the native size: a learned upscaler
  where one is given (Hönig et al. use a diffusion upscaler), bicubic otherwise (then it is noise plus a mild
  resampling blur, not a learned denoiser: say so when reporting it);
* :func:`diffpure` — DiffPure (Nie et al. 2022) with an unconditional pixel diffusion model: diffuse the image to
  ``t* = t_star`` of the schedule, denoise back with a few deterministic DDIM steps (Song et al. 2021), at the
  image's native resolution; a UNet with attention runs on overlapping tiles of its ``sample_size`` blended back
  (MultiDiffusion-style weights), so the cost is linear in the pixels;
* :func:`impress` — IMPRESS (Cao et al. 2023) as Hönig et al. use it: optimise ``x'`` from the image to minimise
  ``mean (D(E(x')) - x')^2 + weight * mean (x' - x)^2`` with Adam, for a fixed number of steps. The proximity term
  is the L2 distance: LPIPS / DISTS need network weights that no installed package ships (pass ``distance=`` to
  use one where it can be loaded).

:func:`model_purifications` wraps them, with the caller's models, as :class:`protect.purify.Purification` entries
beside the fixed ones of :data:`protect.purify.PURIFICATIONS` (``noisy_upscale``, ``diffpure``, ``impress``).
Every function takes images ``(N, 3, H, W)`` in [0, 1] and returns the same shape, dtype and device; the models
run on their own device and dtype. Randomness comes from seeds (image ``i`` draws from ``seed + i``: the result
does not depend on the batch). Cost is bounded: at most :data:`MAX_PIXELS` pixels, :data:`MAX_STEPS` steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from .purify import MAX_PIXELS, NOISY_UPSCALE_STD, Purification, check_images, noisy_upscale
from .rng import draw

__all__ = [
    "ADAM_STEP_BOUND",
    "MAX_PIXELS",
    "MAX_STEPS",
    "check_images",
    "diffpure",
    "diffpure_evaluations",
    "diffpure_tile",
    "impress",
    "impress_round_trips",
    "model_purifications",
    "noisy_upscale",
    "tile_origins",
    "vae_roundtrip",
]

MAX_STEPS = {"diffpure": 100, "impress": 500}
# Adam's largest step per coordinate, in units of its learning rate, for its default betas (0.9, 0.999):
# (1 - beta1) / sqrt(1 - beta2) (Kingma & Ba 2015, section 2.1); so impress moves a pixel at most steps * lr * this
ADAM_STEP_BOUND = 0.1 / math.sqrt(0.001)


def _check_steps(what: str, steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS[what]:
        raise ValueError(f"{what}: steps must be an integer in [1, {MAX_STEPS[what]}], got {steps!r}")


# ----------------------------------------------------------------------------- DiffPure


def tile_origins(size: int, tile: int, stride: int) -> list[int]:
    """Starts of ``tile``-long windows ``stride`` apart covering ``[0, size)``, the last one ending at ``size``."""
    if size <= tile:
        return [0]
    return [*range(0, size - tile, stride), size - tile]


def diffpure_tile(unet: torch.nn.Module) -> int | None:
    """The tile DiffPure runs ``unet`` on by default: its ``sample_size`` when it has attention (whose cost grows
    with the square of the pixels), None (the whole image at once) for a fully convolutional one."""
    from diffusers.models.attention_processor import Attention

    if any(isinstance(m, Attention) for m in unet.modules()):
        size = unet.config.sample_size
        return size if isinstance(size, int) else size[0]
    return None


def diffpure_evaluations(height: int, width: int, *, steps: int, tile: int | None, overlap: int | None = None) -> int:
    """UNet evaluations (of one tile, or of the whole image when ``tile`` is None) of :func:`diffpure` per image:
    ``steps`` x the tiles, at most ``steps x ceil(H / stride) x ceil(W / stride)`` (linear in the pixels)."""
    if tile is None:
        return steps
    stride = tile - (tile // 4 if overlap is None else overlap)
    return steps * len(tile_origins(height, tile, stride)) * len(tile_origins(width, tile, stride))


def _blend_weights(tile: int, overlap: int, like: Tensor) -> Tensor:
    """A (tile, tile) weight, rising linearly over ``overlap`` pixels from each edge, positive everywhere."""
    ramp = torch.arange(tile, device=like.device, dtype=torch.float32)
    one = torch.minimum(ramp + 1, tile - ramp).clamp(max=max(overlap, 1))
    return one[:, None] * one[None, :]


def _multiple(x: Tensor, multiple: int, minimum: int = 0) -> tuple[Tensor, int, int]:
    """``x`` replicate-padded on the bottom and right to at least ``minimum`` and a multiple of ``multiple``."""
    height, width = x.shape[-2:]
    pad_h = max(minimum - height, 0) + (-max(height, minimum)) % multiple
    pad_w = max(minimum - width, 0) + (-max(width, minimum)) % multiple
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    return x, height, width


def _model_output(unet: torch.nn.Module, x: Tensor, t: int, tile: int | None, overlap: int, batch_size: int) -> Tensor:
    """``unet(x, t)`` for images ``x`` (float32, model device) of any size: whole (padded to the UNet's multiple),
    or over ``tile`` x ``tile`` windows ``tile - overlap`` apart, blended with :func:`_blend_weights`."""
    param = next(unet.parameters())
    multiple = 2 ** (len(unet.config.block_out_channels) - 1)

    def run(batch: Tensor) -> Tensor:
        outs = []
        for chunk in batch.split(batch_size):
            step = torch.full((len(chunk),), t, device=param.device, dtype=torch.long)
            outs.append(unet(chunk.to(param.dtype), step).sample.float())
        return torch.cat(outs)

    if tile is None:
        padded, height, width = _multiple(x, multiple)
        return run(padded)[..., :height, :width]
    padded, height, width = _multiple(x, 1, minimum=tile)
    ys = tile_origins(padded.shape[-2], tile, tile - overlap)
    xs = tile_origins(padded.shape[-1], tile, tile - overlap)
    windows = [(y, z) for y in ys for z in xs]
    crops = torch.cat([padded[..., y : y + tile, z : z + tile] for y, z in windows])  # window-major
    outs = run(crops).view(len(windows), *padded.shape[:2], tile, tile)
    weight = _blend_weights(tile, overlap, x)
    total = torch.zeros_like(padded)
    norm = torch.zeros(padded.shape[-2:], device=x.device)
    for (y, z), out in zip(windows, outs):
        total[..., y : y + tile, z : z + tile] += out * weight
        norm[y : y + tile, z : z + tile] += weight
    return (total / norm)[..., :height, :width]


@torch.no_grad()
def diffpure(
    images: Tensor,
    unet: torch.nn.Module,
    scheduler,
    *,
    t_star: float = 0.1,
    steps: int = 10,
    seed: int = 0,
    tile: int | str | None = "auto",
    overlap: int | None = None,
    batch_size: int = 16,
) -> Tensor:
    """DiffPure (Nie et al. 2022, "Diffusion Models for Adversarial Purification") with an unconditional pixel
    diffusion model (``unet(x, t).sample`` on images in [-1, 1]; epsilon, v or sample prediction, as
    ``scheduler.config.prediction_type`` says; the schedule is ``scheduler.alphas_cumprod``).

    Forward: ``x_t* = sqrt(a) x + sqrt(1 - a) noise`` at ``t* = round(t_star T) - 1`` (image ``i``'s noise from
    ``seed + i``). Reverse: ``steps`` DDIM steps (eta 0, Song et al. 2021, eq. 12) on timesteps evenly spaced from
    t* to 0, the predicted clean image clipped to [-1, 1]; the last step returns it. Defaults: ``t_star`` 0.1
    (Hönig et al. and DiffPure use 0.05-0.2), 10 steps.

    ``tile``: "auto" (:func:`diffpure_tile`: the UNet's ``sample_size`` when it has attention, else the whole
    image), an int, or None; windows ``tile - overlap`` apart (``overlap`` default ``tile // 4``) whose outputs
    are averaged with weights that ramp down at their edges. An image of exactly one tile gives the untiled
    result. Cost: :func:`diffpure_evaluations` UNet calls of one tile per image.
    """
    check_images(images, "diffpure")
    _check_steps("diffpure", steps)
    if not 0 < t_star <= 0.5:
        raise ValueError(
            f"diffpure: t_star must lie in (0, 0.5] of the schedule (DiffPure uses 0.05-0.2), got {t_star}"
        )
    config = unet.config
    if config.in_channels != 3 or config.out_channels != 3 or getattr(config, "num_class_embeds", None):
        raise ValueError("diffpure needs an unconditional pixel diffusion model with 3 input and output channels")
    prediction = scheduler.config.prediction_type
    if prediction not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"diffpure: unsupported prediction type {prediction!r}")
    tile = diffpure_tile(unet) if tile == "auto" else tile
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 8):
        raise ValueError(f"diffpure: tile must be 'auto', None or an integer of at least 8 pixels, got {tile!r}")
    overlap = (tile // 4 if overlap is None else overlap) if tile is not None else 0
    if tile is not None and not 0 <= overlap < tile:
        raise ValueError(f"diffpure: overlap must lie in [0, tile), got {overlap}")
    alphas = scheduler.alphas_cumprod.double()
    t_start = max(round(t_star * len(alphas)) - 1, 0)
    if steps > t_start + 1:
        raise ValueError(f"diffpure: {steps} steps exceed the {t_start + 1} timesteps up to t* = {t_start}")
    timesteps = torch.linspace(t_start, 0, steps).round().long().tolist()
    device = next(unet.parameters()).device
    x0 = images.to(device, torch.float32) * 2 - 1
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(images))]
    noise = draw("randn", x0.shape, gens, x0)
    a = alphas[t_start].item()
    x = math.sqrt(a) * x0 + math.sqrt(1 - a) * noise
    for k, t in enumerate(timesteps):
        a = alphas[t].item()
        a_prev = alphas[timesteps[k + 1]].item() if k + 1 < len(timesteps) else 1.0
        out = _model_output(unet, x, t, tile, overlap, batch_size)
        if prediction == "epsilon":
            eps = out
            pred = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        elif prediction == "v_prediction":
            pred = math.sqrt(a) * x - math.sqrt(1 - a) * out
            eps = math.sqrt(a) * out + math.sqrt(1 - a) * x
        else:
            pred = out
            eps = (x - math.sqrt(a) * out) / math.sqrt(1 - a)
        pred = pred.clamp(-1, 1)
        x = math.sqrt(a_prev) * pred + math.sqrt(1 - a_prev) * eps
    return ((x + 1) / 2).clamp(0, 1).to(images)


# ----------------------------------------------------------------------------- IMPRESS


def vae_roundtrip(vae, x: Tensor) -> Tensor:
    """``D(E(x))`` of images ``x`` in [0, 1] (the posterior mean; edges replicate-padded to the VAE's stride and
    cropped back), float32 in [-inf, inf] mapped back from [-1, 1]; differentiable."""
    stride = 2 ** (len(vae.config.block_out_channels) - 1)
    padded, height, width = _multiple(x, stride)
    param = next(vae.parameters())
    inputs = (2 * padded - 1).to(param.device, param.dtype)
    out = vae.decode(vae.encode(inputs).latent_dist.mean).sample.float()
    return ((out + 1) / 2)[..., :height, :width]


def _windows(x: Tensor, tile: int | None) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) of the ``tile`` x ``tile`` crops covering ``x`` (one crop when ``tile`` is None)."""
    height, width = x.shape[-2:]
    if tile is None:
        return [(0, 0, height, width)]
    th, tw = min(tile, height), min(tile, width)
    return [(y, z, th, tw) for y in tile_origins(height, tile, tile) for z in tile_origins(width, tile, tile)]


def impress_round_trips(height: int, width: int, *, steps: int, tile: int | None = 128) -> int:
    """VAE round trips (encode and decode, each with its backward pass) of :func:`impress` per image: ``steps`` x
    the crops, at most ``steps x ceil(H / tile) x ceil(W / tile)`` (linear in the pixels)."""
    if tile is None:
        return steps
    return steps * len(tile_origins(height, tile, tile)) * len(tile_origins(width, tile, tile))


def impress(
    images: Tensor,
    vae,
    *,
    steps: int = 50,
    lr: float = 0.005,
    weight: float = 1.0,
    tile: int | None = 128,
    distance: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Tensor:
    """IMPRESS (Cao et al. 2023, "IMPRESS: Evaluating the Resilience of Imperceptible Perturbations Against
    Unauthorized Data Usage in Diffusion-Based Generative AI"), as Hönig et al. 2024 use it against protections:
    from ``x' = x``, ``steps`` Adam steps (learning rate ``lr``) on

        ``mean (D(E(x')) - x')^2 + weight * distance(x', x)``, ``x'`` clipped to [0, 1] after each step,

    with ``vae``'s posterior mean (no sampling: deterministic). ``distance`` defaults to the per-image mean
    squared error (L2): LPIPS, IMPRESS's choice, needs network weights no installed package ships; pass a
    per-image callable ``(x', x) -> (N,)`` to use one. Defaults: 50 steps, lr 0.005 (in [0, 1] pixel units),
    weight 1. A pixel moves at most ``steps * lr *`` :data:`ADAM_STEP_BOUND` (Adam's step bound).

    ``tile``: the consistency term is the mean over ``tile`` x ``tile`` crops (the last row and column overlap),
    each round-tripped on its own and back-propagated one at a time, so the cost is linear in the pixels and the
    memory is that of one crop; an image no larger than ``tile`` is one crop (None: always the whole image).
    Cost: :func:`impress_round_trips` round trips of one crop per image.
    """
    check_images(images, "impress")
    _check_steps("impress", steps)
    if not 0 < lr <= 0.1 or weight < 0:
        raise ValueError(f"impress: need 0 < lr <= 0.1 and weight >= 0, got lr {lr}, weight {weight}")
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 8):
        raise ValueError(f"impress: tile must be None or an integer of at least 8 pixels, got {tile!r}")
    device = next(vae.parameters()).device
    x = images.detach().to(device, torch.float32)
    x_adv = x.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x_adv], lr=lr)
    windows = _windows(x, tile)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            near = distance(x_adv, x) if distance is not None else (x_adv - x).pow(2).flatten(1).mean(1)
            (weight * near.sum()).backward()
            for y, z, h, w in windows:  # one crop at a time: the memory of one round trip
                crop = x_adv[..., y : y + h, z : z + w]
                consistency = (vae_roundtrip(vae, crop) - crop).pow(2).flatten(1).mean(1)
                (consistency.sum() / len(windows)).backward()
            optimizer.step()
            with torch.no_grad():
                x_adv.clamp_(0, 1)
    return x_adv.detach().to(images)


# ----------------------------------------------------------------------------- the table


def model_purifications(
    *,
    vae=None,
    pixel_model: tuple[torch.nn.Module, object] | None = None,
    upscaler: Callable[[Tensor], Tensor] | None = None,
    seed: int = 0,
    noise_std: float = NOISY_UPSCALE_STD,
    t_star: float = 0.1,
    diffpure_steps: int = 10,
    impress_steps: int = 50,
) -> dict[str, Purification]:
    """The model-based purifications for the caller's models, as fixed (seeded) :class:`Purification` entries:
    ``noisy_upscale`` (always; learned when ``upscaler`` is given, bicubic otherwise), ``diffpure`` with
    ``pixel_model = (unet, scheduler)``, ``impress`` with ``vae``."""
    how = "learned" if upscaler is not None else "bicubic"
    table = {
        "noisy_upscale": Purification(
            partial(noisy_upscale, std=noise_std, seed=seed, upscaler=upscaler),
            f"noisy upscaling: Gaussian noise {noise_std:g}, 2x {how} upscale and back",
        )
    }
    if pixel_model is not None:
        unet, scheduler = pixel_model
        table["diffpure"] = Purification(
            partial(diffpure, unet=unet, scheduler=scheduler, t_star=t_star, steps=diffpure_steps, seed=seed),
            f"DiffPure: diffuse to t*={t_star:g}, {diffpure_steps} DDIM steps back (pixel diffusion model)",
        )
    if vae is not None:
        table["impress"] = Purification(
            partial(impress, vae=vae, steps=impress_steps),
            f"IMPRESS: {impress_steps} Adam steps toward VAE consistency, L2 proximity",
        )
    return table
