"""Train the embedded demo models from scratch on the procedural shapes data.

    python -m apps.demo.train {classifier,vae,dit,unet,vae_b,all} --out DIR [--steps N] [--batch-size B] [--seed S]

Each model lands in ``DIR/<name>/`` (diffusers ``save_pretrained``, safetensors)
with a ``README.md`` model card: data, settings, final losses, metrics, wall time.
``dit`` needs a trained VAE (``DIR/vae`` or ``--vae``); the metrics of ``vae``,
``dit`` and ``unet`` use the classifier in ``DIR/classifier`` when it exists.
``all`` trains classifier, vae, dit, unet, vae_b in that order (``vae_b``: a second autoencoder for the
multi-VAE protection loss; the amortized protector is trained by ``python -m apps.train_protector``). Training
uses float32, AdamW with linear warm-up and cosine decay, and an EMA of the diffusion models.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    UNet2DModel,
)
from diffusers.models.embeddings import LabelEmbedding
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from protect.metrics import frechet_distance

from ..device import best_device
from .classifier import ShapeClassifier, accuracy, batched, load_classifier
from .data import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES, contact_sheet, generate

MODELS = ("classifier", "vae", "dit", "unet", "vae_b")
NULL_LABEL = 1000  # DiTPipeline hard-codes class 1000 as the unconditional label
LABEL_DROPOUT = 0.1
TINY_RUN = 100  # runs with fewer steps (smoke tests) get a minimal evaluation
EVAL_SEED_OFFSET = 1_000_003  # held-out data comes from a different generator stream than training data
DIT_HEAD_DIM = 32
DIT_LAYERS, DIT_WIDTH = 4, 128  # the committed demo DiT's shape (--dit-layers, --dit-width)
LATENT_BANK = 65536  # at most this many training images are encoded once for the DiT (re-sampled posteriors)


@dataclass(frozen=True)
class Defaults:
    """Per-model settings: what the committed CPU run used, and what a full (GPU) run should use."""

    steps: int
    batch_size: int
    lr: float
    full_steps: int
    full_batch_size: int


DEFAULTS = {
    "classifier": Defaults(steps=600, batch_size=128, lr=2e-3, full_steps=3000, full_batch_size=256),
    "vae": Defaults(steps=300, batch_size=64, lr=1e-3, full_steps=20000, full_batch_size=128),
    "dit": Defaults(steps=800, batch_size=128, lr=1e-3, full_steps=100000, full_batch_size=256),
    "unet": Defaults(steps=1000, batch_size=64, lr=1e-3, full_steps=100000, full_batch_size=128),
    "vae_b": Defaults(steps=300, batch_size=64, lr=1e-3, full_steps=20000, full_batch_size=128),
}


@dataclass
class Run:
    """Settings shared by every model of one invocation."""

    out: Path
    seed: int
    device: torch.device
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    image_size: int = IMAGE_SIZE
    eval_samples: int | None = None
    vae_path: Path | None = None
    command: str = ""
    checkpoints: Path | None = None
    checkpoint_every: int = 250
    dit_layers: int = DIT_LAYERS
    dit_width: int = DIT_WIDTH
    init: Path | None = None
    snr_gamma: float | None = None

    def checkpoint(self, name: str, *generators: torch.Generator) -> Checkpoint | None:
        """The resumable checkpoint of model ``name`` under ``--checkpoints``, if one was asked for."""
        if self.checkpoints is None:
            return None
        return Checkpoint(self.checkpoints / f"{name}.pt", self.checkpoint_every, generators)

    def settings(self, name: str) -> tuple[int, int, float]:
        """Steps, batch size and learning rate for model ``name`` (CLI values override the defaults)."""
        d = DEFAULTS[name]
        return self.steps or d.steps, self.batch_size or d.batch_size, self.lr or d.lr

    @property
    def tiny(self) -> bool:
        """A smoke-test budget (``--steps`` below ``TINY_RUN``): evaluation shrinks to a token size."""
        return self.steps is not None and self.steps < TINY_RUN

    def n_eval(self, default: int) -> int:
        """Number of evaluation samples: ``--eval-samples``, else one per class for tiny runs, else ``default``."""
        if self.eval_samples is not None:
            return self.eval_samples
        return NUM_CLASSES if self.tiny else default

    def sampler_steps(self, default: int) -> int:
        """Sampling steps for evaluation: ``default``, at most 5 for tiny runs."""
        return min(default, 5) if self.tiny else default

    def data_generator(self, offset: int = 0) -> torch.Generator:
        """CPU generator for the data stream (``offset`` selects an independent stream)."""
        return torch.Generator().manual_seed(self.seed + offset)

    def noise_generator(self) -> torch.Generator:
        """Generator on the training device for noise, timesteps and label dropout."""
        return torch.Generator(self.device).manual_seed(self.seed + 1)


@dataclass
class Report:
    """What a training run produced, for the model card."""

    name: str
    steps: int
    batch_size: int
    lr: float
    losses: list[float] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    step_seconds: float = 0.0


# ----------------------------------------------------------------------------- optimisation helpers


def seeded(seed: int, factory: Callable[[], nn.Module]) -> nn.Module:
    """Build a module with its weights initialised from ``seed``, leaving the global RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


class EMA:
    """Exponential moving average of a model's parameters, with the usual (1+t)/(10+t) warm-up of the decay."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.shadow = [p.detach().clone() for p in model.parameters()]
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the averages towards the model's current parameters."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in model.parameters()], 1 - decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the averages."""
        for target, average in zip(model.parameters(), self.shadow, strict=True):
            target.copy_(average)


@dataclass
class Checkpoint:
    """Where a long run saves its state every ``every`` steps, and the generators whose states travel with it.

    The file holds tensors, dicts and lists only, and is read back with ``torch.load(weights_only=True)``.
    """

    path: Path
    every: int = 250
    generators: tuple[torch.Generator, ...] = ()

    def save(
        self,
        step: int,
        model: nn.Module,
        optimiser: torch.optim.Optimizer,
        schedule: Any,
        ema: EMA | None,
        losses: list[float],
    ) -> None:
        """Write the state after ``step`` steps (atomically: a crash mid-write keeps the previous checkpoint)."""
        state = {
            "step": step,
            "model": model.state_dict(),
            "optimiser": optimiser.state_dict(),
            "schedule": schedule.state_dict(),
            "ema": ema.shadow if ema is not None else [],
            "ema_updates": ema.updates if ema is not None else 0,
            "losses": torch.tensor(losses, dtype=torch.float64),
            "generators": [g.get_state() for g in self.generators],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial_path = self.path.with_suffix(".partial")
        torch.save(state, partial_path)
        partial_path.replace(self.path)

    def restore(
        self,
        model: nn.Module,
        optimiser: torch.optim.Optimizer,
        schedule: Any,
        ema: EMA | None,
        losses: list[float],
    ) -> int:
        """Load the saved state into the given objects when a checkpoint exists; return the step to resume at."""
        if not self.path.is_file():
            return 0
        state = torch.load(self.path, weights_only=True, map_location="cpu")
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        schedule.load_state_dict(state["schedule"])
        if ema is not None:
            for target, saved in zip(ema.shadow, state["ema"], strict=True):
                target.copy_(saved)
            ema.updates = int(state["ema_updates"])
        losses[:] = state["losses"].tolist()
        for generator, saved in zip(self.generators, state["generators"], strict=True):
            generator.set_state(saved)
        print(f"resuming from {self.path} at step {state['step']}", file=sys.stderr, flush=True)
        return int(state["step"])


def optimise(
    model: nn.Module,
    loss_fn: Callable[[int], torch.Tensor],
    steps: int,
    lr: float,
    desc: str,
    ema: EMA | None = None,
    checkpoint: Checkpoint | None = None,
    warm: WarmStart | None = None,
) -> tuple[list[float], float]:
    """Run ``steps`` AdamW steps on ``loss_fn(step)`` with a progress bar; return the losses and seconds per step.

    With a ``checkpoint``, the run resumes from its file when one exists and saves to it every ``every`` steps
    (model, EMA, optimiser, schedule, losses and the states of the generators it was given). With ``warm`` (and no
    checkpoint file yet), it continues an exported run: the model already holds its weights, the step count and
    losses carry on, the schedule resumes at that step, and the fresh optimiser's learning rate is re-warmed.
    """
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    base = warmup_cosine(max(1, min(100, steps // 10)), steps)
    offset, rewarm = (warm.step, warm.rewarm) if warm is not None else (0, 0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: base(s + offset) * min(1.0, (s + 1) / rewarm) if rewarm else base(s)
    )
    model.train()
    losses: list[float] = list(warm.losses) if warm is not None else []
    first = offset
    if ema is not None and warm is not None:
        ema.updates = warm.step  # the exported weights are already an average: keep the full decay
    if checkpoint is not None and checkpoint.path.is_file():
        first = checkpoint.restore(model, optimiser, schedule, ema, losses)
    start = time.perf_counter()
    with tqdm(range(first, steps), desc=desc, dynamic_ncols=True, file=sys.stderr, initial=first, total=steps) as bar:
        for step in bar:
            loss = loss_fn(step)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            schedule.step()
            if ema is not None:
                ema.update(model)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", lr=f"{schedule.get_last_lr()[0]:.1e}")
            if checkpoint is not None and ((step + 1) % checkpoint.every == 0 or step + 1 == steps):
                checkpoint.save(step + 1, model, optimiser, schedule, ema, losses)
    if ema is not None:
        ema.copy_to(model)
    model.eval()
    return losses, (time.perf_counter() - start) / max(1, steps - first)


@dataclass(frozen=True)
class WarmStart:
    """Where an exported, unfinished run stopped: its step count and losses, and how long to re-warm the LR."""

    step: int
    losses: tuple[float, ...]
    rewarm: int = 50


def final_loss(losses: list[float]) -> float:
    """Mean loss over the last 10 % of the steps (at least one)."""
    tail = losses[-max(1, len(losses) // 10) :]
    return float(np.mean(tail)) if tail else float("nan")


def diffusion_loss(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    clean: torch.Tensor,
    scheduler: DDPMScheduler,
    generator: torch.Generator,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """Epsilon-prediction MSE at uniformly random timesteps; with ``snr_gamma``, each sample's error is weighted
    by min(SNR(t), gamma) / SNR(t) (Min-SNR-gamma, Hang et al. 2023, the form diffusers' training scripts use
    for eps prediction): the low-noise steps, whose eps error says little about the image, weigh less, and the
    high-noise steps that decide the layout keep their full weight."""
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(clean),), device=clean.device, generator=generator)
    noise = torch.randn(clean.shape, device=clean.device, generator=generator)
    noisy = scheduler.add_noise(clean, noise, t)
    error = (model_fn(noisy, t) - noise).square().flatten(1).mean(1)
    if snr_gamma is not None:
        alpha_bar = scheduler.alphas_cumprod.to(device=clean.device, dtype=error.dtype)[t]
        snr = alpha_bar / (1 - alpha_bar)
        error = error * snr.clamp(max=snr_gamma) / snr
    return error.mean()


def training_scheduler() -> DDPMScheduler:
    """The DDPM noise schedule shared by the diffusion models (1000 steps, linear betas)."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


# ----------------------------------------------------------------------------- models


def make_vae() -> AutoencoderKL:
    """AutoencoderKL 32x32x3 -> 4x16x16, (32, 64) channels, one layer per block (~0.7 M parameters)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )


def make_vae_b() -> AutoencoderKL:
    """A second, different AutoencoderKL: 32x32x3 -> 4x8x8 (stride 4), (16, 32, 64) channels (~0.5 M parameters).

    Not used for generation: the multi-VAE protection loss (FastProtect) trains against ``vae`` and this one,
    and protection transfer is measured across the two.
    """
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )


def check_dit_shape(layers: int, width: int) -> None:
    """Refuse a DiT shape :func:`make_dit` cannot build (heads of :data:`DIT_HEAD_DIM`)."""
    if layers < 1 or width < DIT_HEAD_DIM or width % DIT_HEAD_DIM:
        raise ValueError(f"a DiT needs >= 1 layer and a width that is a positive multiple of {DIT_HEAD_DIM} "
                         f"(heads of {DIT_HEAD_DIM}), got {layers} layers of width {width}")  # fmt: skip


def make_dit(
    sample_size: int, channels: int, layers: int = DIT_LAYERS, width: int = DIT_WIDTH
) -> DiTTransformer2DModel:
    """Class-conditional DiT on latents, patch 2, heads of 32: by default 4 layers of width 128 (~1.9 M parameters).

    ``num_embeds_ada_norm=1000`` gives label ids 0-999 plus the null label 1000 that DiTPipeline uses;
    only ids 0-9 and 1000 are trained. ``out_channels == in_channels`` (no learned sigma).
    """
    check_dit_shape(layers, width)
    return DiTTransformer2DModel(
        num_attention_heads=width // DIT_HEAD_DIM,
        attention_head_dim=DIT_HEAD_DIM,
        in_channels=channels,
        out_channels=channels,
        num_layers=layers,
        sample_size=sample_size,
        patch_size=2,
        num_embeds_ada_norm=NULL_LABEL,  # ids 0-999 and the null label
    )


def make_unet(image_size: int) -> UNet2DModel:
    """Pixel-space eps UNet: channels (32, 64, 64), one layer per block, attention at the middle level (~1.1 M)."""
    return UNet2DModel(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=16,
    )


def sampling_scheduler(config: dict[str, Any]) -> DDIMScheduler:
    """DDIM (eta 0, trailing timesteps, no clipping, for latents) from a training scheduler config."""
    return DDIMScheduler.from_config(config, clip_sample=False, timestep_spacing="trailing", set_alpha_to_one=True)


# ----------------------------------------------------------------------------- evaluation helpers


def held_out(run: Run, n: int, size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` evaluation images (balanced labels) from the held-out data stream."""
    labels = torch.arange(n) % NUM_CLASSES
    return generate(n, run.data_generator(EVAL_SEED_OFFSET), size, labels=labels)


def maybe_classifier(run: Run) -> ShapeClassifier | None:
    """The classifier saved in ``run.out/classifier``, or None if it has not been trained there."""
    path = run.out / "classifier"
    if not (path / "config.json").exists():
        return None
    return load_classifier(path, device=run.device)


def quality_metrics(
    classifier: ShapeClassifier | None, images: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor | None
) -> dict[str, float]:
    """Classifier accuracy (when labels are given) and Fréchet distance in classifier-feature space."""
    if classifier is None:
        return {}
    size = classifier.config.image_size
    if images.shape[-1] != size:  # the classifier works at 32x32; upsample smaller models' samples
        images = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
        reference = F.interpolate(reference.float(), size=(size, size), mode="bilinear", align_corners=False)
    features = batched(lambda x: classifier.features(x.to(classifier.device)), images)
    real = batched(lambda x: classifier.features(x.to(classifier.device)), reference)
    metrics = {"frechet_distance": frechet_distance(features, real)}
    if labels is not None:
        metrics["classifier_accuracy"] = accuracy(classifier, images, labels)
    else:
        predicted = batched(lambda x: classifier(x.to(classifier.device)), images).argmax(1)
        counts = torch.bincount(predicted, minlength=NUM_CLASSES).float()
        probs = counts / counts.sum()
        metrics["predicted_class_entropy_bits"] = abs(float((probs[probs > 0] * probs[probs > 0].log2()).sum()))
    return metrics


def save_sheet(images: torch.Tensor, rows: int, path: Path) -> None:
    """Save images in [-1, 1] as a PNG contact sheet with ``rows`` rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(contact_sheet(images, rows=rows)).save(path)


# ----------------------------------------------------------------------------- training one model each


def train_classifier(run: Run) -> Report:
    """Train the CNN classifier on fresh batches (with light noise augmentation) and save it."""
    steps, batch_size, lr = run.settings("classifier")
    model = seeded(run.seed, ShapeClassifier).to(run.device)
    data, noise_gen = run.data_generator(), run.noise_generator()

    def loss_fn(step: int) -> torch.Tensor:
        images, labels = generate(batch_size, data)
        images, labels = images.to(run.device), labels.to(run.device)
        sigma = 0.1 * torch.rand(len(images), 1, 1, 1, device=run.device, generator=noise_gen)
        images = images + sigma * torch.randn(images.shape, device=run.device, generator=noise_gen)
        return F.cross_entropy(model(images), labels)

    losses, per_step = optimise(model, loss_fn, steps, lr, "classifier")
    images, labels = held_out(run, run.n_eval(2000))
    report = Report("classifier", steps, batch_size, lr, losses, step_seconds=per_step)
    report.metrics["held_out_accuracy"] = accuracy(model, images, labels)
    report.metrics["held_out_images"] = len(images)
    model.save_pretrained(run.out / "classifier", safe_serialization=True)
    return report


def train_vae(run: Run, name: str = "vae") -> Report:
    """Train the AutoencoderKL (L1 + MSE reconstruction + 1e-6 KL), set its latent scaling factor, and save it."""
    steps, batch_size, lr = run.settings(name)
    vae = seeded(run.seed, make_vae if name == "vae" else make_vae_b).to(run.device)
    data, noise_gen = run.data_generator(), run.noise_generator()

    def loss_fn(step: int) -> torch.Tensor:
        images = generate(batch_size, data)[0].to(run.device)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample(generator=noise_gen)).sample
        return F.l1_loss(recon, images) + F.mse_loss(recon, images) + 1e-6 * posterior.kl().mean()

    losses, per_step = optimise(vae, loss_fn, steps, lr, name)
    report = Report(name, steps, batch_size, lr, losses, step_seconds=per_step)
    report.metrics.update(evaluate_vae(vae, run, noise_gen, name))
    vae.save_pretrained(run.out / name, safe_serialization=True)
    return report


@torch.no_grad()
def evaluate_vae(vae: AutoencoderKL, run: Run, generator: torch.Generator, name: str = "vae") -> dict[str, Any]:
    """Set ``scaling_factor`` = 1 / std of held-out latents; report reconstruction error and classifier metrics."""
    images, labels = held_out(run, run.n_eval(1024))
    latents = batched(lambda x: vae.encode(x.to(run.device)).latent_dist.sample(generator=generator), images)
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    recon = batched(lambda z: vae.decode(z.to(run.device)).sample, latents).clamp(-1, 1)
    mse = F.mse_loss(recon, images).item()
    metrics: dict[str, Any] = {
        "scaling_factor": vae.config.scaling_factor,
        "latent_shape": list(latents.shape[1:]),
        "recon_mse": mse,
        "recon_l1": F.l1_loss(recon, images).item(),
        "recon_psnr_db": 10 * math.log10(4 / mse),  # pixel range [-1, 1] has peak-to-peak 2
        "held_out_images": len(images),
    }
    classifier = maybe_classifier(run)
    metrics.update({f"recon_{k}": v for k, v in quality_metrics(classifier, recon, images, labels).items()})
    save_sheet(torch.cat([images[:10], recon[:10]]), rows=2, path=run.out / name / "reconstructions.png")
    return metrics


@torch.no_grad()
def encode_bank(vae: AutoencoderKL, run: Run, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode ``n`` training images once: posterior means and stds (on the device) and labels."""
    images, labels = generate(n, run.data_generator())
    means, stds = [], []
    for chunk in images.split(256):
        posterior = vae.encode(chunk.to(run.device)).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds), labels.to(run.device)


def disable_builtin_label_dropout(model: nn.Module) -> None:
    """Each DiT block drops labels independently; switch that off so one per-sample drop applies to all blocks."""
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0


def train_dit(run: Run) -> Report:
    """Train the class-conditional DiT on (re-sampled) VAE latents with label dropout; save a DiTPipeline."""
    steps, batch_size, lr = run.settings("dit")
    vae_path = run.vae_path or run.out / "vae"
    vae = AutoencoderKL.from_pretrained(str(vae_path), use_safetensors=True, local_files_only=True).to(run.device)
    vae.eval().requires_grad_(False)
    means, stds, labels = encode_bank(vae, run, min(steps * batch_size, LATENT_BANK))
    latent_channels, latent_size = means.shape[1], means.shape[-1]
    build = functools.partial(make_dit, latent_size, latent_channels, run.dit_layers, run.dit_width)
    model = seeded(run.seed, build).to(run.device)
    if run.init is not None:
        initialise_dit(model, run.init)
    disable_builtin_label_dropout(model)
    scheduler, noise_gen, ema = training_scheduler(), run.noise_generator(), EMA(model)
    scale = vae.config.scaling_factor

    def loss_fn(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(means), (batch_size,), device=run.device, generator=noise_gen)
        eps = torch.randn(means[idx].shape, device=run.device, generator=noise_gen)
        latents = (means[idx] + stds[idx] * eps) * scale
        drop = torch.rand(batch_size, device=run.device, generator=noise_gen) < LABEL_DROPOUT
        y = torch.where(drop, NULL_LABEL, labels[idx])
        return diffusion_loss(
            lambda x, t: model(x, timestep=t, class_labels=y).sample, latents, scheduler, noise_gen, run.snr_gamma
        )

    losses, per_step = optimise(model, loss_fn, steps, lr, "dit", ema, run.checkpoint("dit", noise_gen))
    pipe = DiTPipeline(model, vae, sampling_scheduler(scheduler.config), id2label=dict(enumerate(CLASS_NAMES)))
    pipe.register_to_config(id2label=dict(enumerate(CLASS_NAMES)))  # so that save_pretrained keeps the labels
    report = Report("dit", steps, batch_size, lr, losses, step_seconds=per_step)
    report.metrics["latent_bank_images"] = len(means)
    report.metrics.update(evaluate_dit(pipe, run))
    pipe.save_pretrained(run.out / "dit", safe_serialization=True)
    return report


def initialise_dit(model: DiTTransformer2DModel, source: Path) -> None:
    """Start from the weights of an exported DiT (a DiTPipeline folder or its ``transformer/``): a new run with
    its own schedule, EMA and data continues training it. Its architecture must be the one being trained."""
    folder = source / "transformer" if (source / "transformer" / "config.json").is_file() else source
    if not (folder / "config.json").is_file():
        raise SystemExit(f"--init {source}: not a DiTPipeline folder or a DiTTransformer2DModel folder")
    start = DiTTransformer2DModel.from_pretrained(folder, use_safetensors=True, local_files_only=True)
    keys = ("num_layers", "num_attention_heads", "attention_head_dim", "patch_size", "in_channels", "sample_size")
    differ = [
        f"{k} {start.config[k]} there, {model.config[k]} here" for k in keys if start.config[k] != model.config[k]
    ]
    if differ:
        raise SystemExit(f"--init {source}: another architecture ({'; '.join(differ)}): pass --dit-layers/--dit-width")
    model.load_state_dict(start.state_dict())


@torch.no_grad()
def sample_dit(
    pipe: DiTPipeline, labels: torch.Tensor, scale: float, steps: int, generator: torch.Generator
) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] of the given class ids at guidance ``scale``."""
    out = pipe(labels.tolist(), guidance_scale=scale, generator=generator, num_inference_steps=steps, output_type="pt")
    return out.images * 2 - 1


def class_rows(images: torch.Tensor, labels: torch.Tensor, per_class: int) -> torch.Tensor:
    """The first ``per_class`` images of each class, class by class (one contact-sheet row per class)."""
    order = [torch.nonzero(labels == c).squeeze(1)[:per_class] for c in range(NUM_CLASSES)]
    return images[torch.cat(order).to(images.device)]


@torch.no_grad()
def evaluate_dit(pipe: DiTPipeline, run: Run, steps: int = 25) -> dict[str, Any]:
    """Sample every class at guidance 1 and 4 (DDIM, 25 steps); classifier accuracy, FD, and contact sheets."""
    steps = run.sampler_steps(steps)
    pipe.set_progress_bar_config(disable=True)
    n = run.n_eval(200)
    labels = torch.arange(n) % NUM_CLASSES
    reference, _ = held_out(run, n)
    classifier = maybe_classifier(run)
    metrics: dict[str, Any] = {"eval_samples": n, "eval_steps": steps}
    for scale in (1.0, 4.0):
        generator = torch.Generator(run.device).manual_seed(run.seed)
        images = sample_dit(pipe, labels, scale, steps, generator)
        scores = quality_metrics(classifier, images, reference, labels)
        metrics.update({f"cfg{scale:g}_{k}": v for k, v in scores.items()})
        rows = class_rows(images, labels, per_class=min(8, n // NUM_CLASSES))
        save_sheet(rows, NUM_CLASSES, run.out / "dit" / f"samples_cfg{scale:g}.png")
    return metrics


def train_unet(run: Run) -> Report:
    """Train the unconditional pixel-space eps UNet; save a DDPMPipeline (DDPMScheduler)."""
    steps, batch_size, lr = run.settings("unet")
    model = seeded(run.seed, lambda: make_unet(run.image_size)).to(run.device)
    scheduler, data, noise_gen, ema = training_scheduler(), run.data_generator(), run.noise_generator(), EMA(model)

    def loss_fn(step: int) -> torch.Tensor:
        images = generate(batch_size, data, run.image_size)[0].to(run.device)
        return diffusion_loss(lambda x, t: model(x, t).sample, images, scheduler, noise_gen)

    losses, per_step = optimise(model, loss_fn, steps, lr, "unet", ema)
    pipe = DDPMPipeline(unet=model, scheduler=scheduler)
    report = Report("unet", steps, batch_size, lr, losses, step_seconds=per_step)
    report.metrics.update(evaluate_unet(pipe, run))
    pipe.save_pretrained(run.out / "unet", safe_serialization=True)
    return report


@torch.no_grad()
def evaluate_unet(pipe: DDPMPipeline, run: Run, steps: int = 100) -> dict[str, Any]:
    """Sample with the pipeline's DDPM scheduler (100 steps); FD to held-out data, predicted-class entropy, a sheet.

    Ancestral DDPM sampling, not DDIM: the data's pixel grain makes eps unpredictable at small t, and the
    deterministic DDIM update leaves that error in the image as residual noise.
    """
    steps = run.sampler_steps(steps)
    pipe.set_progress_bar_config(disable=True)
    n = run.n_eval(200)
    generator = torch.Generator(run.device).manual_seed(run.seed)
    images = pipe(n, generator=generator, num_inference_steps=steps, output_type="pt").images * 2 - 1
    reference, _ = held_out(run, n, run.image_size)
    metrics: dict[str, Any] = {"eval_samples": n, "eval_sampler": f"DDPM {steps} steps"}
    metrics.update(quality_metrics(maybe_classifier(run), images, reference, None))
    save_sheet(images[:64], rows=max(1, min(8, n // 8)), path=run.out / "unet" / "samples.png")
    return metrics


TRAINERS: dict[str, Callable[[Run], Report]] = {
    "classifier": train_classifier,
    "vae": train_vae,
    "dit": train_dit,
    "unet": train_unet,
    "vae_b": partial(train_vae, name="vae_b"),
}


# ----------------------------------------------------------------------------- model cards


DESCRIPTIONS = {
    "classifier": "`ShapeClassifier` (apps.demo.classifier): a small CNN, (16, 32, 64, 128) channels at 32/16/8/4 px, "
    "two conv layers per stage; `features()` is the 128-d pooled penultimate layer used for Fréchet distances. "
    "Load with `apps.demo.load_classifier`.",
    "vae": "`AutoencoderKL`: 32x32x3 images to 4x16x16 latents, (32, 64) channels, one layer per block. "
    "`config.scaling_factor` = 1 / std of held-out latents. Loss: L1 + MSE + 1e-6 KL.",
    "dit": "`DiTPipeline` (transformer + vae + DDIM scheduler + id2label): a class-conditional "
    "`DiTTransformer2DModel` ({dit_layers} layers, width {dit_width}, {dit_heads} heads, patch 2) on the VAE "
    "latents; eps prediction, no learned sigma; label dropout 0.1 to the null label 1000 (the label DiTPipeline "
    "uses for classifier-free guidance). "
    "EMA weights. Use `pipe(class_labels, guidance_scale=4, num_inference_steps=25)`; class ids follow the data's "
    "class names (`pipe.labels`).",
    "vae_b": "`AutoencoderKL`: 32x32x3 images to 4x8x8 latents, (16, 32, 64) channels, one layer per block: a "
    "second, different autoencoder for the multi-VAE protection loss and for measuring protection transfer. "
    "`config.scaling_factor` = 1 / std of held-out latents. Loss: L1 + MSE + 1e-6 KL.",
    "unet": "`DDPMPipeline` (unconditional): a pixel-space eps `UNet2DModel`, (32, 64, 64) channels, one layer per "
    "block, attention at the middle level, linear betas over 1000 steps. EMA weights. Sample with the saved "
    "`DDPMScheduler` and `num_inference_steps=100` or more (DDIM leaves residual noise with short-run weights).",
}


def description(run: Run, name: str) -> str:
    """The model card's first paragraph (the DiT's with its layers, width and heads)."""
    return DESCRIPTIONS[name].format(
        dit_layers=run.dit_layers, dit_width=run.dit_width, dit_heads=run.dit_width // DIT_HEAD_DIM
    )


def data_use(report: Report) -> str:
    """How the training run drew its data."""
    if report.name == "dit":
        bank = report.metrics.get("latent_bank_images", "?")
        return f"A bank of {bank} images encoded once by the VAE, the latent posterior re-sampled at every step"
    return "Fresh images at every step"


def card_notes(run: Run, name: str) -> str:
    """Extra advice for the "fuller run" section of model ``name``."""
    if name == "vae":
        return "\nThe dit pipeline embeds a copy of this VAE and was trained on its latents: retrain dit after the vae."
    if name == "dit" and (run.dit_layers, run.dit_width) != (DIT_LAYERS, DIT_WIDTH):
        return f"\nAdd `--dit-layers {run.dit_layers} --dit-width {run.dit_width}` for this architecture."
    if name == "unet" and run.image_size != IMAGE_SIZE:
        return f"\nThis run used `--image-size {run.image_size}` for a CPU budget; a GPU run should use {IMAGE_SIZE}."
    return ""


def folder_size(path: Path) -> int:
    """Total bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_card(run: Run, report: Report) -> Path:
    """Write ``README.md`` (and ``training.json`` with the loss curve) beside the saved weights."""
    folder = run.out / report.name
    d = DEFAULTS[report.name]
    record = {**asdict(report), "losses": [float(f"{x:.5g}") for x in report.losses], "command": run.command}
    (folder / "training.json").write_text(json.dumps(record) + "\n")
    pictures = "\n".join(f"![{p.stem}]({p.name})" for p in sorted(folder.glob("*.png")))
    text = f"""# steerguard demo model: {report.name}

{description(run, report.name)}

## Data
Procedural shapes (`apps/demo/data.py`), RGB {run.image_size if report.name == "unet" else IMAGE_SIZE}px, 10 classes:
{", ".join(CLASS_NAMES)}. One random bright foreground (shape or texture) with random colour, position, size and
rotation over a random dark gradient + value-noise + grating background. {data_use(report)} (seed {run.seed});
metrics use a held-out stream of the same generator.

## Training
| setting | value |
|---|---|
| command | `{run.command}` |
| steps | {report.steps} |
| batch size | {report.batch_size} |
| optimiser | AdamW (weight decay 0.01), lr {report.lr:g}, linear warm-up then cosine decay, grad clip 1.0 |
| EMA | {"0.999 (with (1+t)/(10+t) warm-up)" if report.name in ("dit", "unet") else "none"} |
{run_rows(report, run.device, folder)}

{pictures}

## A fuller run
These weights come from a short CPU budget. For better samples, on a GPU:
`python -m apps.demo.train {report.name} --out demo_models --steps {d.full_steps} --batch-size {d.full_batch_size} \
--seed {run.seed} --device cuda`
(the learning rate schedule follows `--steps`).{card_notes(run, report.name)}
"""
    card = folder / "README.md"
    card.write_text(text)
    return card


def run_rows(report: Report, device: torch.device, folder: Path) -> str:
    """The model card's rows shared by every demo model: device, losses, times and size, then the metrics table."""
    metrics = "\n".join(f"| {k} | {fmt_value(v)} |" for k, v in report.metrics.items())
    return f"""| device | {device.type} ({platform.machine()}, {torch.get_num_threads()} CPU thread(s)), float32 |
| first loss | {fmt_value(report.losses[0] if report.losses else float("nan"))} |
| final loss (mean of last 10 % of steps) | {fmt_value(final_loss(report.losses))} |
| time per step | {report.step_seconds:.3f} s |
| wall time (training + evaluation + saving) | {report.seconds:.0f} s |
| weights on disk (this folder) | {folder_size(folder) / 1e6:.2f} MB |

## Metrics
| metric | value |
|---|---|
{metrics}"""


def fmt_value(value: Any) -> str:
    """A metric as a model card shows it: floats to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def add_training_arguments(parser: argparse.ArgumentParser, checkpoint_every: int) -> None:
    """The options every demo training command shares: budget, seed, device, threads and checkpoints."""
    parser.add_argument("--steps", type=int, help="training steps (default: per model, see DEFAULTS)")
    parser.add_argument("--batch-size", type=int, help="batch size (default: per model)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: per model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--checkpoints", type=Path, help="save a resumable checkpoint per model here (and resume from it if present)"
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=checkpoint_every,
        help=f"steps between checkpoints (default {checkpoint_every})",
    )


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(prog="python -m apps.demo.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=(*MODELS, "all"))
    parser.add_argument("--out", type=Path, required=True, help="output folder; each model goes to OUT/<name>/")
    add_training_arguments(parser, checkpoint_every=250)
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="unet resolution (default 32)")
    parser.add_argument(
        "--eval-samples", type=int, help="images per evaluation (default: 200-2000; 10 when --steps < 100)"
    )
    parser.add_argument("--vae", type=Path, help="trained VAE folder for dit (default: OUT/vae)")
    parser.add_argument(
        "--init", type=Path, help="dit: start from this exported DiT's weights (a new schedule, EMA and data seed)"
    )
    parser.add_argument(
        "--dit-layers", type=int, default=DIT_LAYERS, help=f"dit: transformer blocks (default {DIT_LAYERS})"
    )
    parser.add_argument(
        "--dit-width",
        type=int,
        default=DIT_WIDTH,
        help=f"dit: hidden width, a multiple of {DIT_HEAD_DIM} (default {DIT_WIDTH})",
    )
    parser.add_argument(
        "--snr-gamma",
        type=float,
        help="dit: weight the loss by min(SNR, gamma) / SNR (Min-SNR-gamma; 5 in its paper; default: unweighted)",
    )
    args = parser.parse_args(None if argv is None else list(argv))
    if args.snr_gamma is not None and not args.snr_gamma > 0:
        parser.error(f"--snr-gamma must be positive, got {args.snr_gamma}")
    try:
        check_dit_shape(args.dit_layers, args.dit_width)
    except ValueError as error:
        parser.error(f"--dit-layers/--dit-width: {error}")
    return args


def main(argv: Iterable[str] | None = None) -> list[Path]:
    """Train the requested model(s); return the paths of the written model cards."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else best_device()[0]
    command = "python -m apps.demo.train " + " ".join(sys.argv[1:] if argv is None else list(argv))
    run = Run(
        args.out,
        args.seed,
        device,
        args.steps,
        args.batch_size,
        args.lr,
        args.image_size,
        args.eval_samples,
        args.vae,
        command,
        args.checkpoints,
        args.checkpoint_every,
        args.dit_layers,
        args.dit_width,
        args.init,
        args.snr_gamma,
    )
    cards = []
    for name in MODELS if args.model == "all" else (args.model,):
        start = time.perf_counter()
        report = TRAINERS[name](run)
        report.seconds = time.perf_counter() - start
        cards.append(write_card(run, report))
        print(
            f"{name}: final loss {final_loss(report.losses):.4f}, {report.seconds:.0f} s, "
            f"{folder_size(run.out / name) / 1e6:.2f} MB, {json.dumps(report.metrics)}",
            flush=True,
        )
    return cards


if __name__ == "__main__":
    main()
