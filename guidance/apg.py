"""Adaptive Projected Guidance (Sadat, Hilliges & Weber, ICLR 2025, Algorithm 1).

With ``Delta = D_c - D_u`` on the denoised predictions:

1. momentum:   ``Delta <- Delta + beta * Delta_prev`` (running average, reset per run)
2. rescaling:  ``Delta <- Delta * min(1, r / ||Delta||)``       (per sample)
3. projection: ``Delta_par = <Delta, D_c> / <D_c, D_c> * D_c``, ``Delta_orth = Delta - Delta_par``
4. update:     ``D = D_c + (w - 1) (Delta_orth + eta * Delta_par)``

``eta = 0`` drops the parallel component that oversaturates. With ``eta = 1``,
no threshold and no momentum, APG is CFG. ``space="x0"`` is the paper;
``space="model"`` applies the same steps to the raw network output, which is
what diffusers' ``AdaptiveProjectedGuidance`` does (with
``use_original_formulation=True`` and its ``guidance_scale = w - 1``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import Tensor

from .method import SPACES, Guidance, check_real, register

#: Norm threshold ``r`` per element, as a root-mean-square, by model family.
#: ``r = rms * sqrt(numel of one sample)``. SD/SDXL: the paper's r = 15 for
#: SDXL at 1024^2 (4x128x128 latents); DiT/PixArt: its r = 2.5 for EDM2 at
#: 512^2 (4x64x64 latents); SD3/FLUX: no published value, the SDXL one.
NORM_THRESHOLD_RMS: dict[str | None, float] = {
    "sd": 15 / 256,
    "sdxl": 15 / 256,
    "sd3": 15 / 256,
    "flux": 15 / 256,
    "dit": 2.5 / 128,
    "pixart": 2.5 / 128,
    None: 15 / 256,
}
#: The paper's momentum (Table 10), for every family.
MOMENTUM = -0.5


def sample_dims(x: Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


def project(v: Tensor, onto: Tensor) -> tuple[Tensor, Tensor]:
    """Split ``v`` into its components parallel and orthogonal to ``onto``, per sample (float32 reductions)."""
    dims = sample_dims(v)
    wide = torch.promote_types(v.dtype, torch.float32)
    v32, u32 = v.to(wide), onto.to(wide)
    u32 = u32 / torch.linalg.vector_norm(u32, dim=dims, keepdim=True).clamp_min(1e-12)
    parallel = (v32 * u32).sum(dim=dims, keepdim=True) * u32
    return parallel.to(v.dtype), (v32 - parallel).to(v.dtype)


def clip_norm(v: Tensor, threshold: float) -> Tensor:
    """``v * min(1, r / ||v||)`` per sample."""
    norm = torch.linalg.vector_norm(v.to(torch.promote_types(v.dtype, torch.float32)), dim=sample_dims(v), keepdim=True)
    return v * (threshold / norm.clamp_min(1e-12)).clamp(max=1.0).to(v.dtype)


class Momentum:
    """APG's running average ``m <- Delta + beta * m``; one buffer per sampling run. It restarts where the latents
    change shape within the run (ChronoEdit's temporal reasoning keeps two of its frames after its first steps)."""

    def __init__(self, beta: float) -> None:
        self.beta = beta
        self.average: Tensor | None = None

    def update(self, delta: Tensor) -> Tensor:
        restart = self.average is None or self.average.shape != delta.shape
        self.average = delta if restart else delta + self.beta * self.average
        return self.average


def apg_update(
    pred_cond: Tensor,
    pred_uncond: Tensor,
    scale: float,
    *,
    eta: float = 0.0,
    norm_threshold: float | None = None,
    momentum: Momentum | None = None,
) -> Tensor:
    """The APG update ``(w - 1) (Delta_orth + eta Delta_par)`` that is added to ``pred_cond``."""
    delta = pred_cond - pred_uncond
    if momentum is not None:
        delta = momentum.update(delta)
    if norm_threshold is not None:
        delta = clip_norm(delta, norm_threshold)
    parallel, orthogonal = project(delta, pred_cond)
    return (scale - 1) * (orthogonal + eta * parallel)


@dataclasses.dataclass
class APGState:
    momentum: Momentum | None
    norm_threshold_rms: float | None


@register("apg")
@dataclasses.dataclass(frozen=True)
class APG(Guidance):
    """Adaptive Projected Guidance.

    Args:
        scale: guidance scale ``w`` (as in CFG).
        eta: weight of the parallel component (0: the paper's choice, 1: keep it).
        norm_threshold: ``r``, the largest per-sample L2 norm of the update;
            ``None`` disables rescaling; ``"auto"`` uses the family default
            (:data:`NORM_THRESHOLD_RMS` times the square root of the sample size).
        momentum: ``beta``; 0 disables it; ``"auto"`` is the paper's -0.5.
        space: ``"x0"`` (denoised prediction, the paper) or ``"model"`` (raw output).
    """

    _: dataclasses.KW_ONLY
    eta: float = 0.0
    norm_threshold: float | Literal["auto"] | None = "auto"
    momentum: float | Literal["auto"] = "auto"
    space: Literal["x0", "model"] = "x0"  # type: ignore[misc]

    def __post_init__(self) -> None:
        super().__post_init__()
        check_real("eta", self.eta, low=0.0, high=1.0)
        if self.norm_threshold not in ("auto", None):
            check_real("norm_threshold", self.norm_threshold, low=0.0)
            if self.norm_threshold == 0:
                raise ValueError("norm_threshold must be > 0 (use None to disable rescaling)")
        if self.momentum != "auto":
            check_real("momentum", self.momentum, low=-1.0, high=1.0)
            if abs(self.momentum) == 1:
                raise ValueError("momentum must satisfy |beta| < 1")
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {self.space!r}")

    def new_state(self, family: str | None = None) -> APGState:
        beta = MOMENTUM if self.momentum == "auto" else self.momentum
        rms = NORM_THRESHOLD_RMS.get(family, NORM_THRESHOLD_RMS[None]) if self.norm_threshold == "auto" else None
        return APGState(Momentum(beta) if beta != 0 else None, rms)

    def update(self, pred_cond: Tensor, pred_other: Tensor, state: APGState | None = None) -> Tensor:
        state = state if state is not None else self.new_state()
        threshold = self.norm_threshold
        if state.norm_threshold_rms is not None:
            threshold = state.norm_threshold_rms * math.sqrt(pred_cond[0].numel())
        return apg_update(
            pred_cond, pred_other, self.scale, eta=self.eta, norm_threshold=threshold, momentum=state.momentum
        )


__all__ = ["APG", "APGState", "Momentum", "apg_update", "clip_norm", "project"]
