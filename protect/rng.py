"""Random draws for the protections: every number comes from the caller's generator (one per image for results
that do not depend on the batch, diffusers' convention), drawn on the generator's device."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensor = torch.Tensor
Generators = torch.Generator | Sequence[torch.Generator] | None

__all__ = ["Generators", "check_generators", "draw"]


def _rng_device(generator: torch.Generator | None, like: Tensor) -> torch.device:
    """Draw on the generator's device (then move to ``like``'s), so a CPU generator drives a GPU attack."""
    return generator.device if generator is not None else like.device


def check_generators(generator: Generators, n: int) -> None:
    """Raises when a list of generators does not hold one per image of a batch of ``n``."""
    if isinstance(generator, list | tuple) and len(generator) != n:
        raise ValueError(f"got {len(generator)} generators for a batch of {n} images; pass one per image")


def draw(kind: str | int, shape: Sequence[int], generator: Generators, like: Tensor, dtype: torch.dtype | None = None):
    """``torch.rand`` / ``randn`` / ``randint(high)`` of ``shape`` (batch first) on ``like``'s device.

    ``kind`` is "rand", "randn" or an int ``high`` for ``randint``. With a list of generators, image ``i`` draws
    from ``generator[i]`` alone, so its numbers do not depend on the batch it is in (diffusers' convention).
    """
    if isinstance(generator, list | tuple):
        check_generators(generator, shape[0])
        return torch.cat([draw(kind, (1, *shape[1:]), g, like, dtype) for g in generator])
    device = _rng_device(generator, like)
    if isinstance(kind, int):
        out = torch.randint(kind, tuple(shape), generator=generator, device=device)
    else:
        fn = torch.rand if kind == "rand" else torch.randn
        out = fn(tuple(shape), generator=generator, device=device, dtype=dtype or like.dtype)
    return out.to(like.device)
