"""An amortized protector in the spirit of FastProtect (Ahn et al., CVPR 2025): protection in one forward pass.

Per-image PGD (PhotoGuard, Mist, SDS) optimises every image for tens to hundreds of encoder passes. This module
pre-trains the perturbation instead:

* a **mixture of perturbations**: ``num_experts`` learned perturbation fields (3, P, P), each trained to pull the
  latent of any image toward its own target pattern's latent (the PhotoGuard/Mist objective);
* a **spatial gate**, a small conv net that reads the image's latent (the VAE encoder on the image, shrunk to
  ``gate_size`` at most) and, at every latent position, its distance to each target's latent, and mixes the
  experts per region (softmax over experts): the target is chosen per image and region (**adaptive targeted
  protection**);
* a **perceptual strength map**: the L-inf budget is spent where the eye does not see it, full ``eps`` in textured
  regions and ``min_strength * eps`` in flat ones (local standard deviation of the luminance);
* **any resolution**: the fields are periodic, tiled over the image (``tile=True``) or resized to it, and the
  gate's map is upsampled to the image;
* trained with the **multi-VAE loss** (the relative latent distance to the target, summed over several VAEs'
  latent spaces) under expectation over JPEG / resize / blur / noise (``protect.train``).

At inference, protecting an image costs one encoder pass (on a thumbnail for large images), a tiny conv net and
element-wise ops on the image; the budget ``|x' - x|_inf <= eps`` and the range [0, 1] hold exactly
(:func:`protect.pgd.fit_to_ball`).
Save and load with diffusers' ``save_pretrained`` / ``from_pretrained`` (safetensors + ``config.json``).
"""

from __future__ import annotations

import math
import os
import warnings
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import kornia
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .losses import default_target, encoder_loss, latent, vae_stride
from .pgd import check_budget, fit_to_ball
from .rng import draw

Tensor = torch.Tensor

__all__ = [
    "AmortizedProtector",
    "PerturbationNet",
    "excess_change",
    "mimicry_shift",
    "multi_vae_target_loss",
    "one_step_alignment",
    "strength_map",
    "target_bank",
    "vae_signature",
]

SIGNATURE_VALUES = 16  # weights read from each of two encoder convolutions


def vae_signature(vae: AutoencoderKL) -> tuple[float, ...]:
    """A short fingerprint of a VAE's encoder: its first weights of ``conv_in`` and ``conv_out`` (float, 6 digits).

    Two differently trained VAEs (or a random one) differ here; the same VAE in float16 or on another device
    matches within the tolerance of :meth:`AmortizedProtector.trained_for`.
    """
    values = []
    for conv in (vae.encoder.conv_in, vae.encoder.conv_out):
        values += conv.weight.detach().flatten()[:SIGNATURE_VALUES].float().cpu().tolist()
    return tuple(float(f"{v:.6g}") for v in values)


def target_bank(count: int, size: int) -> Tensor:
    """``count`` deterministic high-contrast target patterns (count, 3, size, size) in [0, 1].

    Pattern 0 is :func:`protect.losses.default_target` (checker x colour stripes); the others are checkerboards
    and stripes at several periods, angles and colourings: targets whose latents are far from natural images'.
    """
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    patterns = [default_target(size, size)]
    for k in range(1, count):
        period = 2 + k % 4
        angle = math.pi * k / count
        phase = math.cos(angle) * xx + math.sin(angle) * yy
        stripes = ((phase / period).floor() % 2).float()
        checker = ((yy // period + xx // period) % 2).float()
        base = stripes if k % 2 else checker
        colour = torch.tensor([(k * 0.37) % 1, (k * 0.61) % 1, (k * 0.23) % 1]).view(3, 1, 1)
        patterns.append((0.15 + 0.7 * (base * colour + (1 - base) * (1 - colour))).clamp(0, 1))
    return torch.stack(patterns)


def strength_map(images: Tensor, min_strength: float, scale: float, window: int = 5) -> Tensor:
    """Per-pixel budget fraction (N, 1, H, W): ``min_strength`` on flat regions, 1 where the local luminance std
    (``window`` x ``window``) reaches ``scale`` (texture masks the perturbation)."""
    gray = kornia.color.rgb_to_grayscale(images.float())
    window = max(1, min(window, *images.shape[-2:]))
    mean = kornia.filters.box_blur(gray, (window, window), border_type="replicate")
    var = kornia.filters.box_blur(gray * gray, (window, window), border_type="replicate") - mean * mean
    texture = (var.clamp_min(0).sqrt() / scale).clamp(0, 1)
    return min_strength + (1 - min_strength) * texture


def _cover(field: Tensor, height: int, width: int, tile: bool) -> Tensor:
    """A (N, C, P, P) field over (H, W): periodic tiling (``tile``) or bilinear resizing."""
    if not tile:
        return F.interpolate(field, size=(height, width), mode="bilinear", align_corners=False)
    p = field.shape[-1]
    reps = (1, 1, -(-height // p), -(-width // p))
    return field.repeat(*reps)[..., :height, :width]


def multi_vae_target_loss(
    vaes: Sequence[AutoencoderKL],
    protected: Tensor,
    clean_latents: Sequence[Tensor],
    target_latents: Sequence[Tensor],
    weights: Tensor,
    distortion_weight: float = 1.0,
    protected_latents: Sequence[Tensor] | None = None,
) -> Tensor:
    """Per-image mixture loss, averaged over the VAEs (lower = stronger protection):

    ``(sum_{k,p} w_kp ||E_v(x')_p - z_vk,p||^2 - lambda sum_p ||E_v(x')_p - E_v(x)_p||^2) / sum_{k,p} w_kp
    ||E_v(x)_p - z_vk,p||^2`` over latent positions p: the share of the distance to the targets that remains,
    minus ``lambda`` (``distortion_weight``) times how far the latent moved (PhotoGuard's targeted attack plus
    an untargeted push), with the gate's weights ``w`` (N, K, h, w) resized to each VAE's latent grid.
    ``clean_latents[v]`` is (N, C, h_v, w_v) and ``target_latents[v]`` is (K, C, h_v, w_v). 1 means no change;
    VAEs with different latent scales and strides count alike. ``protected_latents``: ``latent(vae, protected)``
    per VAE when the caller has them already (computed here otherwise).
    """
    if protected_latents is None:
        protected_latents = [latent(vae, protected) for vae in vaes]
    total = 0
    for z, clean, targets in zip(protected_latents, clean_latents, target_latents):
        clean = clean.to(z)
        t = targets.to(z)[None]  # (1, K, C, h, w)
        w = F.interpolate(weights.float(), size=z.shape[-2:], mode="bilinear", align_corners=False)
        remaining = (w * (z[:, None] - t).pow(2).mean(2)).flatten(1).sum(1)
        initial = (w * (clean[:, None] - t).pow(2).mean(2)).flatten(1).sum(1)
        moved = (z - clean).pow(2).mean(1).flatten(1).sum(1)
        total = total + (remaining - distortion_weight * moved) / initial.clamp_min(1e-8)
    return total / len(vaes)


def one_step_alignment(
    vae: AutoencoderKL, images: Tensor, delta: Tensor, target_latent: Tensor, generator: torch.Generator, eps: float
) -> Tensor:
    """How closely a perturbation ``delta`` (N, 3, H, W) follows one PhotoGuard step, per image, in [-1, 1]
    (lower = closer; -1 is ``-eps * sign(g)`` itself): ``<delta / eps, g> / ||g||_1`` with ``g`` the gradient of
    PhotoGuard's loss ``mean (E(x + u) - z_target)^2`` at a uniform random start ``u`` in the eps-ball (drawn from
    the CPU ``generator``), ``z_target`` = ``target_latent`` (1 or N, C, h, w). The linearised target loss: training a
    protector on it distils one PGD step (which does as much damage as 100 on the photo models,
    ``benchmarks/RESULTS.md``) into a forward pass; ``g`` carries no gradient."""
    start = (2 * draw("rand", images.shape, generator, images) - 1) * eps  # PGD's random start
    with torch.enable_grad():
        x = (images.detach() + start).clamp(0, 1).requires_grad_(True)
        (grad,) = torch.autograd.grad(encoder_loss(vae, x, target_latent).sum(), x)
    grad = grad.to(delta)
    return (delta / eps * grad).flatten(1).sum(1) / grad.abs().flatten(1).sum(1).clamp_min(1e-20)


def excess_change(change: Tensor, perturbation: Tensor) -> Tensor:
    """``change`` minus its per-image least-squares projection on ``perturbation`` (both (N, C, H, W); ``change``
    cropped to the perturbation's size first): what is left of an edit's change once the perturbation, carried
    along unchanged or scaled, is taken out."""
    height, width = perturbation.shape[-2:]
    change = change[..., :height, :width]
    p = perturbation.to(change).flatten(1)
    c = change.flatten(1)
    scale = (c * p).sum(1, keepdim=True) / p.pow(2).sum(1, keepdim=True).clamp_min(1e-12)
    return (c - scale * p).view_as(change)


def mimicry_shift(
    denoiser,
    alphas_cumprod: Tensor,
    protected_latents: Tensor,
    clean_latents: Tensor,
    generator: torch.Generator,
    strengths: tuple[float, float] = (0.1, 0.5),
    decode: Callable[[Tensor], Tensor] | None = None,
    carried: Tensor | None = None,
) -> Tensor:
    """A one-step SDEdit surrogate of the mimicry damage, per image (higher = stronger protection).

    Both latents are noised to the same timestep ``t`` (drawn per image, uniform over ``strengths`` of the
    schedule) with the same noise; the latent diffusion model's clean-latent estimate
    ``x0(z) = (z_t - sqrt(1 - a_t) eps(z_t, t)) / sqrt(a_t)`` of the protected latent is compared with that of the
    clean one: ``mean ||x0(z') - x0(z)||^2 / mean ||z||^2``. An SDEdit edit starts from that estimate, so a
    perturbation that only the denoiser washes out scores nothing here. With ``decode`` (latents -> images, e.g.
    ``partial(protect.losses.decoded, vae)``) the two estimates are compared as images instead:
    ``mean ||D(x0(z')) - D(x0(z))||^2`` in pixel units (no normalisation), which is what the edit's PSNR to the
    clean edit measures: a latent change the decoder ignores scores nothing (measured on the photo models, this
    ranks protections as the 20-step SDEdit does, and the latent version does not; ``benchmarks/RESULTS.md``).
    A perturbation the round trip simply reproduces "moves" the decoded estimate by itself without harming the
    edit (a protector trained on the plain pixel term learns exactly that); ``carried`` (N, 3, H, W), the
    perturbation ``x' - x``, removes the part of the decoded change along it (per image, least squares), so only
    the **excess** change counts (:func:`protect.evaluate.carried_over` measures the same on full edits).
    ``denoiser(z_t, t)`` predicts the noise (e.g. :func:`protect.evaluate.unet_denoiser` of an unconditional
    latent ``UNet2DModel``); gradients flow through it to ``protected_latents``. ``generator`` is a CPU generator
    (draws move to the latents' device).
    """
    z, clean = protected_latents, clean_latents.to(protected_latents)
    alphas = alphas_cumprod.float().to(z.device)
    steps = len(alphas)
    low, high = strengths
    fraction = torch.rand(len(z), generator=generator) * (high - low) + low
    t = (fraction * (steps - 1)).round().long().to(z.device)
    noise = torch.randn(z.shape, generator=generator).to(z)
    a = alphas[t].to(z).view(-1, *([1] * (z.dim() - 1)))

    def estimate(latents: Tensor) -> Tensor:
        z_t = a.sqrt() * latents + (1 - a).sqrt() * noise
        out = denoiser(z_t, t)
        eps = getattr(out, "sample", out).float()
        return (z_t - (1 - a).sqrt() * eps) / a.sqrt()

    with torch.no_grad():
        reference = estimate(clean)
        if decode is not None:
            reference = decode(reference)
    moved = estimate(z)
    if decode is not None:
        change = decode(moved) - reference
        if carried is not None:
            change = excess_change(change, carried)
        return change.pow(2).flatten(1).mean(1)
    return (moved - reference).pow(2).flatten(1).mean(1) / clean.pow(2).flatten(1).mean(1).clamp_min(1e-8)


class PerturbationNet(nn.Module):
    """A small U-Net from the image (N, 3, H, W) in [0, 1] to a pre-``tanh`` perturbation (N, 3, H, W), any size.

    Three stride-2 levels (channels c, 2c, 4c, 4c; the coarsest at an SD VAE's latent stride, 8), additive skips,
    nearest upsampling; sides that are not a multiple of 8 are replicate-padded and the output cropped back. Its
    receptive field (49-63 px across) spans several latent cells, so the perturbation can follow the image's content
    at full resolution, which the periodic fields and the thumbnail's lift cannot. The output layer starts at
    zero: a new net leaves the rest of the protector's perturbation unchanged. Cost: about 15 k multiply-adds per
    pixel at c = 16, linear in the pixels.
    """

    def __init__(self, channels: int):
        super().__init__()
        c = channels
        self.conv_in = nn.Conv2d(3, c, 3, padding=1)
        self.down = nn.ModuleList(
            [nn.Conv2d(c, 2 * c, 3, 2, 1), nn.Conv2d(2 * c, 4 * c, 3, 2, 1), nn.Conv2d(4 * c, 4 * c, 3, 2, 1)]
        )
        self.mid = nn.Conv2d(4 * c, 4 * c, 3, padding=1)
        self.up = nn.ModuleList(
            [
                nn.Conv2d(4 * c, 4 * c, 3, padding=1),
                nn.Conv2d(4 * c, 2 * c, 3, padding=1),
                nn.Conv2d(2 * c, c, 3, padding=1),
            ]
        )
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    #: without gradients, images with a side above ``tile`` (px) run in tiles of ``tile`` with a ``halo`` of
    #: context on each side (multiples of 8; the net's receptive radius is 24-31 px, by alignment to its stride),
    #: so memory stays bounded whatever the size and the output equals the untiled one (to float rounding)
    tile: int = 1024
    halo: int = 40

    @classmethod
    def spans(cls, n: int) -> list[tuple[int, int, int, int]]:
        """The tiles along one padded side of ``n`` px: ``(start, size, lo, hi)``, the ``size`` px from ``start``
        that a tile writes and the window ``lo:hi`` it runs on (the tile and its halo, clipped to the image)."""
        return [
            (start, min(cls.tile, n - start), max(0, start - cls.halo), min(n, start + cls.tile + cls.halo))
            for start in range(0, n, cls.tile)
        ]

    @classmethod
    def processed_pixels(cls, height: int, width: int) -> int:
        """Pixels the network runs on for one ``height`` x ``width`` image without gradients: the padded image up
        to ``tile``, above it every tile with its halo (the cost model of the app's estimate)."""
        rows, cols = height + -height % 8, width + -width % 8
        if max(rows, cols) <= cls.tile:
            return rows * cols
        return sum(hi - lo for *_, lo, hi in cls.spans(rows)) * sum(hi - lo for *_, lo, hi in cls.spans(cols))

    def forward(self, images: Tensor) -> Tensor:
        height, width = images.shape[-2:]
        x = F.pad(images * 2 - 1, (0, -width % 8, 0, -height % 8), mode="replicate")
        rows, cols = x.shape[-2:]
        if torch.is_grad_enabled() or max(rows, cols) <= self.tile:
            return self._net(x)[..., :height, :width]
        out = x.new_empty(x.shape[0], 3, rows, cols)
        for top, h, t0, t1 in self.spans(rows):
            for left, w, l0, l1 in self.spans(cols):
                y = self._net(x[..., t0:t1, l0:l1])
                out[..., top : top + h, left : left + w] = y[..., top - t0 : top - t0 + h, left - l0 : left - l0 + w]
        return out[..., :height, :width]

    def _net(self, x: Tensor) -> Tensor:
        """The U-Net on a padded input whose sides are multiples of 8 (channels-last: ~1.8x faster on CPU)."""
        h = F.silu(self.conv_in(x.contiguous(memory_format=torch.channels_last)))
        skips = [h]
        for conv in self.down:
            h = F.silu(conv(h))
            skips.append(h)
        h = F.silu(self.mid(h))
        for conv, skip in zip(self.up, reversed(skips[:-1])):
            h = F.silu(conv(F.interpolate(h, size=skip.shape[-2:], mode="nearest"))) + skip
        return self.conv_out(h).contiguous()


class AmortizedProtector(ModelMixin, ConfigMixin):
    """A pre-trained, per-image mixture of perturbation fields (see the module docstring).

    >>> protector = AmortizedProtector.from_pretrained("demo_models/protector")
    >>> protected, info = protector.protect(images, vae, eps=8 / 255)   # images (N, 3, H, W) in [0, 1]
    """

    config_name = "config.json"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> AmortizedProtector:
        """``ModelMixin.from_pretrained`` reading safetensors only (a pickled ``.bin`` beside it is never read,
        a folder without safetensors weights is an ``OSError``); a local folder is read without the hub."""
        if kwargs.get("use_safetensors") is False:
            raise ValueError("AmortizedProtector weights are read from safetensors only (use_safetensors=False)")
        kwargs["use_safetensors"] = True
        if Path(pretrained_model_name_or_path).is_dir():
            kwargs.setdefault("local_files_only", True)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @register_to_config
    def __init__(
        self,
        num_experts: int = 8,
        patch_size: int = 32,
        latent_channels: int = 4,
        gate_size: int = 64,
        latent_stride: int = 8,
        residual: bool = True,
        hidden: int = 32,
        eps: float = 8 / 255,
        min_strength: float = 0.5,
        texture_scale: float = 0.08,
        texture_window: int = 5,
        tile: bool = True,
        temperature: float = 1.0,
        trained_on: tuple[str, ...] = (),
        trained_vae_signatures: tuple[tuple[float, ...], ...] = (),
        generator_channels: int = 0,
    ):
        super().__init__()
        if num_experts < 1 or patch_size < 1 or gate_size < 2 or hidden < 1:
            raise ValueError("num_experts, patch_size and hidden must be >= 1 and gate_size >= 2")
        if generator_channels < 0:
            raise ValueError(f"generator_channels must be >= 0, got {generator_channels}")
        if not 0 <= min_strength <= 1:
            raise ValueError(f"min_strength must lie in [0, 1], got {min_strength}")
        self.fields = nn.Parameter(0.5 * torch.randn(num_experts, 3, patch_size, patch_size))
        self.register_buffer("targets", target_bank(num_experts, patch_size))
        self.gate = nn.Sequential(
            nn.Conv2d(latent_channels + num_experts, hidden, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden, num_experts, 1),
        )
        # image-adaptive term: the latent's residual to its mixed target, lifted back to pixels (a learned,
        # amortised stand-in for the encoder's transposed Jacobian that one PGD step would apply)
        self.lift = (
            nn.Sequential(
                nn.Conv2d(latent_channels, hidden, 3, padding=1),
                nn.SiLU(),
                nn.Conv2d(hidden, 3 * latent_stride**2, 3, padding=1),
                nn.PixelShuffle(latent_stride),
            )
            if residual
            else None
        )
        # full-resolution image-adaptive term: a small U-Net on the image itself (0 channels: none)
        self.generator = PerturbationNet(generator_channels) if generator_channels else None

    # ------------------------------------------------------------------ pieces
    def trained_for(self, vae: AutoencoderKL) -> bool | None:
        """Whether ``vae`` is one of the VAEs this protector was trained against (by :func:`vae_signature`, within
        1 % relative tolerance, so float16 copies match); None when the protector records no signatures."""
        recorded = self.config.trained_vae_signatures
        if not recorded:
            return None
        mine = torch.tensor(vae_signature(vae), dtype=torch.float64)
        return any(
            len(sig) == len(mine) and torch.allclose(mine, torch.tensor(sig, dtype=torch.float64), rtol=1e-2, atol=1e-5)
            for sig in recorded
        )

    def thumbnail(self, images: Tensor, multiple: int = 1) -> Tensor:
        """The gate's view of the images: shrunk (antialiased) so that the longer side is at most ``gate_size``,
        each side a ``multiple`` (the VAE's stride: the latent grid then covers the image exactly, so the gate
        weights and the lift, resized to the image, lie where they were computed)."""
        h, w = images.shape[-2:]
        factor = min(1.0, self.config.gate_size / max(h, w))
        size = tuple(max(2, multiple, round(side * factor / multiple) * multiple) for side in (h, w))
        if size == (h, w):
            return images.float()
        return F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False, antialias=True)

    def target_latents(self, vae: AutoencoderKL, height: int, width: int) -> Tensor:
        """Latents (K, C, h, w) of the target patterns laid over an image of ``height`` x ``width`` (no gradient).

        Tiled patterns have periodic latents: one period is encoded once per VAE (from the middle of a 3 x 3
        tiling, away from the borders) and tiled over the latent grid, so new image sizes cost nothing.
        """
        stride = vae_stride(vae)
        p = self.config.patch_size
        grid = (-(-height // stride), -(-width // stride))
        if not self.config.tile or p % stride:  # no period in latent space: encode at this size
            return self._encoded_targets(vae, height, width)
        period = p // stride
        tile = self._encoded_targets(vae, 3 * p, 3 * p)[..., period : 2 * period, period : 2 * period]
        reps = (1, 1, -(-grid[0] // period), -(-grid[1] // period))
        return tile.repeat(*reps)[..., : grid[0], : grid[1]]

    def _encoded_targets(self, vae: AutoencoderKL, height: int, width: int) -> Tensor:
        """The targets' latents at one size, cached per VAE, size, device and dtype (the VAEs are frozen)."""
        param = next(vae.parameters())
        key = (height, width, param.device, param.dtype, self.targets.device)
        # per VAE object, weakly: an id() key could hand a new VAE, born at a freed one's address, its latents
        caches = self.__dict__.setdefault("_target_cache", weakref.WeakKeyDictionary())
        cache = caches.setdefault(vae, {})
        if key not in cache:
            with torch.no_grad():
                cache[key] = latent(vae, _cover(self.targets, height, width, self.config.tile))
        return cache[key]

    def analyse(self, vae: AutoencoderKL, images: Tensor) -> tuple[Tensor, Tensor]:
        """Spatial softmax gate weights (N, K, h, w) on the thumbnail's latent grid, and the latent's residual to
        its mixed target (N, C, h, w).

        The gate reads, at every latent position, the image's latent and its squared distance to each target's
        latent there: each region picks (mixes) the targets and experts that suit its content.
        """
        if vae.config.latent_channels != self.config.latent_channels:
            raise ValueError(
                f"this protector's gate reads {self.config.latent_channels}-channel latents; "
                f"the VAE has {vae.config.latent_channels}"
            )
        thumb = self.thumbnail(images, vae_stride(vae))
        with torch.no_grad():  # on the protector's device, wherever the VAE is
            z = latent(vae, thumb).to(self.fields.device)
        zt = self.target_latents(vae, *thumb.shape[-2:]).to(self.fields.device)
        distance = (z[:, None] - zt[None]).pow(2).mean(2)  # (N, K, h, w)
        features = torch.cat([z, distance.log1p()], dim=1).to(self.fields.dtype)
        weights = torch.softmax(self.gate(features) / self.config.temperature, dim=1)
        residual = z.to(weights) - torch.einsum("nkhw,kchw->nchw", weights, zt.to(weights))
        return weights, residual

    def mixture_weights(self, vae: AutoencoderKL, images: Tensor) -> Tensor:
        """The gate weights of :meth:`analyse`."""
        return self.analyse(vae, images)[0]

    def perturbation(
        self,
        images: Tensor,
        weights: Tensor,
        eps: float | None = None,
        residual: Tensor | None = None,
        min_strength: float | None = None,
    ) -> Tensor:
        """The perturbation (N, 3, H, W): ``eps * strength * tanh(sum_k w_k field_k + lift(residual) + g(x))``
        (``g``: the full-resolution :class:`PerturbationNet`, when the protector has one)."""
        eps = self.config.eps if eps is None else eps
        floor = self.config.min_strength if min_strength is None else min_strength
        h, w = images.shape[-2:]
        # a generator-only protector's fields are all zero (kept when they are being trained, for their gradient)
        if (torch.is_grad_enabled() and self.fields.requires_grad) or self.fields.any():
            # one expert at a time: full-resolution maps of (N, 1, H, W) and (1, 3, H, W), never (K, 3, H, W)
            weights = weights.to(self.fields.dtype)
            mix = images.new_zeros((images.shape[0], 3, h, w), dtype=self.fields.dtype)
            for k in range(self.fields.shape[0]):
                gate = F.interpolate(weights[:, k : k + 1], size=(h, w), mode="bilinear", align_corners=False)
                mix = mix.addcmul_(gate, _cover(self.fields[k : k + 1], h, w, self.config.tile))
        else:
            mix = images.new_zeros(images.shape, dtype=self.fields.dtype)
        if self.lift is not None and residual is not None:
            lifted = self.lift(residual.to(self.fields.dtype))
            mix = mix + F.interpolate(lifted, size=(h, w), mode="bilinear", align_corners=False)
        if self.generator is not None:
            mix = mix + self.generator(images.to(self.fields.dtype))
        field = mix.tanh()
        strength = strength_map(images, floor, self.config.texture_scale, self.config.texture_window)
        return eps * strength.to(field) * field

    def forward(
        self, images: Tensor, vae: AutoencoderKL, eps: float | None = None, min_strength: float | None = None
    ) -> tuple[Tensor, Tensor]:
        """Differentiable protection (for training): ``clamp(x + delta, 0, 1)`` and the gate weights."""
        weights, residual = self.analyse(vae, images)
        delta = self.perturbation(images.float(), weights, eps, residual, min_strength)
        return (images.float() + delta.to(images.device)).clamp(0, 1), weights

    @torch.no_grad()
    def protect(
        self, images: Tensor, vae: AutoencoderKL, eps: float | None = None, min_strength: float | None = None
    ) -> tuple[Tensor, dict]:
        """Protect ``images`` (N, 3, H, W) in [0, 1], any size; returns them in the input dtype and device, with
        the exact budget and range, and ``{"weights": (N, K, h, w), "target": (N,) dominant expert}``.

        ``min_strength`` overrides the budget share spent on flat regions (1: the full ``eps`` everywhere, the
        strongest and most visible setting; default: the trained value).
        """
        eps = self.config.eps if eps is None else eps
        check_budget(eps)
        if min_strength is not None and not 0 <= min_strength <= 1:
            raise ValueError(f"min_strength must lie in [0, 1], got {min_strength}")
        if self.trained_for(vae) is False:
            trained_on = ", ".join(self.config.trained_on) or "other VAEs"
            warnings.warn(
                f"this amortized protector was trained against {trained_on}, and the VAE given is none of them "
                "(its encoder weights differ): its protection is untested against this VAE and may be weak; "
                "retrain it with `python -m protect.train --vae <this VAE>` or use a PGD method",
                UserWarning,
                stacklevel=2,
            )
        param = self.fields
        x = images.to(param.device)
        protected, weights = self.forward(x, vae, eps, min_strength)
        out = fit_to_ball(protected.to(images.device), images, eps, images.dtype)
        return out, {"weights": weights, "target": weights.mean((2, 3)).argmax(1)}
