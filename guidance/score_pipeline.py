"""Score-based sampling of a diffusers denoiser, pipeline style: PIL images out.

``ScoreSamplingPipeline(unet, scheduler)`` views the model as a VE denoiser
(:class:`guidance.denoisers.DiffusersDenoiser`) and samples it with annealed
Langevin dynamics (Song & Ermon 2019) or predictor-corrector sampling (Song et
al. 2021) over geometric noise levels spanning the model's trained range.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .denoisers import DiffusersDenoiser
from .samplers import SAMPLERS, geometric_sigmas


class ScoreSamplingPipeline:
    """Annealed Langevin / predictor-corrector sampling of an unconditional ``UNet2DModel`` and its scheduler."""

    def __init__(self, unet: Any, scheduler: Any) -> None:
        self.unet, self.scheduler = unet, scheduler
        self.denoiser = DiffusersDenoiser(unet, scheduler)

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> ScoreSamplingPipeline:
        """Load a saved ``DDPMPipeline``-style folder (``unet`` + ``scheduler``) from safetensors."""
        from diffusers import DDPMPipeline

        pipe = DDPMPipeline.from_pretrained(path, use_safetensors=True, **kwargs)
        return cls(pipe.unet, pipe.scheduler)

    def to(self, device: str | torch.device) -> ScoreSamplingPipeline:
        self.unet.to(device)
        return self

    def sigmas(self, num_levels: int, sigma_max: float | None = None, sigma_min: float | None = None) -> Tensor:
        """Geometric levels from ``sigma_max`` (default: the model's largest) to ``sigma_min`` (default 0.01)."""
        high = sigma_max if sigma_max is not None else min(self.denoiser.sigma_max, 50.0)
        low = sigma_min if sigma_min is not None else max(self.denoiser.sigma_min, 0.01)
        return geometric_sigmas(high, low, num_levels)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 4,
        *,
        sampler: str = "annealed_langevin",
        num_levels: int = 10,
        sigma_max: float | None = None,
        sigma_min: float | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        output_type: str = "pil",
        **options: Any,
    ) -> list[Image.Image] | Tensor:
        """Draw ``batch_size`` samples; ``options`` go to the sampler (``steps_per_level``, ``epsilon``, ``snr``...)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; known: {sorted(SAMPLERS)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if output_type not in ("pil", "pt"):
            raise ValueError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
        sigmas = self.sigmas(num_levels, sigma_max, sigma_min)
        config = self.unet.config
        shape = (batch_size, config.in_channels, config.sample_size, config.sample_size)
        # the sampler's state keeps at least float32 (a half-precision model is cast to at each evaluation): the
        # Langevin steps are small against sigma_max, and in float16 they would round away
        device, dtype = self.unet.device, torch.promote_types(self.unet.dtype, torch.float32)
        if generator is None:
            generator = torch.Generator()
            generator.seed()  # fresh entropy, the global RNG untouched
        if isinstance(generator, Sequence):
            if len(generator) != batch_size:
                raise ValueError(f"got {len(generator)} generators for a batch of {batch_size}")
            noise = torch.stack([torch.randn(shape[1:], generator=g, device=g.device) for g in generator])
        else:
            noise = torch.randn(shape, generator=generator, device=generator.device)
        x = noise.to(device, dtype) * sigmas[0].item()
        images = SAMPLERS[sampler](self.denoiser, x, sigmas.to(device), generator=generator, **options)
        images = (images.float().clamp(-1, 1) + 1) / 2
        if output_type == "pt":
            return images
        pixels = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        return [Image.fromarray(p.squeeze(-1) if p.shape[-1] == 1 else p) for p in pixels]
