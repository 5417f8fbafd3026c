"""Classifier-free guidance (Ho & Salimans 2022).

    D = D_c + (w - 1) (D_c - D_u)

equivalently ``D_u + w (D_c - D_u)``, the form diffusers pipelines use. CFG is
linear, so the space it acts in does not matter; it acts on the raw output.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor

from .method import Guidance, register


def cfg_update(pred_cond: Tensor, pred_uncond: Tensor, scale: float) -> Tensor:
    """The CFG update ``(w - 1) (D_c - D_u)`` that is added to ``D_c``."""
    return (scale - 1) * (pred_cond - pred_uncond)


@register("cfg")
@dataclasses.dataclass(frozen=True)
class CFG(Guidance):
    """Classifier-free guidance with scale ``w`` (``w = 1``: conditional only; ``w = 0``: unconditional)."""

    def update(self, pred_cond: Tensor, pred_other: Tensor, state: Any = None) -> Tensor:
        return cfg_update(pred_cond, pred_other, self.scale)
