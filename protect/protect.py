"""Per-image protection against mimicry: PhotoGuard, Mist and Diff-Protect (SDS+, SDS-) attacks run by batched PGD,
and Anti-DreamBooth's ASPL (PGD against a model fine-tuned on the images as it goes, :mod:`protect.aspl`).

>>> protected, report = protect(images, method="photoguard", vae=vae, generator=torch.Generator().manual_seed(0))

``images`` is a float tensor (N, 3, H, W) in [0, 1] or a list of PIL images; the same kind comes back. PIL
inputs get their EXIF orientation applied; RGBA and LA images are protected in their stored colours and come back
as RGBA with the alpha untouched (so every stored value stays within the budget); transparent palette images and
PNG colour keys are composited on white; grayscale and 16-bit images become 8-bit RGB; CMYK goes to sRGB through
its ICC profile, and an RGB file's own profile comes back with it (:mod:`protect.images`). These baselines
are what FastProtect (Ahn et al., CVPR 2025) amortises: ``method="amortized"`` runs a pre-trained
:class:`protect.amortized.AmortizedProtector` instead (one forward pass, no PGD; pass ``protector=``).

Cost: a PGD step runs the VAE encoder, whose mid-block self-attention grows with the square of the latent
size. ``tile=T`` attacks the mean of the loss over T x T crops covering the image (the last row and column of
crops overlap), so a step costs in proportion to the pixels, :data:`TILE_BATCH` tiles per image at a time (its
memory is bounded by those tiles, whatever the image size); ``on_step`` reports each step (:class:`Step`) and may
stop the attack there (return ``False`` or raise :class:`~protect.pgd.Cancelled`).

Default target (PhotoGuard and Mist): :func:`default_target`, a deterministic high-frequency texture (a 4-pixel
checkerboard crossed with diagonal colour stripes), in the spirit of Mist's repeated target pattern.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from PIL import Image

from guidance.method import check_real

from .amortized import AmortizedProtector
from .aspl import Finetune, aspl
from .images import protected_image, to_tensor
from .losses import NoisePredictor, default_target, encoder_loss, latent, mist_loss, sds_loss
from .metrics import psnr_ssim
from .pgd import MAX_EPS, Cancelled, check_budget, exact_dtype, pgd
from .purify import EOT
from .rng import Generators
from .tiling import TILE_BATCH, crop_generators, crops_per_image, rows_of, tiled_loss, tiles

Tensor = torch.Tensor
METHODS = ("photoguard", "mist", "sds", "sds-", "aspl", "amortized")
SDS_METHODS = ("sds", "sds-")  # Diff-Protect: SDS+ (ascent on the denoising loss) and SDS- (descent)
# the amortized protector's named budgets -> ``min_strength`` (None: the protector's own, texture-weighted;
# 1.0: the full ``eps`` on flat regions too, as visible as PGD): the names the app, the CLI and the evaluation use
AMORTIZED_BUDGETS: dict[str, float | None] = {"amortized": None, "amortized-full": 1.0}
MAX_PIXELS = 4096 * 4096

__all__ = [
    "MAX_EPS",
    "MAX_PIXELS",
    "METHODS",
    "SDS_METHODS",
    "Cancelled",
    "ProtectionReport",
    "Step",
    "default_target",
    "protect",
    "tiles",
]


@dataclass(frozen=True)
class Step:
    """Progress of one :func:`protect` call after a step: ``step`` of ``total`` done, the per-image ``loss`` of the
    iterate just evaluated (None for the amortized protector), and the seconds since the call started."""

    step: int
    total: int
    loss: Tensor | None
    elapsed: float

    @property
    def eta(self) -> float:
        """Seconds left at the pace so far."""
        return self.elapsed / max(self.step, 1) * (self.total - self.step)


@dataclass(frozen=True, kw_only=True)
class ProtectionReport:
    """What one :func:`protect` call did: per-image quality and budget, the loss trace, and the wall time."""

    method: str
    psnr: list[float]
    ssim: list[float]
    linf: list[float]
    losses: list[list[float]]  # [step][image], the loss of each PGD iterate
    seconds: float


def _validate(images: Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"expected a float tensor in [0, 1], got dtype {images.dtype}")
    if images.shape[0] == 0:
        raise ValueError("expected at least one image")
    height, width = images.shape[-2:]
    if min(height, width) < 2:
        raise ValueError(f"images must be at least 2x2 pixels, got {width}x{height} (width x height)")
    if height * width > MAX_PIXELS:
        raise ValueError(f"images of {width}x{height} (width x height) exceed the {MAX_PIXELS}-pixel cap (4096x4096)")
    if torch.isnan(images).any():
        raise ValueError("images contain NaN")
    if images.min() < 0 or images.max() > 1:
        raise ValueError(f"images must lie in [0, 1], got [{images.min().item():.3g}, {images.max().item():.3g}]")


def _target_latent(
    vae: AutoencoderKL, target: Tensor | Image.Image | str | None, like: Tensor, tile: int | None = None
) -> Tensor | None:
    """Latent of the target pattern resized to ``like``'s size (of its :func:`tiles` with ``tile``, rows matching
    the tiles of ``like``); ``"zero"`` gives the zero latent (None)."""
    if isinstance(target, str):
        if target != "zero":
            raise ValueError(f"unknown target {target!r}; pass an image, 'zero' or None")
        return None
    if target is None:
        pattern = default_target(*like.shape[-2:])
    elif isinstance(target, Image.Image):
        pattern = to_tensor(target)
    else:
        pattern = target if target.dim() == 4 else target.unsqueeze(0)
        _validate(pattern)
    pattern = pattern.reshape(-1, *pattern.shape[-3:]).to(like.device, torch.float32)
    pattern = F.interpolate(pattern, size=like.shape[-2:], mode="bilinear", align_corners=False, antialias=True)
    if tile is not None:
        crops = tiles(pattern, tile)
        pattern = crops.repeat_interleave(like.shape[0], dim=0) if pattern.shape[0] == 1 else crops
    with torch.no_grad():
        return torch.cat([latent(vae, part) for part in pattern.clamp(0, 1).split(TILE_BATCH)])


def protect(
    images: Tensor | list[Image.Image],
    method: str = "photoguard",
    *,
    vae: AutoencoderKL,
    denoiser: NoisePredictor | None = None,
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
    tile: int | None = None,
    on_step: Callable[[Step], bool | None] | None = None,
    finetune: Finetune | None = None,
) -> tuple[Tensor | list[Image.Image], ProtectionReport]:
    """Protect ``images`` against mimicry by an L-infinity PGD attack on ``vae`` (and ``denoiser``).

    Args:
        method: "photoguard" (encoder attack toward ``target``), "mist" (textural + ``weight`` x semantic loss,
            needs ``denoiser``), "sds" (Diff-Protect SDS+: raises the denoising loss, as Mist's semantic part) or
            "sds-" (Diff-Protect SDS-: lowers it, the variant Xue et al. found stronger on SD 1.x; on our demo
            models it is less visible and slightly weaker, see benchmarks/RESULTS.md); both need ``denoiser``;
            "aspl" (Anti-DreamBooth: raises the denoising loss of a copy of ``denoiser`` that is fine-tuned on the
            images as the attack goes, :func:`protect.aspl.aspl`; ``steps`` PGD steps in rounds of
            ``finetune.pgd_steps``; the images are protected as one set).
        denoiser: ``eps(z_t, t)`` on scaled latents; used by "mist", "sds", "sds-" and "aspl" (an ``nn.Module``
            there: it is fine-tuned, on a copy).
        eps, steps, step: PGD budget (in [0, 1] pixel units), iterations and step size (see :func:`protect.pgd.pgd`).
        target: target pattern for "photoguard"/"mist": an image (tensor in [0, 1] or PIL), "zero" for the zero
            latent, or None for :func:`default_target`.
        generator: the only randomness (PGD start, timesteps, noise, robustness transforms); a list of one
            generator per image makes each result independent of the batch (same seed, same protection).
        robust: True for every EOT transformation (:data:`protect.purify.EOT`), or a tuple of their names.
        alphas_cumprod: the denoiser's noise schedule for "mist", "sds" and "sds-" (default: Stable Diffusion's).
        protector: for "amortized": a trained :class:`~protect.amortized.AmortizedProtector` or its folder
            (``steps``, ``step``, ``target``, ``generator`` and ``robust`` do not apply: it was trained robust).
        min_strength: for "amortized": the budget share on flat regions (1 = full ``eps`` everywhere; default:
            the protector's trained value).
        tile: for the PGD methods: attack ``tile`` x ``tile`` crops (:func:`tiles`; the loss is their mean per
            image), so that a step costs in proportion to the pixels; None attacks the whole image at once. For
            "aspl" the fine-tunes train on those crops too (whole images: at most 1024x1024).
        on_step: ``on_step(Step)`` after every PGD step (once for "amortized"); returning ``False`` or raising
            :class:`~protect.pgd.Cancelled` stops the call there (:class:`~protect.pgd.Cancelled` is raised).
        finetune: for "aspl": the fine-tunes (:class:`~protect.aspl.Finetune`: steps and lr per round, PGD steps
            per round, LoRA rank or every weight).
    """
    _check_options(method, denoiser, eps, target, weight, protector, robust, min_strength, tile)
    if finetune is not None and method != "aspl":
        raise ValueError("finetune applies to method 'aspl' only")
    if isinstance(protector, str | Path):
        protector = AmortizedProtector.from_pretrained(str(protector))
    batch = _batch(images, vae)
    progress = _Progress(on_step, total=1 if method == "amortized" else steps)
    progress(0)
    if method == "amortized":
        protector = protector.to(batch.device)
        protected, _ = protector.protect(batch, vae, eps=eps, min_strength=min_strength)
        progress(1)
    else:
        attack = {"eps": eps, "step": step, "steps": steps, "generator": generator}
        attack |= {"robust": EOT if robust is True else tuple(robust or ()), "callback": progress.after_pgd_step}
        if method == "aspl":
            protected = aspl(
                batch, vae, denoiser, finetune=finetune, alphas_cumprod=alphas_cumprod, tile=tile, **attack
            )
        else:
            loss_fn = _pgd_loss(method, vae, denoiser, batch, target, weight, alphas_cumprod, generator, tile)
            protected = pgd(batch, loss_fn, **attack)
    seconds = time.perf_counter() - progress.start
    outputs, final, linf = _outputs(images, batch, protected, eps)
    psnr_values, ssim_values = psnr_ssim(batch, final)
    report = ProtectionReport(
        method=method, psnr=psnr_values, ssim=ssim_values, linf=linf.tolist(), losses=progress.trace, seconds=seconds
    )
    return outputs, report


def _check_options(
    method: str,
    denoiser: NoisePredictor | None,
    eps: float,
    target: Tensor | Image.Image | str | None,
    weight: float,
    protector: AmortizedProtector | str | None,
    robust: bool | tuple[str, ...],
    min_strength: float | None,
    tile: int | None,
) -> None:
    """Raise a ``ValueError`` for a combination of :func:`protect`'s options that does not apply."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    check_budget(eps, allow_zero=False)
    check_real("weight", weight, low=0.0)
    if method in (*SDS_METHODS, "aspl") and denoiser is None:
        raise ValueError(f"method {method!r} needs a denoiser eps(z_t, t)")
    if method == "mist" and denoiser is None:
        raise ValueError(
            "method 'mist' needs a denoiser eps(z_t, t) (a latent diffusion model on this VAE) for its semantic "
            "loss; without one it is PhotoGuard's encoder attack: use method='photoguard'"
        )
    if method in (*SDS_METHODS, "aspl") and target is not None:
        raise ValueError(f"method {method!r} has no target; pass target=None")
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
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 8):
        raise ValueError(f"tile must be an integer of at least 8 pixels or None, got {tile!r}")


def _batch(images: Tensor | list[Image.Image], vae: AutoencoderKL) -> Tensor:
    """``images`` as one checked ``(N, 3, H, W)`` batch in [0, 1] (PIL images on the VAE's device)."""
    if isinstance(images, list | tuple):
        if not images or not all(isinstance(im, Image.Image) for im in images):
            raise ValueError("expected a non-empty list of PIL images or a tensor")
        tensors = [to_tensor(im) for im in images]
        if len({t.shape for t in tensors}) != 1:
            raise ValueError("PIL images must share one size to be protected as a batch; call protect per size")
        batch = torch.stack(tensors).to(next(vae.parameters()).device)
    elif isinstance(images, torch.Tensor):
        batch = images
    else:
        raise ValueError(f"expected a tensor or a list of PIL images, got {type(images).__name__}")
    _validate(batch)
    return batch


class _Progress:
    """The steps of one :func:`protect` call: the loss trace, and ``on_step`` (which may stop the call)."""

    def __init__(self, on_step: Callable[[Step], bool | None] | None, total: int):
        self.on_step, self.total = on_step, total
        self.start = time.perf_counter()
        self.trace: list[list[float]] = []

    def __call__(self, done: int, loss: Tensor | None = None) -> None:
        step = Step(done, self.total, loss, time.perf_counter() - self.start)
        if self.on_step is not None and self.on_step(step) is False:
            raise Cancelled(f"stopped after {done} of {self.total} steps")

    def after_pgd_step(self, i: int, x: Tensor, loss: Tensor) -> None:
        self.trace.append(loss.float().tolist())
        self(i + 1, loss)


def _pgd_loss(
    method: str,
    vae: AutoencoderKL,
    denoiser: NoisePredictor | None,
    batch: Tensor,
    target: Tensor | Image.Image | str | None,
    weight: float,
    alphas_cumprod: Tensor | None,
    generator: Generators,
    tile: int | None,
) -> Callable[[Tensor], Tensor]:
    """The per-image loss that PGD minimises for ``method`` (with ``tile``: its mean over the crops of each image,
    a list of generators repeated tile-major as the crops are, so that image ``i`` keeps drawing from its own)."""
    count = 1
    if tile is not None:
        count = crops_per_image(batch, tile)
        generator = crop_generators(generator, batch.shape[0], count)
    target_latent = None if method in SDS_METHODS else _target_latent(vae, target, batch, tile)

    def loss_of(rows: slice = slice(None)) -> Callable[[Tensor], Tensor]:  # the loss of those rows (tiles)
        draws = rows_of(generator, rows)
        if method in SDS_METHODS:
            ascent = method == "sds"
            return partial(sds_loss, vae, denoiser, ascent=ascent, alphas_cumprod=alphas_cumprod, generator=draws)
        goal = None if target_latent is None else target_latent[rows]
        if method == "photoguard":
            return partial(encoder_loss, vae, target_latent=goal)
        return partial(
            mist_loss,
            vae,
            denoiser,
            target_latent=goal,
            weight=weight,
            alphas_cumprod=alphas_cumprod,
            generator=draws,
        )

    return partial(tiled_loss, loss_of, tile, count) if tile is not None else loss_of()


def _outputs(
    images: Tensor | list[Image.Image], batch: Tensor, protected: Tensor, eps: float
) -> tuple[Tensor | list[Image.Image], Tensor, Tensor]:
    """The outputs in the input's kind, the final images as a tensor, and each image's L-infinity change.

    PIL outputs are 8-bit, where the budget holds in levels: ``|q - k| <= floor(255 eps)``."""
    if isinstance(images, list | tuple):
        outputs = [protected_image(x, c, eps, im) for x, c, im in zip(protected, batch, images)]
        final = torch.stack([to_tensor(im.convert("RGB")) for im in outputs]).to(batch.device)
        return outputs, final, ((final * 255).round() - (batch * 255).round()).abs().flatten(1).amax(1).double() / 255
    exact = exact_dtype(batch.device)
    return protected, protected, (protected.to(exact) - batch.to(exact)).abs().flatten(1).amax(1)
