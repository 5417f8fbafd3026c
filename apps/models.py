"""Naming models by hub id or local path, the same way for the embedded demo models and hub models.

``models.txt`` (repository root) lists every model the suite loads by id, one per
line: ``<id or path>  <role>``; the embedded demo models come first and are
addressed as ``demo/<name>`` (resolved to the repository's ``demo_models/``).
Weights are read from safetensors only and no remote code is ever trusted.
"""

from __future__ import annotations

from pathlib import Path

import torch

from protect.loading import load_unet
from protect.loading import load_vae as protect_load_vae

MODELS_TXT = Path(__file__).resolve().parents[1] / "models.txt"
DEFAULT_MODEL = "demo/dit"


def listed_models(path: Path = MODELS_TXT) -> list[tuple[str, str]]:
    """``(id, role)`` pairs from ``models.txt`` (comments and blank lines skipped)."""
    rows = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, role = line.partition(" ")
            rows.append((name, role.strip()))
    return rows


def resolve(name: str) -> str:
    """A ``demo/<name>`` alias becomes the local folder; anything else is a hub id or a path, as given."""
    if name.startswith("demo/"):
        from .demo import model_path

        return str(model_path(name.removeprefix("demo/")))
    return name


def load_score_model(name: str, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
    """``(unet, scheduler)`` of an unconditional diffusers pixel model (safetensors weights), the score model an
    EPS-AD detector runs on: ``demo/<name>`` (``demo/unet_eps``, the demo detectors' score model), a hub id, or a
    folder of a pipeline (``unet/`` and ``scheduler/`` subfolders, as ``DDPMPipeline.save_pretrained`` writes) or of
    a bare ``UNet2DModel`` with its scheduler config beside it (``config.json``, ``scheduler_config.json``).

    The UNet comes back in eval mode, in ``dtype`` (the weights' dtype at load), on ``device`` (left
    where ``from_pretrained`` puts it when ``None``): :func:`protect.loading.load_unet` on the resolved name.
    """
    return load_unet(resolve(name), device, dtype, label=name)


def load_vae(name: str, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
    """A frozen ``AutoencoderKL`` (eval mode, safetensors weights only) named as the rest of the suite names models:
    ``demo/<name>``, a local folder (an ``AutoencoderKL`` folder with ``config.json``, or a pipeline folder with
    ``vae/``), or a hub id (e.g. ``stabilityai/sd-vae-ft-mse``; a pipeline repo's ``vae/`` subfolder is tried when
    the repo has no VAE at its root). A hub id is read from the local cache first and downloaded only when
    ``HF_HUB_OFFLINE`` is not set; a name that resolves to nothing raises a ``ValueError`` saying so
    (:func:`protect.loading.load_vae` on the resolved name).
    """
    return protect_load_vae(resolve(name), device, dtype, label=name)


def load_latent_model(name: str, vae: str | None = None, device: torch.device | str | None = None):
    """``(unet, scheduler, vae_name)`` of an unconditional latent diffusion model: a diffusers ``UNet2DModel`` on the
    scaled latents of an ``AutoencoderKL`` (e.g. ``demo/photo_ldm`` on ``demo/photo_vae``), loaded as
    :func:`load_score_model` loads a pixel model. ``vae`` names its autoencoder; by default the one its
    ``latent_vae.json`` names (``apps.demo.train_photo`` writes it). A UNet whose channels differ from the VAE's
    latent channels is refused when the VAE is loaded (:func:`check_latent_pair`).
    """
    import json

    unet, scheduler = load_score_model(name, device)
    if vae is None:
        record = Path(resolve(name)) / "latent_vae.json"
        if not record.is_file():
            raise ValueError(f"{name}: no latent_vae.json names its autoencoder; pass the VAE it was trained on")
        info = json.loads(record.read_text())
        vae = info.get("vae") if isinstance(info, dict) else None
        if not isinstance(vae, str):
            raise ValueError(f"{record}: expected {{'vae': '<name>'}}")
    unet.requires_grad_(False)
    return unet, scheduler, vae


def check_latent_pair(unet, vae, names: tuple[str, str]) -> None:
    """Refuse a latent UNet and an ``AutoencoderKL`` that do not fit (latent channels)."""
    if unet.config.in_channels != vae.config.latent_channels:
        raise ValueError(
            f"{names[0]} works on {unet.config.in_channels}-channel latents, {names[1]} has "
            f"{vae.config.latent_channels}: pass the VAE the latent model was trained on"
        )
