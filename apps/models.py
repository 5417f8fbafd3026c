"""Naming models by hub id or local path, the same way for the embedded demo models and hub models.

``models.txt`` (repository root) lists every model the suite loads by id, one per
line: ``<id or path>  <role>``; the embedded demo models come first and are
addressed as ``demo/<name>`` (resolved to the repository's ``demo_models/``).
Weights are read from safetensors only and no remote code is ever trusted.
"""

from __future__ import annotations

from pathlib import Path

import torch

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

    The UNet comes back in eval mode, in ``dtype`` (``torch_dtype`` of ``from_pretrained``), on ``device`` (left
    where ``from_pretrained`` puts it when ``None``).
    """
    from diffusers import DDPMScheduler, UNet2DModel

    path = resolve(name)
    local = Path(path)
    options = {"local_files_only": True} if local.exists() else {}
    if local.exists() and not ((local / "unet").is_dir() or (local / "config.json").is_file()):
        raise ValueError(f"{name}: expected a diffusers pipeline folder (unet/, scheduler/) or a UNet2DModel folder")
    subfolder = "unet" if not local.exists() or (local / "unet").is_dir() else None
    weights = {**options, "use_safetensors": True, "torch_dtype": dtype}
    try:
        unet = UNet2DModel.from_pretrained(path, subfolder=subfolder, **weights)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder=subfolder and "scheduler", **options)
    except OSError:
        if local.exists() or subfolder is None:
            raise
        unet = UNet2DModel.from_pretrained(path, **weights)  # a hub repo without unet/
        scheduler = DDPMScheduler.from_pretrained(path, **options)
    if unet.config.in_channels != unet.config.out_channels:
        raise ValueError(f"{name}: not an unconditional pixel model (in {unet.config.in_channels} channels)")
    unet.eval()
    return unet.to(device) if device is not None else unet, scheduler


def _offline() -> bool:
    """Whether the hub must not be asked (``HF_HUB_OFFLINE`` set, read at call time)."""
    import os

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def load_vae(name: str, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
    """A frozen ``AutoencoderKL`` (eval mode, safetensors weights only) named as the rest of the suite names models:
    ``demo/<name>``, a local folder (an ``AutoencoderKL`` folder with ``config.json``, or a pipeline folder with
    ``vae/``), or a hub id (e.g. ``stabilityai/sd-vae-ft-mse``; a pipeline repo's ``vae/`` subfolder is tried when
    the repo has no VAE at its root). A hub id is read from the local cache first and downloaded only when
    ``HF_HUB_OFFLINE`` is not set; a name that resolves to nothing raises a ``ValueError`` saying so.
    """
    from diffusers import AutoencoderKL

    path = resolve(name)
    local = Path(path)
    weights = {"use_safetensors": True, "torch_dtype": dtype}
    if local.exists():
        if (local / "vae" / "config.json").is_file():
            subfolders = ["vae"]
        elif (local / "config.json").is_file():
            subfolders = [None]
        else:
            raise ValueError(f"{name}: expected a diffusers AutoencoderKL folder (config.json) or a pipeline with vae/")
        attempts = [{"local_files_only": True}]
    elif path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ValueError(f"{name}: no such folder, and not a hub id (owner/name)")
    else:
        subfolders = [None, "vae"]
        attempts = [{"local_files_only": True}] + ([] if _offline() else [{}])
    errors = []
    for options in attempts:
        for subfolder in subfolders:
            try:
                vae = AutoencoderKL.from_pretrained(path, subfolder=subfolder, **weights, **options)
            except (OSError, ValueError) as error:
                errors.append(str(error).splitlines()[0] if str(error) else type(error).__name__)
                continue
            vae.eval().requires_grad_(False)
            return vae.to(device) if device is not None else vae
    where = (
        "the local folder"
        if local.exists()
        else "the local hub cache" + (" (HF_HUB_OFFLINE is set)" if _offline() else " or the hub")
    )
    raise ValueError(f"{name}: no AutoencoderKL with safetensors weights could be loaded from {where}: {errors[-1]}")


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
