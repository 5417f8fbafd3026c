"""Token Perturbation Guidance (TPG, 2025).

The weak model shuffles the tokens of the hidden states entering chosen
transformer blocks, ``h' = P h`` with a random permutation ``P`` of the token
axis (norm preserving, no training); guidance moves away from it:

    eps = eps_c + s (eps_c - eps_tpg)

A fresh permutation is drawn for every block call from a generator seeded with
``seed`` at the start of each pipeline call, so results are reproducible. The
official SDXL setting shuffles in the ``down_blocks.2`` transformer blocks with
``s = 3``; ``layers="auto"`` takes those blocks where the UNet has them.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import Tensor, nn

from .layers import Selector, default_layers, has_motion_modules, select, spatial, transformer_blocks
from .method import Perturbation, TokenShuffle, register
from .pag import layer_selection

OFFICIAL_BLOCK = "down_blocks.2"  # where the official SDXL code shuffles (papers.md, TPG)


def shuffle_tokens(hidden: Tensor, generator: torch.Generator, valid: Tensor | None = None) -> Tensor:
    """``P h``: the tokens (dim 1 of ``(B, L, C)``) in one random order, shared by the batch. With a padding mask
    ``valid`` (``(B, L)`` bool, True: a real token; Z-Image pads its [image, caption] sequences per batch), each
    row's real tokens are shuffled among themselves, one order per row drawn in row order, and its padding stays."""
    if valid is None:
        order = torch.randperm(hidden.shape[1], generator=generator, device=generator.device)
        return hidden[:, order.to(hidden.device)]
    shuffled = hidden.clone()
    for row in range(hidden.shape[0]):
        where = valid[row].nonzero().squeeze(-1)
        order = torch.randperm(where.numel(), generator=generator, device=generator.device).to(where.device)
        shuffled[row, where] = hidden[row, where[order]]
    return shuffled


def auto_layers(blocks: dict[str, nn.Module]) -> list[str]:
    """TPG's "auto" layers: the official code's ``down_blocks.2`` transformer blocks where the UNet has them
    (SDXL, SD 1.x/2.x; a video UNet's spatial ones, not its motion modules), else PAG's default
    (:func:`guidance.layers.default_layers`)."""
    if any(name.startswith(OFFICIAL_BLOCK + ".") for name in blocks):
        return [spatial(OFFICIAL_BLOCK)] if has_motion_modules(blocks) else [OFFICIAL_BLOCK]
    return default_layers(blocks)


@register("tpg")
@dataclasses.dataclass(frozen=True)
class TPG(Perturbation):
    """Token Perturbation Guidance: token shuffle at the input of the blocks chosen by ``layers``."""

    _: dataclasses.KW_ONLY
    layers: tuple[Selector, ...] | Literal["auto"] = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layers", layer_selection(self.layers))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")

    def edits(self, denoiser: nn.Module) -> dict[str, TokenShuffle]:
        blocks = transformer_blocks(denoiser)
        layers = auto_layers(blocks) if self.layers == "auto" else self.layers
        return dict.fromkeys(select(blocks, layers, "transformer block"), TokenShuffle())

    def new_state(self, family: str | None = None) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def save_state(self, state: torch.Generator) -> None:
        return None

    def restore_state(self, state: torch.Generator, saved: None) -> torch.Generator:
        """The generator goes on: the corrector's evaluations draw their own permutations."""
        return state
