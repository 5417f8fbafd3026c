"""Anti-DreamBooth ASPL: protection against personalisation by fine-tuning (Van Le et al., ICCV 2023).

PhotoGuard, Mist and SDS attack a *fixed* model; a DreamBooth or LoRA attacker fine-tunes the model on the
protected images, and the perturbation has to keep hurting the model it turns into. ASPL (Alternating Surrogate
and Perturbation Learning) follows that fine-tune. Every round it:

1. copies the attacker's model ``theta`` into a surrogate ``theta'`` and fine-tunes it on the *clean* images
   (where an attacker's fine-tune would head),
2. runs PGD steps that *raise* the surrogate's denoising loss on the perturbed images (back-propagated through
   the denoiser and the encoder),
3. fine-tunes ``theta`` itself on the *perturbed* images, as the attacker would.

Paper setting (SD 2.1, full fine-tune): 50 rounds of 3 fine-tune steps and 6 PGD steps, eps 0.05 on [-1, 1]
pixels (0.025 here on [0, 1]), step 0.005 (0.0025), fine-tune lr 5e-6; 24-40 GB of GPU memory.
:class:`Finetune` holds the fine-tune settings; ``rank`` fine-tunes LoRA adapters (peft) instead of every
weight, the memory-light way a LoRA attacker personalises. The denoiser given is never changed: the
fine-tunes run on a float32 copy on its device.

Every image of the set is in every fine-tune step (a DreamBooth instance set is a handful of images), so the
protection of an image depends on the others it is protected with: protect the set together.

Whole images cost the square of their latent size in the denoiser's self-attention, so ASPL takes them up to
:data:`MAX_PIXELS`. With ``tile=T`` the set is the images' ``T`` x ``T`` crops (:func:`protect.tiling.tiles`, an
attacker's random crops): the fine-tunes train on every crop and the PGD steps raise the surrogate's loss averaged
over each image's crops, :data:`protect.tiling.TILE_BATCH` crops per image at a time, so the cost and the memory
grow in proportion to the pixels, at any size.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import torch
from diffusers import AutoencoderKL
from torch import nn

from guidance.method import check_real

from .losses import denoising_loss, latent
from .pgd import pgd
from .rng import Generators, draw
from .tiling import TILE_BATCH, crop_generators, crops_per_image, rows_of, tiled_loss, tiles

Tensor = torch.Tensor

__all__ = ["LORA_MODULES", "MAX_PIXELS", "Finetune", "add_lora", "aspl"]
#: the largest image ASPL takes: it attacks and fine-tunes on whole images (no tiles), and a personalisation
#: attacker trains at 512-1024 px anyway; resize larger images to the resolution a fine-tune would use
MAX_PIXELS = 1024 * 1024
#: the attention projections LoRA adapts by default (diffusers' attention modules)
LORA_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


@dataclasses.dataclass(frozen=True)
class Finetune:
    """The fine-tunes of :func:`aspl`: ``steps`` AdamW steps of ``lr`` per round and model, ``pgd_steps`` PGD steps per
    round; ``rank``: LoRA adapters of that rank on the attention projections (None: every weight, as the paper)."""

    steps: int = 3
    pgd_steps: int = 6
    lr: float = 5e-6
    rank: int | None = None
    #: LoRA target modules (module names or suffixes, peft's ``target_modules``)
    lora_modules: tuple[str, ...] = LORA_MODULES

    def __post_init__(self) -> None:
        _check_count("Finetune.steps", self.steps)
        _check_count("Finetune.pgd_steps", self.pgd_steps)
        check_real("Finetune.lr", self.lr, low=0.0)
        if self.lr == 0:
            raise ValueError("Finetune.lr must be > 0")
        if self.rank is not None:
            _check_count("Finetune.rank", self.rank, " or None")


def _check_count(name: str, value: object, alternative: str = "") -> None:
    """``ValueError`` unless ``value`` is a positive integer (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer{alternative}, got {value!r}")


def add_lora(
    model: nn.Module, rank: int, modules: Sequence[str] = LORA_MODULES, *, gaussian: bool = False, seed: int = 0
) -> tuple[nn.Module, list[nn.Parameter]]:
    """``model`` with LoRA adapters of ``rank`` (peft, ``lora_alpha = rank``) on ``modules``, and their parameters
    (trainable). The adapters' random init comes from ``seed`` (not the global generator); ``gaussian``: B drawn too
    (the adapted model starts away from ``model``), else B = 0 (it starts as ``model``)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=rank, lora_alpha=rank, init_lora_weights="gaussian" if gaussian else True, target_modules=list(modules)
    )
    with torch.random.fork_rng(devices=[]):  # peft draws the init from the global generator
        torch.manual_seed(seed)
        try:
            model = inject_adapter_in_model(config, model)
        except ValueError as error:  # peft: no module matches the target modules
            raise ValueError(f"{error} (LoRA target modules: {list(modules)})") from None
    params = [p for name, p in model.named_parameters() if "lora_" in name]
    for p in params:
        p.requires_grad_(True)
    return model, params


def _trainable(denoiser: nn.Module, settings: Finetune, seed: int) -> tuple[nn.Module, list[nn.Parameter]]:
    """A float32 copy of ``denoiser`` in eval mode (no dropout) and the parameters the fine-tunes train (AdamW on
    half-precision weights would lose its small updates)."""
    model = copy.deepcopy(denoiser).float().eval().requires_grad_(False)
    if settings.rank is None:
        params = [p for p in model.parameters() if p.is_floating_point()]
    else:
        model, params = add_lora(model, settings.rank, settings.lora_modules, seed=seed)
    if not params:
        raise ValueError("the denoiser has no parameters to fine-tune")
    return model, params


def _fit(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    z: Tensor,
    steps: int,
    alphas_cumprod: Tensor | None,
    generator: Generators,
    chunk: int | None = None,
) -> None:
    """``steps`` steps of the diffusion training loss on the latents ``z`` (every one in every step); ``chunk``:
    its gradient accumulated over that many latents at a time (a list of generators: one per latent)."""
    for p in params:
        p.requires_grad_(True)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            if chunk is None:
                denoising_loss(model, z, alphas_cumprod=alphas_cumprod, generator=generator).mean().backward()
            else:
                for start in range(0, z.shape[0], chunk):
                    part = slice(start, start + chunk)
                    loss = denoising_loss(
                        model, z[part], alphas_cumprod=alphas_cumprod, generator=rows_of(generator, part)
                    )
                    (loss.sum() / z.shape[0]).backward()
            optimizer.step()
    for p in params:  # the PGD steps differentiate in the images only
        p.grad = None
        p.requires_grad_(False)


def _shifted(callback: Callable[[int, Tensor, Tensor], bool | None], offset: int, i: int, x: Tensor, loss: Tensor):
    return callback(offset + i, x, loss)


def aspl(
    images: Tensor,
    vae: AutoencoderKL,
    denoiser: nn.Module,
    *,
    eps: float = 8 / 255,
    steps: int = 300,
    step: float | None = None,
    finetune: Finetune | None = None,
    alphas_cumprod: Tensor | None = None,
    generator: Generators = None,
    robust: Sequence[str] = (),
    callback: Callable[[int, Tensor, Tensor], bool | None] | None = None,
    tile: int | None = None,
) -> Tensor:
    """Protect ``images`` (N, 3, H, W) in [0, 1] by ASPL against fine-tuning ``denoiser`` on them.

    Args:
        denoiser: an ``nn.Module`` called as ``denoiser(z_t, t)`` on scaled latents of ``vae`` and integer
            timesteps, returning the noise prediction (or an output with ``.sample``; learned-variance channels are
            dropped). A UNet2DModel is one; wrap a conditional model with its conditioning (a class, an instance
            prompt's embeddings) for all the images.
        steps: PGD steps in all, run ``finetune.pgd_steps`` per round (the last round may run fewer).
        step: the signed-gradient step size (default ``2.5 eps / steps``, as :func:`protect.pgd.pgd`).
        alphas_cumprod: the denoiser's noise schedule (default: Stable Diffusion's).
        generator: the randomness of the PGD start, the timesteps and noise of the PGD and fine-tune losses.
        robust: EOT transformations for the PGD steps (:data:`protect.purify.EOT`).
        callback: ``callback(i, x, loss)`` after the loss of PGD step ``i`` (counted over the rounds), as
            :func:`protect.pgd.pgd`; returning ``False`` stops the protection.
        tile: fine-tune on the images' ``tile`` x ``tile`` crops and attack the mean loss over each image's crops
            (any size, cost in proportion to the pixels); None: whole images, up to :data:`MAX_PIXELS`.
    """
    if not isinstance(denoiser, nn.Module):
        raise ValueError(
            "ASPL fine-tunes the denoiser: pass an nn.Module called as denoiser(z_t, t) (a UNet2DModel, or a module "
            f"wrapping a conditional model with its conditioning), got {type(denoiser).__name__}"
        )
    settings = finetune or Finetune()
    height, width = images.shape[-2:]
    if tile is None and height * width > MAX_PIXELS:
        raise ValueError(
            f"ASPL attacks and fine-tunes on whole images; {width}x{height} is above its {MAX_PIXELS} pixels "
            "(1024x1024): resize the images to the resolution a fine-tune would train at (512-1024 px)"
        )
    _check_count("steps", steps)
    step = 2.5 * eps / steps if step is None else step
    seed = 0
    if settings.rank is not None:  # the LoRA init, too, comes from the generator
        seed = int(draw(2**31 - 1, (1,), generator[0] if isinstance(generator, list | tuple) else generator, images))
    model, params = _trainable(denoiser, settings, seed)
    theta = [p.detach().clone() for p in params]  # the attacker's model between rounds
    attacker = torch.optim.AdamW(params, lr=settings.lr)  # its optimiser state carries over the rounds
    per_image, chunk, draws = 1, None, generator
    if tile is not None:  # the set is the crops, tile-major; image i's generator serves its crops
        per_image, chunk = crops_per_image(images, tile), TILE_BATCH * images.shape[0]
        draws = crop_generators(generator, images.shape[0], per_image)
    crops = images if tile is None else tiles(images, tile)

    def encoded(x: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cat([latent(vae, part) for part in x.split(chunk or x.shape[0])])

    clean = encoded(crops)

    def restore(values: list[Tensor]) -> None:
        with torch.no_grad():
            for p, v in zip(params, values):
                p.copy_(v)

    def crop_loss(rows: slice = slice(None)) -> Callable[[Tensor], Tensor]:  # of those crops, negated for PGD
        some = rows_of(draws, rows)
        return lambda x: -denoising_loss(model, latent(vae, x), alphas_cumprod=alphas_cumprod, generator=some)

    surrogate_loss = crop_loss() if tile is None else functools.partial(tiled_loss, crop_loss, tile, per_image)

    x, done = None, 0
    for _ in range(math.ceil(steps / settings.pgd_steps)):
        restore(theta)  # theta' = theta, fine-tuned on the clean images
        surrogate = torch.optim.AdamW(params, lr=settings.lr)
        _fit(model, params, surrogate, clean, settings.steps, alphas_cumprod, draws, chunk)
        count = min(settings.pgd_steps, steps - done)
        x = pgd(
            images,
            surrogate_loss,
            eps=eps,
            step=step,
            steps=count,
            generator=generator,
            robust=robust,
            start=x,
            callback=None if callback is None else functools.partial(_shifted, callback, done),
        )
        done += count
        restore(theta)  # theta, fine-tuned on the perturbed images, as the attacker does
        perturbed = encoded(x if tile is None else tiles(x, tile))
        _fit(model, params, attacker, perturbed, settings.steps, alphas_cumprod, draws, chunk)
        theta = [p.detach().clone() for p in params]
    return x
