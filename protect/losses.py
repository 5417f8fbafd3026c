"""Per-image protection losses against latent-diffusion autoencoders (minimised by :func:`protect.pgd.pgd`).

Images are float tensors (N, 3, H, W) in [0, 1]; they are mapped to [-1, 1] for the VAE. Latents are the
posterior mean, shifted and scaled as the diffusion model sees them: ``(mean - shift_factor) * scaling_factor``.
Every loss returns one value per image, shape (N,), so one batched attack optimises each image independently.

- :func:`encoder_loss`: PhotoGuard encoder attack (Salman et al. 2023, "Raising the Cost of Malicious
  AI-Powered Image Editing"), ``||E(x) - z_target||^2`` with ``z_target`` = 0 or a target pattern's latent.
- :func:`mist_loss`: Mist (Liang et al. 2023, "Mist: Towards Improved Adversarial Examples for Diffusion
  Models"): textural loss (encoder loss to a target) minus ``weight`` x the semantic loss (the denoising loss
  ``||eps_theta(z_t, t) - eps||^2`` at a random t, maximised).
- :func:`sds_loss`: Diff-Protect (Xue et al. 2024, "Toward Effective Protection Against Diffusion Based
  Mimicry through Score Distillation"): the score-distillation gradient ``eps_hat - eps`` at a random t,
  back-propagated through the encoder only (the denoiser runs without a graph).
- :func:`multi_vae_loss`: the encoder loss summed over several VAEs' latent spaces (FastProtect's
  multi-VAE protection loss, Ahn et al. 2025).

A denoiser is any callable ``eps(z_t, t) -> eps_hat`` on scaled latents and integer timesteps (N,); a result
with a ``.sample`` attribute (a diffusers model output) is unwrapped. Randomness comes only from ``generator`` (one
``torch.Generator``, or a list of one per image for batch-independent draws).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from .rng import Generators, draw

Tensor = torch.Tensor
NoisePredictor = Callable[[Tensor, Tensor], object]  # eps(z_t, t); guidance.denoisers.Denoiser is D(x, sigma) -> x0

__all__ = [
    "NoisePredictor",
    "default_alphas_cumprod",
    "default_target",
    "denoising_loss",
    "encoder_loss",
    "latent",
    "mist_loss",
    "multi_vae_loss",
    "sds_loss",
    "vae_stride",
]


def default_target(height: int, width: int) -> Tensor:
    """Deterministic high-frequency target pattern (3, H, W) in [0, 1]: 4-px checker x diagonal colour stripes."""
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    checker = ((yy // 4 + xx // 4) % 2).float()
    stripes = torch.stack([((xx + yy + 3 * c) // 3 % 3 == 0).float() for c in range(3)])
    return (0.6 * checker + 0.4 * stripes).clamp(0, 1)


def default_alphas_cumprod(num_train_timesteps: int = 1000) -> Tensor:
    """Stable Diffusion's "scaled_linear" schedule (betas 0.00085 to 0.012), as cumulative alpha products."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def vae_stride(vae: AutoencoderKL) -> int:
    """Pixels per latent position along each side: 2 per down block after the first (8 for SD's VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent(vae: AutoencoderKL, x: Tensor) -> Tensor:
    """Scaled posterior-mean latent of images ``x`` in [0, 1]; edges replicate-padded to the VAE's stride."""
    stride = vae_stride(vae)
    pad_h, pad_w = -x.shape[-2] % stride, -x.shape[-1] % stride
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    param = next(vae.parameters())
    mean = vae.encode((2 * x - 1).to(param.device, param.dtype)).latent_dist.mean
    shift = vae.config.shift_factor or 0.0
    return ((mean - shift) * vae.config.scaling_factor).float()


def decoded(vae: AutoencoderKL, z: Tensor) -> Tensor:
    """The images (float32, [0, 1] up to the decoder's overshoot: not clamped, so gradients pass) of scaled latents
    ``z`` as :func:`latent` makes them: the inverse scaling and shift, then the decoder. Differentiable."""
    param = next(vae.parameters())
    z = z / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    return (vae.decode(z.to(param.device, param.dtype)).sample.float() + 1) / 2


def _per_image_mse(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).pow(2).flatten(1).mean(1)


def encoder_loss(vae: AutoencoderKL, x: Tensor, target_latent: Tensor | None = None) -> Tensor:
    """PhotoGuard encoder attack: per-image MSE between ``latent(vae, x)`` and ``target_latent`` (zeros if None)."""
    z = latent(vae, x)
    target = torch.zeros_like(z) if target_latent is None else target_latent.to(z)
    return _per_image_mse(z, target.expand_as(z))


def _noised(z: Tensor, alphas_cumprod: Tensor | None, generator: Generators) -> tuple[Tensor, ...]:
    """Forward diffusion at one random timestep per image: ``z_t = sqrt(a_t) z + sqrt(1 - a_t) eps``."""
    alphas = (default_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod.float()).to(z.device)
    t = draw(len(alphas), (z.shape[0],), generator, z)
    eps = draw("randn", z.shape, generator, z)
    a = alphas[t].to(z).view(-1, *([1] * (z.dim() - 1)))
    return a.sqrt() * z + (1 - a).sqrt() * eps, t, eps


def _predict(denoiser: NoisePredictor, z_t: Tensor, t: Tensor) -> Tensor:
    out = denoiser(z_t, t)
    return getattr(out, "sample", out).float()


def mist_loss(
    vae: AutoencoderKL,
    denoiser: NoisePredictor | None,
    x: Tensor,
    target_latent: Tensor | None,
    weight: float = 1.0,
    *,
    alphas_cumprod: Tensor | None = None,
    generator: Generators = None,
) -> Tensor:
    """Mist: textural loss to ``target_latent`` minus ``weight`` x the denoising loss (textural only if no denoiser)."""
    z = latent(vae, x)
    target = torch.zeros_like(z) if target_latent is None else target_latent.to(z).expand_as(z)
    textural = _per_image_mse(z, target)
    if denoiser is None:
        return textural
    return textural - weight * denoising_loss(denoiser, z, alphas_cumprod=alphas_cumprod, generator=generator)


def denoising_loss(
    denoiser: NoisePredictor, z: Tensor, *, alphas_cumprod: Tensor | None = None, generator: Generators = None
) -> Tensor:
    """The diffusion training loss per latent: ``||eps_theta(z_t, t) - eps||^2`` at one random ``t`` and noise each
    (learned-variance channels of the prediction dropped); differentiable in ``z`` and in the denoiser."""
    z_t, t, eps = _noised(z, alphas_cumprod, generator)
    return _per_image_mse(_predict(denoiser, z_t, t)[:, : z.shape[1]], eps)


def sds_loss(
    vae: AutoencoderKL,
    denoiser: NoisePredictor,
    x: Tensor,
    *,
    ascent: bool = True,
    alphas_cumprod: Tensor | None = None,
    generator: Generators = None,
) -> Tensor:
    """Diff-Protect SDS surrogate: value = -/+ the denoising loss, gradient = -/+ ``(eps_hat - eps) dz/dx``.

    ``ascent=True`` (SDS+) pushes the denoising loss up, like Mist's semantic loss; ``ascent=False`` (SDS-)
    pulls it down, the variant Xue et al. found more effective. The denoiser's Jacobian is skipped.
    """
    z = latent(vae, x)
    z_t, t, eps = _noised(z, alphas_cumprod, generator)
    with torch.no_grad():
        residual = _predict(denoiser, z_t.detach(), t) - eps
        value = residual.pow(2).flatten(1).mean(1)
    linear = (residual * z).flatten(1).sum(1)
    surrogate = value + linear - linear.detach()
    return -surrogate if ascent else surrogate


def multi_vae_loss(
    vaes: Sequence[AutoencoderKL], x: Tensor, target_latents: Sequence[Tensor | None] | None = None
) -> Tensor:
    """FastProtect multi-VAE loss: :func:`encoder_loss` summed over ``vaes`` (one target latent per VAE or None)."""
    targets = [None] * len(vaes) if target_latents is None else list(target_latents)
    if len(targets) != len(vaes):
        raise ValueError(f"got {len(targets)} target latents for {len(vaes)} VAEs")
    return sum(encoder_loss(vae, x, target) for vae, target in zip(vaes, targets))
