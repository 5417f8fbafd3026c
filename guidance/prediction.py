"""Conversions between diffusion parametrisations, as pure tensor functions.

Every model here sees a noisy input on a Gaussian path

    x = alpha * x0 + sigma * eps                                     (1)

and predicts one of: ``"epsilon"`` (eps), ``"v_prediction"``
(v = alpha * eps - sigma * x0, Salimans & Ho 2022), ``"flow"`` (velocity
u = eps - x0 of the rectified-flow path alpha = 1 - s, sigma = s; Lipman et
al. 2023), ``"sample"`` (x0 itself). Every one of them is affine in the
prediction for a fixed ``x``, so each conversion is ``x0 = A x + B pred``
(:func:`x0_coefficients`), and guidance updates map between spaces by the
factor ``B`` alone. The score of the noisy marginal is ``-eps / sigma``.

Schedules give ``(alpha, sigma)`` for a model's timestep: discrete VP
(DDPM-style ``alphas_cumprod``, fractional timesteps interpolated in
log-sigma as k-diffusion and diffusers' Euler schedulers do), continuous VP
(Score SDE), flow matching, VE, and EDM input preconditioning.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

PredictionType = Literal["epsilon", "v_prediction", "flow", "sample"]
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "flow", "sample")


def broadcast(coef: Tensor | float, like: Tensor) -> Tensor:
    """Reshape a per-sample coefficient ``(B,)`` (or a scalar) to broadcast over ``like``."""
    coef = torch.as_tensor(coef, device=like.device)
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape[0], *([1] * (like.ndim - 1)))


def x0_coefficients(alpha: Tensor, sigma: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """``(A, B)`` with ``x0 = A * x + B * pred`` for prediction type ``kind`` on path (1)."""
    if kind == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    if kind == "v_prediction":
        norm = alpha**2 + sigma**2
        return alpha / norm, -sigma / norm
    if kind == "flow":
        norm = alpha + sigma
        return 1.0 / norm, -sigma / norm
    if kind == "sample":
        return torch.zeros_like(alpha), torch.ones_like(alpha)
    raise ValueError(f"unknown prediction type {kind!r}; expected one of {PREDICTION_TYPES}")


def to_x0(pred: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor, kind: str) -> Tensor:
    """Denoised estimate ``x0`` from a model prediction of type ``kind``."""
    a, b = x0_coefficients(alpha, sigma, kind)
    return broadcast(a, x) * x + broadcast(b, x) * pred


def from_x0(x0: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor, kind: str) -> Tensor:
    """The prediction of type ``kind`` that corresponds to the denoised estimate ``x0``."""
    a, b = x0_coefficients(alpha, sigma, kind)
    return (x0 - broadcast(a, x) * x) / broadcast(b, x)


def convert(pred: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor, src: str, dst: str) -> Tensor:
    """Convert a prediction between any two types of :data:`PREDICTION_TYPES`."""
    if src == dst:
        return pred
    return from_x0(to_x0(pred, x, alpha, sigma, src), x, alpha, sigma, dst)


def to_score(pred: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor, kind: str) -> Tensor:
    """Score ``grad log p(x)`` of the noisy marginal: ``-eps / sigma``."""
    eps = convert(pred, x, alpha, sigma, kind, "epsilon")
    return -eps / broadcast(sigma, x)


def from_score(score: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor, kind: str) -> Tensor:
    """The prediction of type ``kind`` whose score is ``score``."""
    eps = -score * broadcast(sigma, x)
    return convert(eps, x, alpha, sigma, "epsilon", kind)


def is_flow_schedule(scheduler_name: str, config: Any) -> bool:
    """Whether a diffusers scheduler (class name and config mapping) runs the flow-matching path (SANA-Sprint's
    TrigFlow ``SCMScheduler``: its pipeline hands the flow model the flow-path sample at ``s = sin t / (sin t +
    cos t)``)."""
    return (
        scheduler_name.startswith("FlowMatch")
        or scheduler_name == "SCMScheduler"
        or config.get("prediction_type") == "flow_prediction"
        or bool(config.get("use_flow_sigmas", False))
    )


def has_log_sigma_timesteps(config: Any) -> bool:
    """Whether a VP scheduler feeds the model ``0.25 log(sigma)`` instead of a discrete timestep: diffusers'
    Euler does so only with ``timestep_type="continuous"`` *and* ``prediction_type="v_prediction"`` (the
    Playground/CosXL recipe); with another prediction type the continuous flag changes nothing."""
    return config.get("timestep_type", "discrete") == "continuous" and config.get("prediction_type") == "v_prediction"


# Schedules: timestep -> (alpha, sigma) of path (1), in float32 on t's device.


class DeviceCopies:
    """A small constant table (a scheduler's ``alphas_cumprod``) and one copy of it per device, made on first use.

    Copying a table from the host each step would stall it: a blocking host-to-device copy waits for the work
    already queued on the GPU, so the host loses its lead and the GPU idles while the next step is launched."""

    def __init__(self, table: Tensor) -> None:
        self.table = table
        self._copies: dict[torch.device, Tensor] = {table.device: table}

    def on(self, device: torch.device | str) -> Tensor:
        device = torch.device(device)
        copy = self._copies.get(device)
        if copy is None:
            copy = self._copies[device] = self.table.to(device)
        return copy


def vp_discrete(alphas_cumprod: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Discrete VP schedule; fractional ``t`` is interpolated linearly in log-sigma.

    ``sigma_ve = sqrt((1 - abar) / abar)`` is the VE noise level of the same
    point; integer ``t`` gives exactly ``alpha = sqrt(abar_t)``.
    """
    ac = alphas_cumprod.to(device=t.device, dtype=torch.float64)
    log_sigmas = 0.5 * torch.log((1 - ac) / ac)  # +inf where abar = 0 (a zero-terminal-SNR schedule's last step)
    t = t.to(torch.float64).clamp(0, len(ac) - 1)
    low = t.floor().long()
    high = (low + 1).clamp(max=len(ac) - 1)
    w = t - low
    # at integer t the low entry alone (0 * inf would be NaN next to a zero-SNR step)
    log_sigma = torch.where(w == 0, log_sigmas[low], (1 - w) * log_sigmas[low] + w * log_sigmas[high])
    # (alpha, sigma) = (1, s) / sqrt(1 + s^2) through the sigmoid, finite at s = inf: (0, 1)
    alpha, sigma = torch.sigmoid(-2 * log_sigma).sqrt(), torch.sigmoid(2 * log_sigma).sqrt()
    return alpha.float(), sigma.float()


def vp_continuous(t: Tensor, beta_min: float = 0.1, beta_max: float = 20.0) -> tuple[Tensor, Tensor]:
    """Score-SDE VP schedule for ``t`` in [0, 1]: ``log abar = -t^2 (bmax - bmin) / 2 - t bmin``."""
    t = t.float()
    log_abar = -0.5 * t**2 * (beta_max - beta_min) - t * beta_min
    alpha = torch.exp(0.5 * log_abar)
    return alpha, torch.sqrt(-torch.expm1(log_abar))


def ve_to_vp(sigma_ve: Tensor) -> tuple[Tensor, Tensor]:
    """The VP point ``(1, s) / sqrt(1 + s^2)`` of the VE noise level ``s``."""
    alpha = torch.rsqrt(1 + sigma_ve**2)
    return alpha, sigma_ve * alpha


def flow(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Rectified-flow path ``x = (1 - s) x0 + s eps``."""
    sigma = sigma.float()
    return 1 - sigma, sigma


def ve(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Variance-exploding path ``x = x0 + s eps``."""
    sigma = sigma.float()
    return torch.ones_like(sigma), sigma


def edm(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor]:
    """EDM input preconditioning (Karras et al. 2022): the model sees ``(x0 + s eps) / sqrt(s^2 + sd^2)``."""
    sigma = sigma.float()
    c_in = torch.rsqrt(sigma**2 + sigma_data**2)
    return c_in, sigma * c_in


def edm_x0_coefficients(alpha: Tensor, sigma: Tensor, sigma_data: float, sign: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(A, B)`` for EDM's ``F`` output on the preconditioned input: ``x0 = c_skip x_ve + c_out F``.

    ``sign`` is -1 for diffusers' EDM ``"v_prediction"`` (``c_out`` negated).
    """
    return sigma_data**2 * alpha, sign * sigma_data * sigma
