"""The one device choice of the application: :func:`best_device` (the libraries take the device of their inputs),
and :func:`score_dtype`, the precision the small EPS-AD score models run in."""

from __future__ import annotations

import torch

SCORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def best_device() -> tuple[torch.device, torch.dtype]:
    """The GPU in half precision when there is one (bf16 where supported), else the CPU in float32."""
    if torch.cuda.is_available():
        return torch.device("cuda"), gpu_half()
    return torch.device("cpu"), torch.float32


def gpu_half() -> torch.dtype:
    """The GPU's half precision: bfloat16 where supported, else float16."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def cpu_has_bf16_matrix_units() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (Intel AMX tiles), as torch reports it.

    Where it does, a bfloat16 convolution net runs ~1.8x faster than in float32 (measured on the detector's score
    model, ``benchmarks/RESULTS.md``); elsewhere bfloat16 on a CPU is emulated and slower, so it is not chosen."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)  # torch's own probe; absent: assume no
    try:
        return bool(check()) if callable(check) else False
    except RuntimeError:
        return False


def score_dtype(device: str | torch.device, choice: str = "auto") -> torch.dtype:
    """The dtype of the detector's score model on ``device``: ``choice`` (a name of :data:`SCORE_DTYPES`), or for
    ``"auto"`` bfloat16 on a GPU that supports it (else float16), bfloat16 on a CPU with bfloat16 matrix units
    (:func:`cpu_has_bf16_matrix_units`), float32 otherwise. The EPS average, the kernel and the MMD stay in
    float32 whatever the choice (``protect.eps.expected_perturbation_score``)."""
    if choice != "auto":
        if choice not in SCORE_DTYPES:
            raise ValueError(f"unknown dtype {choice!r}: choose auto or one of {', '.join(SCORE_DTYPES)}")
        return SCORE_DTYPES[choice]
    device = torch.device(device)
    if device.type == "cuda":
        return gpu_half()
    if device.type == "cpu" and cpu_has_bf16_matrix_units():
        return torch.bfloat16
    return torch.float32
