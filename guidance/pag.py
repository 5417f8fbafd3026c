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

from torch import Tensor, nn

from .layers import Selector, default_layers, select, self_attention_layers
from .method import AttentionEdit, Perturbation, check_real, perturbation_update, register

__all__ = ["PAG", "SoftPAG", "heads_by_layer", "layer_selection", "perturbation_update", "soft_identity"]


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


@register("pag")
@dataclasses.dataclass(frozen=True)
class PAG(Perturbation):
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

    def edits(self, denoiser: nn.Module) -> dict[str, AttentionEdit]:
        attention = self_attention_layers(denoiser)
        layers = default_layers(attention) if self.layers == "auto" else self.layers
        edit = AttentionEdit(image_only=self.joint == "image")
        return dict.fromkeys(select(attention, layers, "self-attention layer"), edit)


@register("softpag")
@dataclasses.dataclass(frozen=True)
class SoftPAG(Perturbation):
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

    def edits(self, denoiser: nn.Module) -> dict[str, AttentionEdit]:
        chosen = heads_by_layer(self_attention_layers(denoiser), self.heads)
        return {name: AttentionEdit(tuple(heads), self.strength) for name, heads in chosen.items()}

    @classmethod
    def from_json(cls, path: str | Path, scale: float, *, top: int | None = None, **kwargs: Any) -> SoftPAG:
        """Load heads ranked by :func:`guidance.search.headhunter` (a JSON list of ``{"layer", "head"}``)."""
        data = json.loads(Path(path).read_text())
        ranked = data["heads"] if isinstance(data, dict) else data
        heads = tuple((item["layer"], int(item["head"])) for item in ranked[:top])
        return cls(scale, heads=heads, **kwargs)


def heads_by_layer(attention: dict[str, nn.Module], pairs: tuple) -> dict[str, list[int]]:
    """``(layer selector, head)`` pairs grouped by the attention layers they select; head indices checked."""
    chosen: dict[str, set[int]] = {}
    for layer, head in pairs:
        for name, module in select(attention, [layer], "self-attention layer").items():
            count = getattr(module, "heads", None)
            if count is not None and head >= count:
                raise ValueError(f"head {head} is out of range for {name}, which has {count} heads")
            chosen.setdefault(name, set()).add(head)
    return {name: sorted(heads) for name, heads in chosen.items()}
