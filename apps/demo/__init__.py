"""Embedded demo models trained by this project on its own procedural shapes data.

The weights live in the repository's ``demo_models/`` folder (override with the
``STEERGUARD_DEMO_DIR`` environment variable), one diffusers folder per model,
each with a model card; ``python -m apps.demo.train`` reproduces them. Loaders
read local safetensors only, through the standard ``from_pretrained``::

    pipe = load_dit_pipeline()
    images = pipe(pipe.get_label_ids(["star"]), guidance_scale=4.0, num_inference_steps=25).images
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMPipeline, DiTPipeline

from protect.loading import dtype_option

from .classifier import ShapeClassifier
from .classifier import load_classifier as _load_classifier
from .data import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES, generate

DEMO_DIR = Path(os.environ.get("STEERGUARD_DEMO_DIR", Path(__file__).resolve().parents[2] / "demo_models"))

__all__ = [
    "CLASS_NAMES",
    "DEMO_DIR",
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "ShapeClassifier",
    "generate",
    "load_classifier",
    "load_ddpm_pipeline",
    "load_dit_pipeline",
    "load_vae",
    "load_victim",
    "model_path",
]

Device = torch.device | str | None


def model_path(name: str) -> Path:
    """Folder of demo model ``name`` ("classifier", "vae", "dit" or "unet"); raises if it is not there."""
    path = DEMO_DIR / name
    if not path.is_dir():
        raise FileNotFoundError(f"demo model {name!r} not found at {path}; train it with `python -m apps.demo.train`")
    return path


def _load_kwargs(dtype: torch.dtype | None) -> dict:
    kwargs: dict = {"use_safetensors": True, "local_files_only": True}
    if dtype is not None:
        kwargs.update(dtype_option(dtype))
    return kwargs


def load_dit_pipeline(device: Device = None, dtype: torch.dtype | None = None) -> DiTPipeline:
    """The class-conditional DiT demo pipeline (32x32 images; class ids = indices of ``CLASS_NAMES``)."""
    pipe = DiTPipeline.from_pretrained(
        str(model_path("dit")), id2label=dict(enumerate(CLASS_NAMES)), **_load_kwargs(dtype)
    )
    return pipe.to(device) if device is not None else pipe


def load_ddpm_pipeline(device: Device = None, dtype: torch.dtype | None = None) -> DDPMPipeline:
    """The unconditional pixel-space UNet demo pipeline (DDPMScheduler; swap in DDIM for fewer steps)."""
    pipe = DDPMPipeline.from_pretrained(str(model_path("unet")), **_load_kwargs(dtype))
    return pipe.to(device) if device is not None else pipe


def load_vae(device: Device = None, dtype: torch.dtype | None = None) -> AutoencoderKL:
    """The demo AutoencoderKL (32x32x3 <-> 4x16x16; ``config.scaling_factor`` set) in eval mode."""
    vae = AutoencoderKL.from_pretrained(str(model_path("vae")), **_load_kwargs(dtype))
    return vae.to(device).eval() if device is not None else vae.eval()


def load_classifier(device: Device = None, dtype: torch.dtype | None = None) -> ShapeClassifier:
    """The demo classifier / feature extractor (``features(x)`` for Fréchet distances) in eval mode."""
    return _load_classifier(model_path("classifier"), device=device, dtype=dtype)


SCORE_MODEL = "demo/unet_eps"  # the score model the demo detectors were fitted on (apps.models.load_score_model)


def load_victim(device: Device = None):
    """The demo classifier as the testbed's 16x16 [0, 1] victim (eval mode, parameters frozen)."""
    from protect.testbed import frozen_victim

    return frozen_victim(load_classifier(device=device))
