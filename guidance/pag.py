"""Perturbed-Attention Guidance (Ahn et al. 2024) and head-level SoftPAG (HeadHunter, 2025).

The weak model replaces the self-attention map of chosen layers by the identity,
``SA(Q, K, V) = V``; guidance moves away from it:

    eps = eps_c + s (eps_c - eps_ptb)                     (plus any CFG/APG update)

SoftPAG perturbs single heads with a strength ``u`` in [0, 1]:
``A' = (1 - u) A + u I``, which with softmax attention is exactly
``(1 - u) SDPA(q, k, v) + u v`` for that head, so fused kernels still serve
it. On MMDiT joint attention the identity acts over the joint (text + image)
sequence. SoftPAG with ``u = 1`` on all heads of a layer is PAG on that layer.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from torch import Tensor

from .layers import Selector
from .method import Guidance, check_real, register


def perturbation_update(pred_cond: Tensor, pred_perturbed: Tensor, scale: float) -> Tensor:
    """``s (eps_c - eps_ptb)``: the update of every weak-model guidance."""
    return scale * (pred_cond - pred_perturbed)


def soft_identity(out: Tensor, value: Tensor, strength: float, heads: Sequence[int] | None = None) -> Tensor:
    """``(1 - u) out + u v`` on the given heads (dim 1 of ``(B, H, L, D)``), all heads if ``None``."""
    if heads is None:
        return value if strength == 1 else out + strength * (value - out)
    mixed = out.clone()
    index = list(heads)
    mixed[:, index] = out[:, index] + strength * (value[:, index] - out[:, index])
    return mixed


def layer_selection(layers: Any) -> tuple[Selector, ...] | Literal["auto"]:
    """``layers`` as stored: ``"auto"``, or a tuple of selectors (one name or index, or a list, become a tuple)."""
    if layers == "auto":
        return layers
    if isinstance(layers, (str, int)) and not isinstance(layers, bool):
        layers = (layers,)  # one selector, as diffusers' pag_applied_layers="mid"
    if not isinstance(layers, (tuple, list)) or not layers:
        raise ValueError(
            f"layers must be 'auto', one layer name / pattern / index, or a non-empty sequence (tuple or list) "
            f"of them, got {layers!r}"
        )
    return tuple(layers)


class _Perturbation(Guidance):
    """Guidance away from a weak (perturbed) model: ``s (eps_c - eps_ptb)``."""

    branch = "perturbed"

    def update(self, pred_cond: Tensor, pred_other: Tensor, state: Any = None) -> Tensor:
        return perturbation_update(pred_cond, pred_other, self.scale)


@register("pag")
@dataclasses.dataclass(frozen=True)
class PAG(_Perturbation):
    """Perturbed-Attention Guidance: identity self-attention in ``layers`` (see :mod:`guidance.layers`).

    ``layers="auto"``: the UNet's middle block, or the middle transformer block.
    """

    _: dataclasses.KW_ONLY
    layers: tuple[Selector, ...] | Literal["auto"] = "auto"
    #: on joint (text + image) attention: "full" is the identity over the joint sequence (HeadHunter);
    #: "image" lets image tokens attend to themselves and to the text, as diffusers' SD3 PAG pipeline does
    joint: Literal["full", "image"] = "full"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layers", layer_selection(self.layers))
        if self.joint not in ("full", "image"):
            raise ValueError(f"joint must be 'full' or 'image', got {self.joint!r}")


@register("softpag")
@dataclasses.dataclass(frozen=True)
class SoftPAG(_Perturbation):
    """Head-level soft PAG: ``(1 - u) attention + u value`` on each ``(layer, head)`` of ``heads``."""

    _: dataclasses.KW_ONLY
    heads: tuple[tuple[Selector, int], ...] = ()
    strength: float = 0.25

    def __post_init__(self) -> None:
        super().__post_init__()
        heads = tuple(tuple(pair) for pair in self.heads)
        object.__setattr__(self, "heads", heads)
        if not heads:
            raise ValueError("SoftPAG needs at least one (layer, head) pair in heads")
        for pair in heads:
            if len(pair) != 2 or isinstance(pair[1], bool) or not isinstance(pair[1], int) or pair[1] < 0:
                raise ValueError(f"each head must be a (layer, head index >= 0) pair, got {pair!r}")
        check_real("strength", self.strength, low=0.0, high=1.0)

    @classmethod
    def from_json(cls, path: str | Path, scale: float, *, top: int | None = None, **kwargs: Any) -> SoftPAG:
        """Load heads ranked by :func:`guidance.search.headhunter` (a JSON list of ``{"layer", "head"}``)."""
        data = json.loads(Path(path).read_text())
        ranked = data["heads"] if isinstance(data, dict) else data
        heads = tuple((item["layer"], int(item["head"])) for item in ranked[:top])
        return cls(scale, heads=heads, **kwargs)
