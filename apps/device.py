"""The one device choice of the application: :func:`best_device` (the libraries take the device of their inputs)."""

from __future__ import annotations

import torch


def best_device() -> tuple[torch.device, torch.dtype]:
    """The GPU in half precision when there is one (bf16 where supported), else the CPU in float32."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.device("cpu"), torch.float32
