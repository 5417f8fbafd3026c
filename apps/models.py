"""Loading pipelines by hub id or local path, the same way for the embedded demo models and hub models.

``models.txt`` (repository root) lists every model the suite loads by id, one per
line: ``<id or path>  <role>``; the embedded demo models come first and are
addressed as ``demo/<name>`` (resolved to the repository's ``demo_models/``).
Weights are read from safetensors only and no remote code is ever trusted.
"""

from __future__ import annotations

import functools
import threading
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


def best_device() -> tuple[torch.device, torch.dtype]:
    """The GPU in half precision when there is one (bf16 where supported), else the CPU in float32."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.device("cpu"), torch.float32


_lock = threading.Lock()


@functools.lru_cache(maxsize=4)
def _load(name: str, device: str, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    options = {"torch_dtype": dtype} if dtype != torch.float32 else {}
    pipe = DiffusionPipeline.from_pretrained(resolve(name), use_safetensors=True, **options)
    pipe.set_progress_bar_config(disable=True)
    if name.startswith("demo/") and hasattr(pipe, "get_label_ids") and not getattr(pipe, "labels", None):
        from .demo import CLASS_NAMES

        pipe.labels = {label: i for i, label in enumerate(CLASS_NAMES)}
    return pipe.to(device)


def load_pipeline(
    name: str = DEFAULT_MODEL, device: torch.device | str | None = None, dtype: torch.dtype | None = None
):
    """A diffusers pipeline for ``name`` (cached), on the best device unless one is given."""
    best_dev, best_dtype = best_device()
    device = torch.device(device) if device is not None else best_dev
    if dtype is None:
        dtype = best_dtype if device.type == "cuda" else torch.float32
    with _lock:
        return _load(name, str(device), dtype)
