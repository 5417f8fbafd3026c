"""Skip-Layer Guidance (SLG): the weak model is the denoiser with some transformer blocks left out.

    eps = eps_c + s (eps_c - eps_skip)

Stability AI's guidance for SD 3.5 (diffusers' ``StableDiffusion3Pipeline(skip_guidance_layers=...)``, whose
defaults are the ones here: blocks 7, 8 and 9 of SD 3.5 Medium, ``s = 2.8``, during ``0.01 <= i / n < 0.2`` of the
steps; the pipeline's window excludes its start, ``0.01 < i / n``, which differs only when ``0.01 n`` is a whole
step). As a perturbation of ``guide()`` it runs batched with the other branches, on every family (a skipped block's
outputs are its inputs, whatever it is: SD3 / FLUX / Qwen-Image joint blocks, FLUX single blocks, DiT / PixArt /
UNet basic blocks), and composes with CFG, APG and the other perturbations.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from torch import nn

from .layers import Selector, default_layers, select, transformer_blocks
from .method import BlockSkip, Perturbation, register
from .pag import layer_selection

#: SD 3.5 Medium's recommended blocks (diffusers' StableDiffusion3Pipeline docs)
SD35_LAYERS = (7, 8, 9)


@register("slg")
@dataclasses.dataclass(frozen=True)
class SLG(Perturbation):
    """Skip-Layer Guidance: the transformer blocks chosen by ``layers`` (indices, names or patterns among the
    denoiser's transformer blocks, :mod:`guidance.layers`; "auto": the middle block of the stack, PAG's default
    layer, which is where it helps on the demo DiT) left out of the weak branch."""

    scale: float = 2.8
    _: dataclasses.KW_ONLY
    layers: tuple[Selector, ...] | Literal["auto"] = SD35_LAYERS
    start: float = 0.01
    stop: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layers", layer_selection(self.layers))

    def edits(self, denoiser: nn.Module) -> dict[str, BlockSkip]:
        blocks = transformer_blocks(denoiser)
        layers = default_layers(blocks) if self.layers == "auto" else self.layers
        return dict.fromkeys(select(blocks, layers, "transformer block"), BlockSkip())


__all__ = ["SD35_LAYERS", "SLG"]
