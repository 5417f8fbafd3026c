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
