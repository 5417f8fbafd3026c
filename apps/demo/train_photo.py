"""Train the photo demo models on the photo corpus (``apps.demo.photos``; held-out photos never seen).

    python -m apps.demo.train_photo {vae,vae_b,unet,ldm} --out DIR [--steps N] [--batch-size B] [--crop PX]
        [--seed S] [--threads T] [--checkpoints CKDIR --checkpoint-every N] [--export] [--warm-start DIR]

Each model lands in ``DIR/photo_<name>/`` (diffusers ``save_pretrained``, safetensors) with a ``README.md`` model
card (data, held-out split, settings, losses, metrics, wall time) and ``training.json`` (the loss curve):

- ``vae``: SD-like ``AutoencoderKL``, downsampling 8, 4 latent channels, (16, 32, 64, 64) channels, no attention
  (``mid_block_add_attention=False``): fully convolutional, cost linear in pixels. Reconstruction PSNR on the
  held-out photos at native resolution, against a bicubic down/up baseline of the same stride.
- ``vae_b``: a second design, downsampling 4, (24, 48, 64) channels, 4 latent channels, also attention-free.
- ``unet``: unconditional pixel ``UNet2DModel`` (eps, DDPM 1000 linear steps) on 32x32 photo patches with JPEG,
  resize and mild-noise augmentation (``photos.benign_processing``): the DiffPure purifier and EPS-AD score model.
- ``ldm``: an unconditional latent ``UNet2DModel`` on ``photo_vae`` latents (``--vae``, default ``DIR/photo_vae``),
  saved as ``unet/`` + ``scheduler/`` + ``latent_vae.json`` (the VAE it needs and its scaling factor).

Optimisation (AdamW, warm-up + cosine, EMA, resumable ``Checkpoint``) is ``apps.demo.train``'s. ``--export`` skips
training: it loads the checkpoint of an unfinished run, takes its EMA weights, evaluates and saves them (the card
says how many of the planned steps were done). ``--warm-start DIR`` continues such an exported run (e.g. the committed
``demo_models/photo_<name>``, when the checkpoint file did not survive) up to ``--steps``: weights, step count, losses
and the schedule carry on; AdamW starts afresh with a 50-step LR re-warm-up; the card says so.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.torch import load_file
from torch import nn

from protect.losses import vae_stride

from ..device import best_device
from .photos import HELD_OUT, TRAIN, PhotoStream, benign_processing, held_out_photos
from .train import (
    EMA,
    Checkpoint,
    Report,
    WarmStart,
    add_training_arguments,
    diffusion_loss,
    final_loss,
    folder_size,
    optimise,
    run_rows,
    sampling_scheduler,
    save_sheet,
    seeded,
    training_scheduler,
    warmup_cosine,
)

MODELS = ("vae", "vae_b", "unet", "ldm")
TINY_RUN = 100  # runs with fewer steps (smoke tests) get a token evaluation
EVAL_STREAM_SEED = 1_000_003  # a separate crop stream (training photos) for the latent scaling factor
EMA_DECAY = 0.999


@dataclass(frozen=True)
class Defaults:
    """Per-model settings of the CPU run, and of a fuller (GPU) run."""

    steps: int
    batch_size: int
    lr: float
    crop: int
    full_steps: int
    full_batch_size: int


DEFAULTS = {
    "vae": Defaults(steps=3000, batch_size=8, lr=1e-3, crop=96, full_steps=50000, full_batch_size=32),
    "vae_b": Defaults(steps=3000, batch_size=8, lr=1e-3, crop=96, full_steps=50000, full_batch_size=32),
    "unet": Defaults(steps=3000, batch_size=32, lr=1e-3, crop=32, full_steps=100000, full_batch_size=128),
    "ldm": Defaults(steps=3000, batch_size=16, lr=1e-3, crop=128, full_steps=100000, full_batch_size=64),
}


@dataclass
class PhotoRun:
    """Settings of one invocation."""

    name: str
    out: Path
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    crop: int | None = None
    vae_path: Path | None = None
    checkpoints: Path | None = None
    checkpoint_every: int = 100
    export: bool = False
    export_weights: str = "ema"
    warm_start: Path | None = None
    command: str = ""

    @property
    def defaults(self) -> Defaults:
        return DEFAULTS[self.name]

    @property
    def total_steps(self) -> int:
        return self.steps or self.defaults.steps

    @property
    def batch(self) -> int:
        return self.batch_size or self.defaults.batch_size

    @property
    def peak_lr(self) -> float:
        return self.lr or self.defaults.lr

    @property
    def crop_size(self) -> int:
        return self.crop or self.defaults.crop

    @property
    def tiny(self) -> bool:
        return self.total_steps < TINY_RUN

    @property
    def folder(self) -> Path:
        return self.out / f"photo_{self.name}"

    def checkpoint(self, *generators: torch.Generator) -> Checkpoint | None:
        if self.checkpoints is None:
            if self.export:
                raise ValueError("--export needs --checkpoints (the folder of the run to export)")
            return None
        return Checkpoint(self.checkpoints / f"photo_{self.name}.pt", self.checkpoint_every, generators)


# ----------------------------------------------------------------------------- models


def make_photo_vae() -> AutoencoderKL:
    """SD-like AutoencoderKL: stride 8, 4 latent channels, (16, 32, 64, 64) channels, no attention (~0.94 M)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=128,
        mid_block_add_attention=False,
    )


def make_photo_vae_b() -> AutoencoderKL:
    """A second design: stride 4, (24, 48, 64) channels, 4 latent channels, no attention."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(24, 48, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=128,
        mid_block_add_attention=False,
    )


def make_photo_unet(size: int = 32) -> UNet2DModel:
    """Pixel eps UNet for photo patches: (32, 64, 64) channels, one layer per block, attention at 16 px."""
    return UNet2DModel(
        sample_size=size,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=16,
    )


def make_latent_unet(size: int, channels: int) -> UNet2DModel:
    """Latent eps UNet: (32, 64, 64) channels, one layer per block, attention at the middle level (~1.1 M)."""
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=16,
    )


# ----------------------------------------------------------------------------- losses and metrics


def gradient_l1(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between horizontal and vertical finite differences: a cheap edge-sharpness term."""
    dx = lambda x: x[..., :, 1:] - x[..., :, :-1]
    dy = lambda x: x[..., 1:, :] - x[..., :-1, :]
    return F.l1_loss(dx(recon), dx(target)) + F.l1_loss(dy(recon), dy(target))


def vae_loss(vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """L1 + MSE + 0.5 gradient L1 + 1e-6 KL of one reconstruction from a posterior sample."""
    posterior = vae.encode(images).latent_dist
    recon = vae.decode(posterior.sample(generator=generator)).sample
    rec = F.l1_loss(recon, images) + F.mse_loss(recon, images) + 0.5 * gradient_l1(recon, images)
    return rec + 1e-6 * posterior.kl().mean()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(a.float().clamp(-1, 1), b.float().clamp(-1, 1)).item()
    return 10 * math.log10(4 / max(mse, 1e-12))


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, image: torch.Tensor, tile: int = 1024) -> torch.Tensor:
    """Posterior-mean round trip of one image (3, H, W) at native resolution.

    Reflect-padded to a multiple of the stride. Images larger than ``tile`` px go through in tiles (each with 32 px
    of context, cropped back) so memory stays bounded; GroupNorm statistics are then per tile, so a tiled result
    differs slightly from a whole-image one (the held-out photos, at most 640 px, are never tiled).
    """
    stride = vae_stride(vae)
    height, width = image.shape[-2:]
    pad_h, pad_w = (-height) % stride, (-width) % stride
    x = F.pad(image[None], (0, pad_w, 0, pad_h), mode="reflect" if min(height, width) > 1 else "replicate")
    x = x.to(vae.device, vae.dtype)
    if max(x.shape[-2:]) <= tile:
        return vae.decode(vae.encode(x).latent_dist.mean).sample[0, :, :height, :width].float()
    margin = 32
    out = torch.zeros_like(x)
    for top in range(0, x.shape[-2], tile):
        for left in range(0, x.shape[-1], tile):
            t0, l0 = max(0, top - margin), max(0, left - margin)
            t1, l1 = min(x.shape[-2], top + tile + margin), min(x.shape[-1], left + tile + margin)
            piece = x[..., t0:t1, l0:l1]
            rec = vae.decode(vae.encode(piece).latent_dist.mean).sample
            h, w = min(tile, x.shape[-2] - top), min(tile, x.shape[-1] - left)
            out[..., top : top + h, left : left + w] = rec[..., top - t0 : top - t0 + h, left - l0 : left - l0 + w]
    return out[0, :, :height, :width].float()


def bicubic_baseline(image: torch.Tensor, stride: int) -> torch.Tensor:
    """Bicubic downsample by ``stride`` (antialiased) and back up: the spatial-compression baseline."""
    height, width = image.shape[-2:]
    small = F.interpolate(image[None], scale_factor=1 / stride, mode="bicubic", antialias=True)
    return F.interpolate(small, size=(height, width), mode="bicubic", align_corners=False)[0].clamp(-1, 1)


# ----------------------------------------------------------------------------- training


def noise_generator(run: PhotoRun) -> torch.Generator:
    return torch.Generator(run.device).manual_seed(run.seed + 1)


def train_model(
    run: PhotoRun, model: nn.Module, loss_fn: Callable[[int], torch.Tensor], generators: tuple[torch.Generator, ...]
) -> tuple[list[float], float, int]:
    """Train (or, with ``--export``, restore the checkpoint of) ``model``; EMA weights end up in the model.

    Returns the losses, seconds per step, and the number of steps done.
    """
    ema = EMA(model, EMA_DECAY)
    checkpoint = run.checkpoint(*generators)
    if run.export:
        optimiser = torch.optim.AdamW(model.parameters(), lr=run.peak_lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, warmup_cosine(1, run.total_steps))
        losses: list[float] = []
        assert checkpoint is not None
        if not checkpoint.path.is_file():
            raise FileNotFoundError(f"no checkpoint to export at {checkpoint.path}")
        done = checkpoint.restore(model, optimiser, schedule, ema, losses)
        if run.export_weights == "ema":
            ema.copy_to(model)
        model.eval()
        return losses, float("nan"), done
    warm = load_warm_start(run, model) if run.warm_start is not None else None
    if warm is not None:
        for generator in generators:  # new crops and noise, not a replay of the first steps
            generator.manual_seed(generator.initial_seed() + warm.step)
    losses, per_step = optimise(
        model, loss_fn, run.total_steps, run.peak_lr, f"photo_{run.name}", ema, checkpoint, warm
    )
    return losses, per_step, run.total_steps


WEIGHTS_FILE = {"vae": ".", "vae_b": ".", "unet": "unet", "ldm": "unet"}  # where each model's weights sit


def load_warm_start(run: PhotoRun, model: nn.Module) -> WarmStart:
    """Load the weights of an exported run of the same model into ``model``; return where that run stopped.

    The folder must be one this script wrote (``training.json`` beside the weights, same model and design) and the
    run must be unfinished: its steps fewer than ``--steps``.
    """
    assert run.warm_start is not None
    folder = run.warm_start
    record_path = folder / "training.json"
    weights = folder / WEIGHTS_FILE[run.name] / "diffusion_pytorch_model.safetensors"
    if not record_path.is_file():
        raise FileNotFoundError(f"--warm-start {folder}: not an exported photo_{run.name} (no training.json)")
    record = json.loads(record_path.read_text())
    if record.get("name") != f"photo_{run.name}":
        raise ValueError(f"--warm-start {folder} holds {record.get('name')!r}, not photo_{run.name}")
    if not weights.is_file():
        raise FileNotFoundError(f"--warm-start {folder}: not an exported photo_{run.name} (no {weights.name})")
    done = int(record["steps"])
    if done >= run.total_steps:
        raise ValueError(f"--warm-start {folder} already ran {done} steps; ask for more with --steps (> {done})")
    state = load_file(str(weights), device=str(run.device))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"--warm-start {folder}: its weights do not fit this photo_{run.name} design") from error
    print(f"warm start from {folder} at step {done}", file=sys.stderr, flush=True)
    return WarmStart(step=done, losses=tuple(record.get("losses", [])))


def train_vae(run: PhotoRun) -> Report:
    """Train a photo AutoencoderKL; set its scaling factor from training crops; evaluate on held-out photos."""
    factory = make_photo_vae if run.name == "vae" else make_photo_vae_b
    vae = seeded(run.seed, factory).to(run.device)
    stream, noise = PhotoStream(run.crop_size, seed=run.seed), noise_generator(run)

    def loss_fn(step: int) -> torch.Tensor:
        return vae_loss(vae, stream.sample(run.batch).to(run.device), noise)

    losses, per_step, done = train_model(run, vae, loss_fn, (stream.generator, noise))
    report = Report(f"photo_{run.name}", done, run.batch, run.peak_lr, losses, step_seconds=per_step)
    report.metrics.update(evaluate_vae(vae, run))
    vae.save_pretrained(run.folder, safe_serialization=True)
    return report


@torch.no_grad()
def evaluate_vae(vae: AutoencoderKL, run: PhotoRun) -> dict[str, Any]:
    """Scaling factor (1 / std of training-crop latents); held-out PSNR at native resolution vs bicubic."""
    vae.eval()
    crops = PhotoStream(128, seed=EVAL_STREAM_SEED).sample(8 if run.tiny else 64).to(run.device, vae.dtype)
    latents = torch.cat([vae.encode(c).latent_dist.mean for c in crops.split(8)])
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    stride = vae_stride(vae)
    metrics: dict[str, Any] = {
        "scaling_factor": vae.config.scaling_factor,
        "stride": stride,
        "latent_channels": vae.config.latent_channels,
        "parameters_M": sum(p.numel() for p in vae.parameters()) / 1e6,
    }
    photos = held_out_photos()
    if run.tiny:  # smoke tests: a corner of each photo
        photos = {k: v[:, :64, :64] for k, v in photos.items()}
    shown = []
    for name, image in photos.items():
        recon = reconstruct(vae, image.to(run.device)).cpu()
        metrics[f"heldout_{name}_psnr_db"] = psnr(recon, image)
        metrics[f"heldout_{name}_bicubic_psnr_db"] = psnr(bicubic_baseline(image, stride), image)
        metrics[f"heldout_{name}_size"] = f"{image.shape[-1]}x{image.shape[-2]}"
        shown.append(torch.stack([image[:, :128, :128], recon[:, :128, :128]]))
    metrics["heldout_mean_psnr_db"] = float(np.mean([metrics[f"heldout_{n}_psnr_db"] for n in photos]))
    metrics["heldout_mean_bicubic_psnr_db"] = float(np.mean([metrics[f"heldout_{n}_bicubic_psnr_db"] for n in photos]))
    sheet = torch.cat([torch.stack([s[0] for s in shown]), torch.stack([s[1] for s in shown])])
    save_sheet(sheet, rows=2, path=run.folder / "heldout_crops_top_original_bottom_reconstruction.png")
    return metrics


def train_unet(run: PhotoRun) -> Report:
    """Train the pixel eps UNet on augmented patches (benign processing); save a DDPMPipeline."""
    model = seeded(run.seed, lambda: make_photo_unet(run.crop_size)).to(run.device)
    stream, noise = PhotoStream(run.crop_size, seed=run.seed), noise_generator(run)
    process = torch.Generator().manual_seed(run.seed + 2)
    scheduler = training_scheduler()

    def loss_fn(step: int) -> torch.Tensor:
        images = benign_processing(stream.sample(run.batch), process).to(run.device)
        return diffusion_loss(lambda x, t: model(x, t).sample, images, scheduler, noise)

    losses, per_step, done = train_model(run, model, loss_fn, (stream.generator, noise, process))
    report = Report(f"photo_{run.name}", done, run.batch, run.peak_lr, losses, step_seconds=per_step)
    report.metrics.update(evaluate_eps(lambda x, t: model(x, t).sample, heldout_patches(run), scheduler, run))
    pipe = DDPMPipeline(unet=model, scheduler=scheduler)
    report.metrics.update(sample_sheet_unet(pipe, run))
    pipe.save_pretrained(run.folder, safe_serialization=True)
    return report


def heldout_patches(run: PhotoRun, n: int = 256) -> torch.Tensor:
    """Seeded native-resolution patches of the held-out photos (no augmentation), for held-out losses."""
    n = 16 if run.tiny else n
    stream = PhotoStream(run.crop_size, seed=EVAL_STREAM_SEED, max_scale=1.0, augment=False, split="held_out")
    return stream.sample(n)


@torch.no_grad()
def evaluate_eps(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    clean: torch.Tensor,
    scheduler: DDPMScheduler,
    run: PhotoRun,
    prefix: str = "heldout",
) -> dict[str, Any]:
    """Eps-prediction MSE on held-out data at t = 50, 200, 500 (fixed noise)."""
    generator = torch.Generator().manual_seed(run.seed)
    metrics: dict[str, Any] = {f"{prefix}_patches": len(clean)}
    for t in (50, 200, 500):
        noise = torch.randn(clean.shape, generator=generator)
        steps = torch.full((len(clean),), t, dtype=torch.long)
        noisy = scheduler.add_noise(clean, noise, steps)
        pred = torch.cat(
            [model_fn(x.to(run.device), s.to(run.device)).cpu() for x, s in zip(noisy.split(64), steps.split(64))]
        )
        metrics[f"{prefix}_eps_mse_t{t}"] = F.mse_loss(pred, noise).item()
    return metrics


@torch.no_grad()
def sample_sheet_unet(pipe: DDPMPipeline, run: PhotoRun) -> dict[str, Any]:
    """16 DDPM samples (100 steps; 5 for tiny runs) as a contact sheet."""
    steps = 5 if run.tiny else 100
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(run.device).manual_seed(run.seed)
    images = pipe(16, generator=generator, num_inference_steps=steps, output_type="pt").images * 2 - 1
    save_sheet(images, rows=2, path=run.folder / "samples.png")
    return {"sample_sheet": f"DDPM {steps} steps"}


def load_photo_vae(path: Path, device: torch.device) -> AutoencoderKL:
    vae = AutoencoderKL.from_pretrained(str(path), use_safetensors=True, local_files_only=True).to(device)
    return vae.eval().requires_grad_(False)


def train_ldm(run: PhotoRun) -> Report:
    """Train an unconditional latent eps UNet on (scaled) photo_vae posterior samples of training crops."""
    vae_path = run.vae_path or run.out / "photo_vae"
    vae = load_photo_vae(vae_path, run.device)
    stride, channels, scale = vae_stride(vae), vae.config.latent_channels, vae.config.scaling_factor
    if run.crop_size % stride:
        raise ValueError(f"--crop {run.crop_size} must be a multiple of the VAE stride {stride}")
    latent_size = run.crop_size // stride
    model = seeded(run.seed, lambda: make_latent_unet(latent_size, channels)).to(run.device)
    stream, noise = PhotoStream(run.crop_size, seed=run.seed), noise_generator(run)
    scheduler = training_scheduler()

    def encode(images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        with torch.no_grad():
            posterior = vae.encode(images.to(run.device)).latent_dist
            return (posterior.sample(generator=generator) if generator is not None else posterior.mean) * scale

    def loss_fn(step: int) -> torch.Tensor:
        latents = encode(stream.sample(run.batch), noise)
        return diffusion_loss(lambda x, t: model(x, t).sample, latents, scheduler, noise)

    losses, per_step, done = train_model(run, model, loss_fn, (stream.generator, noise))
    report = Report(f"photo_{run.name}", done, run.batch, run.peak_lr, losses, step_seconds=per_step)
    patches = PhotoStream(run.crop_size, seed=EVAL_STREAM_SEED, max_scale=1.0, augment=False, split="held_out")
    clean = torch.cat([encode(c, None).cpu() for c in patches.sample(8 if run.tiny else 64).split(16)])
    report.metrics["latent_size"] = f"{channels}x{latent_size}x{latent_size}"
    report.metrics.update(evaluate_eps(lambda x, t: model(x, t).sample, clean, scheduler, run))
    run.folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(run.folder / "unet", safe_serialization=True)
    scheduler.save_pretrained(run.folder / "scheduler")
    info = {"vae": "demo/photo_vae", "trained_against": str(vae_path), "scaling_factor": scale, "stride": stride}
    (run.folder / "latent_vae.json").write_text(json.dumps(info, indent=2) + "\n")
    report.metrics.update(sample_sheet_ldm(model, vae, scheduler, run, latent_size, channels))
    return report


@torch.no_grad()
def sample_sheet_ldm(
    model: UNet2DModel, vae: AutoencoderKL, scheduler: DDPMScheduler, run: PhotoRun, size: int, channels: int
) -> dict[str, Any]:
    """8 DDIM samples (50 steps; 3 for tiny runs) decoded by the VAE, as a contact sheet."""
    steps = 3 if run.tiny else 50
    sampler: DDIMScheduler = sampling_scheduler(scheduler.config)
    sampler.set_timesteps(steps)
    generator = torch.Generator(run.device).manual_seed(run.seed)
    x = torch.randn((8, channels, size, size), generator=generator, device=run.device)
    for t in sampler.timesteps:
        x = sampler.step(model(x, t).sample, t, x).prev_sample
    images = vae.decode(x / vae.config.scaling_factor).sample.clamp(-1, 1)
    save_sheet(images, rows=2, path=run.folder / "samples.png")
    return {"sample_sheet": f"DDIM {steps} steps"}


TRAINERS: dict[str, Callable[[PhotoRun], Report]] = {
    "vae": train_vae,
    "vae_b": train_vae,
    "unet": train_unet,
    "ldm": train_ldm,
}


# ----------------------------------------------------------------------------- model cards

DESCRIPTIONS = {
    "vae": "SD-like `AutoencoderKL`: downsampling 8, 4 latent channels, (16, 32, 64, 64) channels, one layer per "
    "block, no attention (`mid_block_add_attention=False`): fully convolutional, cost linear in pixels, encodes "
    "any resolution (pad to a multiple of 8). `config.scaling_factor` = 1 / std of training-crop latents. "
    "Loss: L1 + MSE + 0.5 L1 of image gradients + 1e-6 KL.",
    "vae_b": "`AutoencoderKL`, a second design: downsampling 4, 4 latent channels, (24, 48, 64) channels, one layer "
    "per block, no attention: fully convolutional. `config.scaling_factor` = 1 / std of training-crop latents. "
    "Loss: L1 + MSE + 0.5 L1 of image gradients + 1e-6 KL.",
    "unet": "`DDPMPipeline` (unconditional): a pixel-space eps `UNet2DModel` on 32x32 photo patches, (32, 64, 64) "
    "channels, one layer per block, attention at 16 px, linear betas over 1000 steps, EMA weights. Trained with "
    "JPEG (q50-95), resize (x0.5-0.9 and back) and mild Gaussian noise (sigma <= 5/255) augmentation, each with "
    "probability 0.3, so that benign processing stays in-distribution. The DiffPure purifier and the EPS-AD "
    "score model of the photo detector.",
    "ldm": "Unconditional latent eps `UNet2DModel` (`unet/`, (32, 64, 64) channels, attention at the middle "
    "level) with its DDPM `scheduler/` (1000 linear steps), on scaled `photo_vae` posterior samples of 128 px "
    "crops; EMA weights. `latent_vae.json` names the VAE and its scaling factor. For SDEdit mimicry.",
}


def write_card(run: PhotoRun, report: Report) -> Path:
    """Write ``README.md`` and ``training.json`` beside the saved weights."""
    folder = run.folder
    d = run.defaults
    record = {**asdict(report), "losses": [float(f"{x:.5g}") for x in report.losses], "command": run.command}
    record["planned_steps"] = run.total_steps
    record["warm_start"] = str(run.warm_start) if run.warm_start is not None else None
    (folder / "training.json").write_text(json.dumps(record) + "\n")
    pictures = "\n".join(f"![{p.stem}]({p.name})" for p in sorted(folder.glob("*.png")))
    done = (
        f"{report.steps} of {run.total_steps} planned (the {run.export_weights.upper()} weights of a checkpoint of "
        "an unfinished run)"
        if run.export
        else str(report.steps)
    )
    if run.warm_start is not None:
        done += f" (continued from the exported `{run.warm_start}`: fresh AdamW state, LR re-warmed over 50 steps)"
    text = f"""# steerguard photo demo model: photo_{run.name}

{DESCRIPTIONS[run.name]}

## Data
The photo corpus of `apps/demo/photos.py` (scikit-image and scikit-learn sample photos, offline), split by source
photo. Training photos: {", ".join(TRAIN)}. **Held out, never trained on**: {", ".join(HELD_OUT)} (the metrics
below use them, at native resolution for the VAEs). Seeded square crops of {run.crop_size} px, multi-scale
(log-uniform zoom x1-x4), flips, rotations by 90 degrees, colour jitter; grey photos expanded to RGB (seed {run.seed}).

## Training
| setting | value |
|---|---|
| command | `{run.command}` |
| steps | {done} |
| batch size | {report.batch_size} |
| crop | {run.crop_size} px |
| optimiser | AdamW (weight decay 0.01), lr {report.lr:g}, warm-up, cosine decay over {run.total_steps} steps, clip 1 |
| EMA | {EMA_DECAY} (with (1+t)/(10+t) warm-up); these are the {run.export_weights.upper()} weights |
{run_rows(report, run.device, folder)}

{pictures}

## A fuller run
These weights come from a short CPU budget. On a GPU:
`python -m apps.demo.train_photo {run.name} --out demo_models --steps {d.full_steps} --batch-size {d.full_batch_size} \
--seed {run.seed} --device cuda` (the learning rate schedule follows `--steps`).
"""
    card = folder / "README.md"
    card.write_text(text)
    return card


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(prog="python -m apps.demo.train_photo", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=MODELS)
    parser.add_argument("--out", type=Path, required=True, help="output folder; the model goes to OUT/photo_<name>/")
    add_training_arguments(parser, checkpoint_every=100)
    parser.add_argument("--crop", type=int, help="training crop size in pixels (default: per model)")
    parser.add_argument("--vae", type=Path, help="photo VAE folder for ldm (default: OUT/photo_vae)")
    parser.add_argument(
        "--warm-start",
        type=Path,
        help="continue an exported, unfinished run (a folder this script wrote, e.g. demo_models/photo_vae) up to "
        "--steps: its weights, step count and losses carry on; the optimiser state starts afresh",
    )
    parser.add_argument(
        "--export", action="store_true", help="no training: save the EMA weights of the checkpoint in --checkpoints"
    )
    parser.add_argument(
        "--export-weights",
        choices=("ema", "raw"),
        default="ema",
        help="with --export: the EMA (default) or the raw weights of the checkpoint (early in a run, the EMA still "
        "averages in the first steps)",
    )
    args = parser.parse_args(None if argv is None else list(argv))
    for flag in ("steps", "batch_size", "crop", "checkpoint_every"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be positive, got {value}")
    return args


def main(argv: Iterable[str] | None = None) -> Path:
    """Train (or export) one photo model; return the path of its model card."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else best_device()[0]
    command = "python -m apps.demo.train_photo " + " ".join(sys.argv[1:] if argv is None else list(argv))
    run = PhotoRun(
        name=args.model,
        out=args.out,
        seed=args.seed,
        device=device,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        crop=args.crop,
        vae_path=args.vae,
        checkpoints=args.checkpoints,
        checkpoint_every=args.checkpoint_every,
        export=args.export,
        export_weights=args.export_weights,
        warm_start=args.warm_start,
        command=command,
    )
    start = time.perf_counter()
    report = TRAINERS[args.model](run)
    report.seconds = time.perf_counter() - start
    card = write_card(run, report)
    print(
        f"photo_{args.model}: {report.steps} steps, final loss {final_loss(report.losses):.4f}, "
        f"{report.seconds:.0f} s, {folder_size(run.folder) / 1e6:.2f} MB, {json.dumps(report.metrics)}",
        flush=True,
    )
    return card


if __name__ == "__main__":
    main()
