"""Loading the frozen models protection works against, from a local diffusers folder or a hub id.

Weights are read from safetensors only (``use_safetensors=True``: a pickled checkpoint is refused), local
folders never reach the hub, and a hub id is read from the local cache first and downloaded only when
``HF_HUB_OFFLINE`` is not set. ``label`` is the name the caller knows the model by (e.g. ``demo/photo_vae``
where ``source`` is its resolved folder): errors name it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["dtype_option", "hub_offline", "load_unet", "load_vae"]


def dtype_option(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The ``from_pretrained`` keyword for the weights' dtype: ``dtype`` from diffusers 0.40, which deprecates
    ``torch_dtype`` (a FutureWarning on every load, removal announced for 1.0); ``torch_dtype`` before, where
    models ignored ``dtype``."""
    from importlib.metadata import version

    from packaging.version import Version

    return {"dtype" if Version(version("diffusers")) >= Version("0.40") else "torch_dtype": dtype}


def hub_offline() -> bool:
    """Whether the hub must not be asked (``HF_HUB_OFFLINE`` set, read at call time)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def load_vae(
    source: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    label: str | None = None,
):
    """A frozen ``AutoencoderKL`` (eval mode, no gradients) from a local folder (an ``AutoencoderKL`` folder with
    ``config.json``, or a pipeline folder with ``vae/``) or a hub id (e.g. ``stabilityai/sd-vae-ft-mse``; a
    pipeline repo's ``vae/`` subfolder is tried when the repo has no VAE at its root). Anything that resolves to
    nothing raises a ``ValueError`` saying so. Left where ``from_pretrained`` puts it when ``device`` is None.
    """
    from diffusers import AutoencoderKL

    name = label or source
    local = Path(source)
    weights = {"use_safetensors": True, **dtype_option(dtype)}
    if local.exists():
        if (local / "vae" / "config.json").is_file():
            subfolders = ["vae"]
        elif (local / "config.json").is_file():
            subfolders = [None]
        else:
            raise ValueError(f"{name}: expected a diffusers AutoencoderKL folder (config.json) or a pipeline with vae/")
        attempts = [{"local_files_only": True}]
    elif source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ValueError(f"{name}: no such folder, and not a hub id (owner/name)")
    else:
        subfolders = [None, "vae"]
        attempts = [{"local_files_only": True}] + ([] if hub_offline() else [{}])
    errors = []
    for options in attempts:
        for subfolder in subfolders:
            try:
                vae = AutoencoderKL.from_pretrained(source, subfolder=subfolder, **weights, **options)
            except (OSError, ValueError) as error:
                errors.append(str(error).splitlines()[0] if str(error) else type(error).__name__)
                continue
            vae.eval().requires_grad_(False)
            return vae.to(device) if device is not None else vae
    where = (
        "the local folder"
        if local.exists()
        else "the local hub cache" + (" (HF_HUB_OFFLINE is set)" if hub_offline() else " or the hub")
    )
    raise ValueError(f"{name}: no AutoencoderKL with safetensors weights could be loaded from {where}: {errors[-1]}")


def load_unet(
    source: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    label: str | None = None,
):
    """``(unet, scheduler)`` of an unconditional diffusers model (a ``UNet2DModel`` whose output has its input's
    channels, pixel or latent, and its ``DDPMScheduler``): a hub id, or a folder of a pipeline (``unet/`` and
    ``scheduler/`` subfolders, as ``DDPMPipeline.save_pretrained`` writes) or of a bare ``UNet2DModel`` with its
    scheduler config beside it (``config.json``, ``scheduler_config.json``). The UNet comes back in eval mode, in
    ``dtype``, on ``device`` (left where ``from_pretrained`` puts it when ``None``); gradients stay on (a
    score model's input gradients are used), ``unet.requires_grad_(False)`` freezes its weights.
    """
    from diffusers import DDPMScheduler, UNet2DModel

    name = label or source
    local = Path(source)
    options = {"local_files_only": True} if local.exists() else {}
    if local.exists() and not ((local / "unet").is_dir() or (local / "config.json").is_file()):
        raise ValueError(f"{name}: expected a diffusers pipeline folder (unet/, scheduler/) or a UNet2DModel folder")
    subfolder = "unet" if not local.exists() or (local / "unet").is_dir() else None
    weights = {**options, "use_safetensors": True, **dtype_option(dtype)}
    try:
        unet = UNet2DModel.from_pretrained(source, subfolder=subfolder, **weights)
        scheduler = DDPMScheduler.from_pretrained(source, subfolder=subfolder and "scheduler", **options)
    except OSError:
        if local.exists() or subfolder is None:
            raise
        unet = UNet2DModel.from_pretrained(source, **weights)  # a hub repo without unet/
        scheduler = DDPMScheduler.from_pretrained(source, **options)
    if unet.config.in_channels != unet.config.out_channels:
        raise ValueError(f"{name}: not an unconditional model (in {unet.config.in_channels} channels)")
    unet.eval()
    return unet.to(device) if device is not None else unet, scheduler
