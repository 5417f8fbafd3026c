"""Does a protection work? Mimic clean and protected images and measure how far the mimicry degrades.

Mimicry attacks (each a callable ``images (N, 3, H, W) in [0, 1] -> images``):

* :func:`sdedit`: img2img / SDEdit with a class-conditional latent diffusion pipeline (the demo DiT; any
  ``DiTPipeline``): encode, noise to ``strength``, denoise with CFG, decode. For text-to-image img2img
  pipelines (SD, SDXL, FLUX), wrap ``pipe(prompt, image=..., strength=...)`` yourself: any callable works;
* :func:`lora_mimic`: personalisation by a LoRA fine-tune (peft, through diffusers' ``add_adapter``) of the
  pipeline's transformer on the images, then sampling the same classes from the fine-tuned model.

Purifications applied to the protected files before mimicry (:data:`PURIFICATIONS`): real 8-bit JPEG q90/q75/q50
(PIL), resize x0.5 and back (bicubic), Gaussian noise (std 4/255), Gaussian blur (sigma 1) and noisy upscaling
(bicubic), as in Hönig et al. 2024; pass ``purifications=`` a mapping to add the model-based ones of
:func:`protect.purifiers.model_purifications` (DiffPure, IMPRESS, a learned upscaler).

:func:`evaluate` reports per protection and purification: invisibility (PSNR, SSIM against the clean images),
latent distortion in each VAE's space (``||E(x') - E(x)|| / ||E(x)||``), and per mimicry the classifier's
accuracy on the mimicked images, the Fréchet distance of their classifier features to the clean images', and
the PSNR between the mimicry of the protected and of the clean image (same noise: lower = more disruption).
A ``random_noise`` row (random signs at the protections' budget) is always there, the baseline every protection
must beat. :func:`worst_case` reports per protection the purification under which it does the least damage
(the worst case over purifications, as Hönig et al. report). LPIPS / DISTS need downloaded weights and are not
computed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler

from .amortized import excess_change
from .aspl import add_lora
from .losses import decoded, latent
from .metrics import frechet_distance, psnr, psnr_ssim
from .purify import EVALUATION, sign_noise
from .purify import PURIFICATIONS as TABLE
from .rng import Generators, draw

Tensor = torch.Tensor
Mimic = Callable[[Tensor], Tensor]

__all__ = [
    "DAMAGE",
    "PURIFICATIONS",
    "RANDOM_NOISE",
    "UNetDenoiser",
    "evaluate",
    "lora_mimic",
    "purify",
    "sample",
    "sdedit",
    "sdedit_unconditional",
    "semantic_part",
    "unet_denoiser",
    "worst_case",
]
RANDOM_NOISE = "random_noise"  # the row evaluate always adds: random signs at the protections' L-inf budget


# ----------------------------------------------------------------------------- purifications


def null_class(transformer: torch.nn.Module) -> int:
    """The unconditional class label of a DiT transformer: the extra label embedding after its
    ``num_embeds_ada_norm`` classes (1000 for ImageNet DiT, the label ``DiTPipeline`` uses for CFG)."""
    classes = getattr(transformer.config, "num_embeds_ada_norm", None)
    if not isinstance(classes, int):
        raise ValueError("the transformer's config has no num_embeds_ada_norm: not a class-conditional DiT")
    return classes


PURIFICATIONS: dict[str, Callable[[Tensor], Tensor]] = {name: TABLE[name] for name in EVALUATION}


def purify(images: Tensor, name: str) -> Tensor:
    """Apply purification ``name`` from :data:`PURIFICATIONS` to images in [0, 1]."""
    if name not in PURIFICATIONS:
        raise ValueError(f"unknown purification {name!r}; choose from {sorted(PURIFICATIONS)}")
    return PURIFICATIONS[name](images)


# ----------------------------------------------------------------------------- mimicry


def _decode(vae: AutoencoderKL, z: Tensor) -> Tensor:
    return decoded(vae, z).clamp(0, 1)


def _denoise(
    pipe: Any,
    transformer: torch.nn.Module,
    z: Tensor,
    labels: Tensor,
    timesteps: Tensor,
    scheduler: Any,
    guidance_scale: float,
) -> Tensor:
    """Run ``scheduler`` over ``timesteps`` from ``z`` with class-conditional CFG (DiT's null class)."""
    channels = z.shape[1]
    null = torch.full_like(labels, null_class(transformer))
    param = next(transformer.parameters())
    for t in timesteps:
        both = guidance_scale != 1
        inputs = torch.cat([z, z]) if both else z
        classes = torch.cat([labels, null]) if both else labels
        step = t.expand(len(inputs)).to(param.device)
        out = transformer(inputs.to(param.dtype), timestep=step, class_labels=classes).sample.float()[:, :channels]
        if both:
            cond, uncond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        z = scheduler.step(out, t, z).prev_sample
    return z


@torch.no_grad()
def sdedit(
    pipe: Any,
    images: Tensor,
    labels: Tensor,
    *,
    strength: float = 0.5,
    steps: int = 25,
    guidance_scale: float = 4.0,
    generator: Generators = None,
    transformer: torch.nn.Module | None = None,
) -> Tensor:
    """SDEdit (img2img) of ``images`` in [0, 1] with a class-conditional latent pipeline (``pipe.vae``,
    ``pipe.transformer``, ``pipe.scheduler``): noise the latents to ``strength`` of the schedule, denoise with CFG
    toward ``labels``; ``strength=1`` samples from pure noise. Returns images in [0, 1]."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    transformer = transformer or pipe.transformer
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    start = max(1, round(steps * strength))
    timesteps = scheduler.timesteps[steps - start :]
    z0 = latent(pipe.vae, images)
    noise = draw("randn", z0.shape, generator, z0)
    labels = labels.to(z0.device)
    z = noise if strength == 1 else scheduler.add_noise(z0, noise, timesteps[:1].repeat(len(z0)))
    if strength == 1:
        z = z * getattr(scheduler, "init_noise_sigma", 1.0)
    return _decode(pipe.vae, _denoise(pipe, transformer, z, labels, timesteps, scheduler, guidance_scale))


class UNetDenoiser(torch.nn.Module):
    """An unconditional ``UNet2DModel`` as a latent denoiser ``eps(z_t, t)`` of any latent size: latents whose sides
    are not a multiple of the UNet's downsampling are replicate-padded and the prediction cropped back; runs in the
    UNet's dtype, returns float32. A module holding the UNet, so ASPL can fine-tune a copy of it."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.multiple = 2 ** (len(unet.config.block_out_channels) - 1)

    def forward(self, z_t: Tensor, t: Tensor) -> Tensor:
        param = next(self.unet.parameters())
        height, width = z_t.shape[-2:]
        z = F.pad(z_t, (0, -width % self.multiple, 0, -height % self.multiple), mode="replicate")
        t = t.expand(len(z_t)) if t.dim() == 0 else t
        out = self.unet(z.to(param.dtype), t.to(param.device)).sample.float()
        return out[..., :height, :width]


def unet_denoiser(unet: torch.nn.Module) -> UNetDenoiser:
    """An unconditional ``UNet2DModel`` as a latent denoiser ``eps(z_t, t)`` of any latent size (Mist / SDS, SDEdit,
    ASPL): :class:`UNetDenoiser`."""
    return UNetDenoiser(unet)


def semantic_part(unet: torch.nn.Module, scheduler: Any) -> dict[str, Any]:
    """Mist's and SDS's semantic part from an unconditional latent ``UNet2DModel`` and its scheduler: the keyword
    arguments :func:`protect.protect` takes (``denoiser``, ``alphas_cumprod`` on the UNet's device)."""
    device = next(unet.parameters()).device
    return {"denoiser": unet_denoiser(unet), "alphas_cumprod": scheduler.alphas_cumprod.to(device)}


@torch.no_grad()
def sdedit_unconditional(
    vae: AutoencoderKL,
    unet: torch.nn.Module,
    scheduler: Any,
    images: Tensor,
    *,
    strength: float = 0.3,
    steps: int = 20,
    generator: Generators = None,
) -> Tensor:
    """SDEdit (img2img) of ``images`` in [0, 1] with an unconditional latent eps model ``unet`` (a diffusers
    ``UNet2DModel`` on the scaled latents of ``vae``, e.g. the photo latent model ``demo/photo_ldm``): encode, noise
    to ``strength`` of the schedule of ``scheduler`` (its config; deterministic DDIM steps, eta 0, no clipping, so
    the only randomness is the seeded starting noise), denoise, decode. Any size
    (latents are padded for the UNet, :func:`unet_denoiser`; images for the VAE, :func:`latent`); returns images in
    [0, 1] of the input size."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    scheduler = DDIMScheduler.from_config(scheduler.config, clip_sample=False, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    start = max(1, round(steps * strength))
    timesteps = scheduler.timesteps[steps - start :]
    z0 = latent(vae, images)
    noise = draw("randn", z0.shape, generator, z0)
    z = scheduler.add_noise(z0, noise, timesteps[:1].repeat(len(z0)))
    eps = unet_denoiser(unet)
    for t in timesteps:
        z = scheduler.step(eps(z, t), t, z).prev_sample
    height, width = images.shape[-2:]
    return _decode(vae, z)[..., :height, :width]


def sample(pipe: Any, labels: Tensor, size: int, *, transformer=None, generator: Generators = None, **kwargs) -> Tensor:
    """Class-conditional samples (N, 3, size, size) in [0, 1]: :func:`sdedit` from pure noise."""
    blank = torch.zeros(len(labels), 3, size, size, device=next(pipe.vae.parameters()).device)
    return sdedit(pipe, blank, labels, strength=1.0, transformer=transformer, generator=generator, **kwargs)


def _fit(transformer, optimizer, z_all: Tensor, labels: Tensor, alphas: Tensor, rng, steps: int, batch_size: int):
    """LoRA training loop of :func:`lora_mimic`: eps-prediction MSE at uniform timesteps."""
    for _ in range(steps):
        idx = torch.randint(len(z_all), (min(batch_size, len(z_all)),), generator=rng).to(z_all.device)
        z, y = z_all[idx], labels[idx]
        t = torch.randint(len(alphas), (len(z),), generator=rng).to(z.device)
        noise = torch.randn(z.shape, generator=rng).to(z)
        a = alphas[t].view(-1, 1, 1, 1).to(z)
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise
        out = transformer(noisy, timestep=t, class_labels=y).sample[:, : z.shape[1]]
        loss = F.mse_loss(out.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def lora_mimic(
    pipe: Any,
    images: Tensor,
    labels: Tensor,
    *,
    steps: int = 100,
    rank: int = 8,
    lr: float = 1e-3,
    batch_size: int = 16,
    samples: int | None = None,
    seed: int = 0,
    sampling_steps: int = 25,
    guidance_scale: float = 4.0,
) -> Tensor:
    """Personalisation attack: LoRA-fine-tune a copy of ``pipe.transformer`` on ``images`` (the eps-prediction loss
    on their latents, DDPM noise), then sample ``samples`` images (default: as many) of the same classes."""
    transformer = copy.deepcopy(pipe.transformer)
    transformer.requires_grad_(False)
    transformer, params = add_lora(transformer, rank, gaussian=True, seed=seed)
    optimizer = torch.optim.AdamW(params, lr=lr)
    alphas = pipe.scheduler.alphas_cumprod.to(images.device)
    with torch.no_grad():
        z_all = latent(pipe.vae, images)
    labels = labels.to(z_all.device)
    rng = torch.Generator().manual_seed(seed)
    transformer.eval()  # no label dropout (it draws from the global generator); LoRA itself has no dropout
    with torch.enable_grad():
        _fit(transformer, optimizer, z_all, labels, alphas, rng, steps, batch_size)
    n = samples or len(images)
    classes = labels[torch.arange(n, device=labels.device) % len(labels)]
    gens = [torch.Generator().manual_seed(seed + 10_000 + i) for i in range(n)]
    return sample(
        pipe,
        classes,
        images.shape[-1],
        transformer=transformer,
        generator=gens,
        steps=sampling_steps,
        guidance_scale=guidance_scale,
    )


# ----------------------------------------------------------------------------- metrics


@torch.no_grad()
def _latent_distortion(vae: AutoencoderKL, clean: Tensor, protected: Tensor) -> float:
    zc, zp = latent(vae, clean), latent(vae, protected)
    return ((zp - zc).flatten(1).norm(dim=1) / zc.flatten(1).norm(dim=1).clamp_min(1e-8)).mean().item()


def _purifications(purifications: Sequence[str] | Mapping[str, Callable[[Tensor], Tensor]]):
    """Names of :data:`protect.purify.PURIFICATIONS` (fixed entries), or a mapping of names to purifications."""
    if isinstance(purifications, Mapping):
        return dict(purifications)
    unknown = [name for name in purifications if name not in TABLE or TABLE[name].random]
    if unknown:
        fixed = sorted(name for name, entry in TABLE.items() if not entry.random)
        raise ValueError(f"unknown purifications {unknown}; choose from {fixed} or pass a mapping of purifications")
    return {name: TABLE[name] for name in purifications}


def _random_noise(clean: Tensor, eps: float, seed: int) -> Tensor:
    """``clean + eps * random signs`` (image ``i`` seeded ``seed + i``), clipped to [0, 1]."""
    return torch.cat([sign_noise(image[None], eps, seed + i) for i, image in enumerate(clean)])


@torch.no_grad()
def evaluate(
    clean: Tensor,
    protected: Mapping[str, Tensor],
    labels: Tensor | None = None,
    *,
    mimics: Mapping[str, Mimic] | None = None,
    classifier: torch.nn.Module | None = None,
    vaes: Mapping[str, AutoencoderKL] | None = None,
    purifications: Sequence[str] | Mapping[str, Callable[[Tensor], Tensor]] = tuple(PURIFICATIONS),
    noise_eps: float | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per (protection, purification): invisibility, latent distortion per VAE, and per mimic the
    classifier accuracy, the Fréchet distance of classifier features to the clean images and the PSNR to the
    mimicry of the clean images (after the same purification). ``protected`` maps names to image tensors
    aligned with ``clean``; a "clean" row (no protection) is added as the reference, and a ``random_noise`` row:
    random signs of ``noise_eps`` (default: the largest L-infinity distance of the protections to ``clean``)
    seeded ``seed + i`` per image.

    ``purifications``: names of fixed entries of :data:`protect.purify.PURIFICATIONS`, or a mapping of names to
    callables ``images -> images`` (e.g. with :func:`protect.purifiers.model_purifications`: DiffPure, IMPRESS).
    ``classifier`` takes images in [-1, 1] and has ``features(x)`` (the demo classifier's interface); with it and
    ``labels`` each mimic also gets accuracy and Fréchet distance; without them (photos: no classes) only the
    PSNR and SSIM of each mimicry to the clean image's mimicry under the same purification.
    """
    table = _purifications(purifications)
    mimics = dict(mimics or {})
    if mimics and (classifier is None) != (labels is None):
        raise ValueError("a classifier scores mimics against labels: pass both classifier= and labels, or neither")
    rows = []
    for name, images in protected.items():
        if images.shape != clean.shape:
            raise ValueError(f"protected images {name!r} have shape {tuple(images.shape)}, clean {tuple(clean.shape)}")
    if RANDOM_NOISE in protected or "clean" in protected:
        raise ValueError(f"'clean' and {RANDOM_NOISE!r} are the rows evaluate adds; name the protections otherwise")
    if noise_eps is None:
        linf = [(images.float() - clean.float()).abs().amax().item() for images in protected.values()]
        noise_eps = max(linf, default=8 / 255)
    entries = {"clean": clean, **protected, RANDOM_NOISE: _random_noise(clean, noise_eps, seed)}
    if mimics and classifier is not None:
        device = next(classifier.parameters()).device
        real_features = classifier.features(clean.to(device) * 2 - 1).float()
    reference: dict[tuple[str, str], Tensor] = {}
    for purification, apply in table.items():
        purified_clean = apply(clean)
        for name, images in entries.items():
            shown = apply(images)
            row: dict[str, Any] = {"protection": name, "purification": purification}
            psnr_values, ssim_values = psnr_ssim(clean, images)
            row["psnr"], row["ssim"] = float(np.mean(psnr_values)), float(np.mean(ssim_values))
            row["linf_255"] = (images.float() - clean.float()).abs().amax().item() * 255
            for vae_name, vae in (vaes or {}).items():
                row[f"latent_distortion_{vae_name}"] = _latent_distortion(vae, purified_clean, shown)
            for mimic_name, mimic in mimics.items():
                out = mimic(shown).float()
                if name == "clean":
                    reference[(purification, mimic_name)] = out
                if classifier is not None:
                    x = out.to(device) * 2 - 1
                    logits = classifier(x)
                    row[f"{mimic_name}_accuracy"] = (logits.argmax(1).cpu() == labels.cpu()).float().mean().item()
                    row[f"{mimic_name}_fd"] = frechet_distance(real_features, classifier.features(x).float())
                    row[f"{mimic_name}_psnr_to_clean"] = psnr(out, reference[(purification, mimic_name)]).mean().item()
                else:
                    edit_psnr, edit_ssim = psnr_ssim(reference[(purification, mimic_name)], out)
                    row[f"{mimic_name}_psnr_to_clean"] = float(np.mean(edit_psnr))
                    row[f"{mimic_name}_ssim_to_clean"] = float(np.mean(edit_ssim))
                    share, excess = carried_over(out - reference[(purification, mimic_name)], shown - purified_clean)
                    row[f"{mimic_name}_carried_share"] = float(share.mean())
                    row[f"{mimic_name}_excess_psnr_to_clean"] = float(excess.mean())
            rows.append(row)
    return rows


def carried_over(change: Tensor, perturbation: Tensor) -> tuple[Tensor, Tensor]:
    """How much of a mimicry's change is the perturbation carried along, per image: ``change`` is the mimicry of the
    protected image minus that of the clean one, ``perturbation`` the protected (purified) image minus the clean
    (purified) one, both (N, C, H, W) in [0, 1] units. Returns ``(share, excess_psnr)``: the share of the change's
    energy along the perturbation (least squares, in [0, 1]; 1 when the mimic reproduces the perturbation, scaled,
    and changes nothing else) and the PSNR (dB, capped at 100) of what is left, the **excess** change
    (:func:`protect.amortized.excess_change`).

    The edit's PSNR to the clean edit counts a perturbation that the VAE and the denoiser simply reproduce as
    damage, though the mimic's output is then the clean edit plus an invisible pattern; the excess PSNR does not
    (a protector trained on the plain measure learned to do exactly that; ``benchmarks/RESULTS.md``)."""
    change = change.float()
    rest = excess_change(change, perturbation.float())
    total = change.pow(2).flatten(1).sum(1)
    share = torch.where(total > 0, 1 - rest.pow(2).flatten(1).sum(1) / total.clamp_min(1e-20), torch.zeros_like(total))
    mse = rest.pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return share.clamp(0, 1), -10 * torch.log10(mse)


# ----------------------------------------------------------------------------- worst case

# which way a metric of evaluate's rows goes when the protection does more damage to the mimicry
DAMAGE = {
    "latent_distortion": "higher",
    "_fd": "higher",
    "_accuracy": "lower",
    "_psnr_to_clean": "lower",
    "_ssim_to_clean": "lower",
}


def _direction(metric: str) -> str:
    for key, direction in DAMAGE.items():
        if metric.startswith(key) or metric.endswith(key):
            return direction
    raise ValueError(f"no damage direction known for {metric!r}; pass damage='higher' or 'lower'")


def worst_case(rows: Sequence[Mapping[str, Any]], metric: str, damage: str | None = None) -> list[dict[str, Any]]:
    """Per protection (every row but "clean", the ``random_noise`` baseline included), the worst case over
    purifications of ``metric``: the purification under which the protection does the least damage (the lowest
    latent distortion or Fréchet distance, the highest accuracy or PSNR to the clean mimicry; ``damage`` says
    which way more damage goes when the name does not: "higher" or "lower").

    Each entry: ``protection``, ``metric``, ``purification`` (the worst), ``value`` (there), ``unpurified`` (the
    value without purification, if there is a "none" row), and ``random_noise`` (the baseline's value under the
    same purification), in the order of the rows.
    """
    damage = damage or _direction(metric)
    if damage not in ("higher", "lower"):
        raise ValueError(f"damage must be 'higher' or 'lower', got {damage!r}")
    table: dict[str, dict[str, float]] = {}
    for row in rows:  # rows without the metric (e.g. a mimic run under some purifications only) do not count
        if row["protection"] != "clean" and row.get(metric) is not None:
            table.setdefault(row["protection"], {})[row["purification"]] = row[metric]
    if not table:
        raise ValueError(f"no row has {metric!r}")
    pick = min if damage == "higher" else max  # the least damage
    noise = table.get(RANDOM_NOISE, {})
    out = []
    for protection, values in table.items():
        worst = pick(values, key=values.get)
        out.append(
            {
                "protection": protection,
                "metric": metric,
                "purification": worst,
                "value": values[worst],
                "unpurified": values.get("none"),
                "random_noise": noise.get(worst),
            }
        )
    return out
