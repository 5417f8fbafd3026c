"""One denoiser contract for score-based samplers, and thin adapters to it.

A denoiser sees a sample on the variance-exploding (VE) scale, ``x = x0 + sigma * eps``,
and returns its estimate of ``x0`` (k-diffusion's ``model(x, sigma) -> denoised``; Karras et
al. 2022). By Tweedie's formula the score of the noisy marginal follows from it:

    grad log p_sigma(x) = (D(x, sigma) - x) / sigma^2

Adapters: :class:`DiffusersDenoiser` (any diffusers UNet or transformer trained with a VP
``alphas_cumprod`` schedule or with flow matching), and the exact denoisers of a diagonal
Gaussian and of a Gaussian mixture, for tests and docs. The conversions between
parametrisations are those of :mod:`.prediction`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor

from . import prediction as P

DenoiseFn = Callable[[Tensor, Tensor], Tensor]


class Denoiser(Protocol):
    """``D(x, sigma) -> x0`` for ``x = x0 + sigma * eps`` and per-sample ``sigma`` of shape ``(B,)``."""

    def denoise(self, x: Tensor, sigma: Tensor) -> Tensor: ...

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor: ...


def per_sample(sigma: Tensor | float, x: Tensor) -> Tensor:
    """``sigma`` as a ``(B,)`` tensor on ``x``'s device (a scalar is repeated over the batch)."""
    dtype = None if isinstance(sigma, Tensor) else x.dtype
    sigma = torch.as_tensor(sigma, dtype=dtype, device=x.device).reshape(-1)
    if sigma.numel() == 1:
        return sigma.expand(x.shape[0])
    if sigma.shape[0] != x.shape[0]:
        raise ValueError(f"sigma has {sigma.shape[0]} entries for a batch of {x.shape[0]}")
    return sigma


def score_from_denoised(denoised: Tensor, x: Tensor, sigma: Tensor | float) -> Tensor:
    """Tweedie's formula on the VE scale: ``grad log p_sigma(x) = (D(x, sigma) - x) / sigma^2``."""
    return (denoised - x) / P.broadcast(sigma, x) ** 2


def score(model: Denoiser | DenoiseFn, x: Tensor, sigma: Tensor) -> Tensor:
    """The score ``(D(x, sigma) - x) / sigma^2`` of a denoiser (Vincent 2011; Karras et al. 2022, eq. 3)."""
    return score_from_denoised(model(x, sigma), x, sigma)


class DiffusersDenoiser:
    """A diffusers denoiser (UNet or transformer) seen as ``D(x, sigma)`` on the VE scale.

    ``scheduler`` is the model's scheduler or its config: a VP schedule (``alphas_cumprod``,
    prediction type ``epsilon``, ``v_prediction`` or ``sample``) or flow matching. VP: the
    model sees ``x / sqrt(1 + sigma^2)`` at the fractional timestep whose log-sigma
    interpolation gives ``sigma`` (diffusers' ``_sigma_to_t``); flow: it sees ``x / (1 + sigma)``
    at ``t = N sigma / (1 + sigma)``. ``model_kwargs`` (``encoder_hidden_states``,
    ``class_labels``, ...) go to every call, merged with those given per call.
    """

    def __init__(self, model: Any, scheduler: Any, **model_kwargs: Any) -> None:
        config = getattr(scheduler, "config", scheduler)
        name = config.get("_class_name", type(scheduler).__name__)
        kind = config.get("prediction_type", "epsilon")
        self.model, self.model_kwargs = model, model_kwargs
        self.num_train_timesteps = config.get("num_train_timesteps", 1000)
        # FLUX transformers take t / 1000 and scale it back up themselves (as FluxPipeline calls them)
        self.timestep_scale = 1.0 / self.num_train_timesteps if type(model).__name__.startswith("Flux") else 1.0
        if name.startswith("EDM") or P.has_log_sigma_timesteps(config):
            raise ValueError(f"{name}: continuous-time (EDM-style) timesteps are not supported, only VP and flow")
        if P.is_flow_schedule(name, config):
            self.prediction_type, self.alphas_cumprod = "flow", None
        elif kind in ("epsilon", "v_prediction", "sample"):
            self.prediction_type, self.alphas_cumprod = kind, _alphas_cumprod(scheduler, config)
        else:
            raise ValueError(f"{name} with prediction_type {kind!r} is neither a VP nor a flow-matching schedule")

    def _tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``alphas_cumprod`` and :attr:`log_sigmas` on ``device``, copied once (see :class:`.DeviceCopies`)."""
        copies = getattr(self, "_copies", None)
        if copies is None or copies[0].table is not self.alphas_cumprod:  # made anew if the table is replaced
            copies = self._copies = (P.DeviceCopies(self.alphas_cumprod), P.DeviceCopies(self.log_sigmas))
        return copies[0].on(device), copies[1].on(device)

    @property
    def log_sigmas(self) -> Tensor:
        """VE log-sigma of each trained VP timestep (float64, increasing)."""
        return 0.5 * torch.log((1 - self.alphas_cumprod) / self.alphas_cumprod)

    @property
    def timestep_range(self) -> tuple[float, float]:
        """Trained timesteps of finite noise: VP ``[0, N - 1]``, flow ``[1, N - 1]`` (``t = N`` is pure noise)."""
        if self.alphas_cumprod is None:
            return 1.0, self.num_train_timesteps - 1.0
        return 0.0, len(self.alphas_cumprod) - 1.0

    @property
    def sigma_min(self) -> float:
        """The smallest trained noise level (VE scale)."""
        return float(self.t_to_sigma(torch.tensor([self.timestep_range[0]])))

    @property
    def sigma_max(self) -> float:
        """The largest finite trained noise level (VE scale)."""
        return float(self.t_to_sigma(torch.tensor([self.timestep_range[1]])))

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """VE noise level of the model's (fractional) timestep ``t``."""
        if self.alphas_cumprod is None:
            alpha, sigma = P.flow(t / self.num_train_timesteps)
        else:
            alpha, sigma = P.vp_discrete(self._tables(t.device)[0], t)
        return sigma / alpha

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """The model's fractional timestep for the VE noise level ``sigma``."""
        if self.alphas_cumprod is None:
            return (sigma / (1 + sigma) * self.num_train_timesteps).float()
        log_sigmas = self._tables(sigma.device)[1]
        log_sigma = sigma.to(torch.float64).clamp_min(1e-10).log()
        low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, len(log_sigmas) - 2)
        w = (log_sigma - log_sigmas[low]) / (log_sigmas[low + 1] - log_sigmas[low])
        return (low + w.clamp(0, 1)).float()

    def denoise(self, x: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        """``x0`` from the model's prediction at VE noise level ``sigma`` (``(B,)`` or a scalar)."""
        sigma = per_sample(sigma, x)
        if self.alphas_cumprod is None:
            alpha, sigma_model = P.flow(sigma / (1 + sigma))
        else:
            alpha, sigma_model = P.ve_to_vp(sigma)
        x_in = P.broadcast(alpha, x) * x  # the same point on the model's path
        dtype = getattr(self.model, "dtype", x.dtype)
        timestep = self.sigma_to_t(sigma) * self.timestep_scale
        out = self.model(x_in.to(dtype), timestep=timestep, **{**self.model_kwargs, **kwargs})
        pred = out if isinstance(out, Tensor) else out.sample if hasattr(out, "sample") else out[0]
        if pred.shape[1] == 2 * x.shape[1]:  # learned-variance channels (improved DDPM, DiT, IF)
            pred = pred[:, : x.shape[1]]
        return P.to_x0(pred.to(x_in.dtype), x_in, alpha, sigma_model, self.prediction_type).to(x.dtype)

    __call__ = denoise


def _alphas_cumprod(scheduler: Any, config: Mapping[str, Any]) -> Tensor:
    """The VP table (float64), without a zero-terminal-SNR tail where sigma is infinite or decreasing."""
    ac = getattr(scheduler, "alphas_cumprod", None)
    if ac is None:
        if "beta_start" not in config and "trained_betas" not in config:
            raise ValueError("a scheduler config without betas: pass the scheduler itself or its full config")
        from diffusers import DDPMScheduler

        ac = DDPMScheduler.from_config(config).alphas_cumprod
    ac = torch.as_tensor(ac, dtype=torch.float64).cpu()
    log_sigmas = 0.5 * torch.log((1 - ac) / ac)
    increasing = torch.cat([torch.ones(1, dtype=torch.bool), log_sigmas.diff() > 0])
    return ac[: int((increasing & log_sigmas.isfinite()).cumprod(0).sum())]


class GaussianDenoiser:
    """Exact denoiser of diagonal Gaussian data ``N(mean, var)``: ``x0 = mean + var / (var + sigma^2) (x - mean)``."""

    def __init__(self, mean: Tensor, var: Tensor | float) -> None:
        self.mean, self.var = torch.as_tensor(mean), torch.as_tensor(var)
        if (self.var <= 0).any():
            raise ValueError("var must be positive")

    def denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        mean, var = self.mean.to(x), self.var.to(x)
        return mean + var / (var + P.broadcast(per_sample(sigma, x), x) ** 2) * (x - mean)

    __call__ = denoise


class GaussianMixtureDenoiser:
    """Exact denoiser of ``sum_k w_k N(mean_k, var)`` (shared diagonal ``var``): the posterior-weighted means."""

    def __init__(self, means: Tensor, var: Tensor | float, weights: Tensor) -> None:
        self.means, self.var, weights = torch.as_tensor(means), torch.as_tensor(var), torch.as_tensor(weights)
        if weights.shape != self.means.shape[:1] or (weights <= 0).any() or (self.var <= 0).any():
            raise ValueError("need one positive weight per component of means (K, ...) and a positive var")
        self.log_weights = (weights / weights.sum()).log()

    def denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        means, var = self.means.to(x).unsqueeze(1), self.var.to(x)  # (K, 1, ...)
        total = var + P.broadcast(per_sample(sigma, x), x) ** 2  # var + sigma^2
        diff = x - means  # (K, B, ...)
        # responsibilities p(k | x); the Gaussians share their covariance, so its log-determinant cancels
        logits = self.log_weights.to(x)[:, None] - 0.5 * (diff**2 / total).flatten(2).sum(-1)
        resp = torch.softmax(logits, dim=0).reshape(*logits.shape, *[1] * (x.ndim - 1))
        return (resp * (means + var / total * diff)).sum(0)

    __call__ = denoise
