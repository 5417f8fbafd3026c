"""The extension point for guidance methods, and their registry.

A method combines the conditional prediction with the prediction of another
branch (the unconditional one for CFG-like methods) into an *update* that is
added to the conditional prediction:

    D = D_c + sum_m update_m(D_c, D_other_m)

in the space the method asks for (``"x0"``, the denoised prediction, or
``"model"``, the raw network output). Methods are frozen dataclasses; any
per-sampling-run state (e.g. APG's momentum buffer) lives in the object
returned by :meth:`Guidance.new_state`, which the caller creates afresh at the
start of every run.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, ClassVar

from torch import Tensor, nn

SPACES = ("x0", "model")
REGISTRY: dict[str, type[Guidance]] = {}


def register(name: str):
    """Class decorator: list a method under ``name`` (the name the CLI and the app show)."""

    def wrap(cls: type[Guidance]) -> type[Guidance]:
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return wrap


def finite(value: float) -> bool:
    """``math.isfinite`` that calls an int too large for a float (10**400) not finite, instead of raising."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def check_real(name: str, value: Any, *, low: float = -math.inf, high: float = math.inf) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite real number in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not finite(value):
        raise ValueError(f"{name} must be a finite number, got {repr(value)[:40]}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")


@dataclasses.dataclass(frozen=True)
class Guidance:
    """Base class of guidance methods (see the module docstring)."""

    name: ClassVar[str] = ""
    #: which extra branch the method needs beside the conditional one
    branch: ClassVar[str] = "uncond"

    #: where the update is computed: "model" (raw output) or "x0" (denoised)
    space: ClassVar[str] = "model"

    scale: float
    _: dataclasses.KW_ONLY
    #: the fraction of the denoising calls of a run during which the method acts
    start: float = 0.0
    stop: float = 1.0

    def __post_init__(self) -> None:
        check_real("scale", self.scale)
        if self.scale < 0:
            raise ValueError(
                f"{type(self).__name__}: scale must be >= 0 (0 switches the method's update off; a negative scale "
                f"would guide toward the {self.branch} branch instead of away from it), got {self.scale!r}"
            )
        check_real("start", self.start, low=0.0, high=1.0)
        check_real("stop", self.stop, low=0.0, high=1.0)
        if self.start >= self.stop:
            raise ValueError(f"start must be < stop, got start={self.start}, stop={self.stop}")

    def active(self, fraction: float) -> bool:
        """Whether the method acts at ``fraction`` (in [0, 1)) of the run."""
        return self.start <= fraction < self.stop

    def new_state(self, family: str | None = None) -> Any:
        """Fresh per-run state (``None`` if the method is stateless)."""
        return None

    def update(self, pred_cond: Tensor, pred_other: Tensor, state: Any = None) -> Tensor:
        raise NotImplementedError

    def save_state(self, state: Any) -> Any:
        """A snapshot of the per-run state, taken before evaluations that must not count (the corrector's)."""
        return copy.deepcopy(state)

    def restore_state(self, state: Any, saved: Any) -> Any:
        """The state to go on with after those evaluations: by default the snapshot (they left no trace)."""
        return saved

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Guidance:
        data = dict(data)
        name = data.pop("method", None)
        if name not in REGISTRY:
            raise ValueError(f"unknown guidance method {name!r}; known: {sorted(REGISTRY)}")
        return REGISTRY[name](**data)


def perturbation_update(pred_cond: Tensor, pred_perturbed: Tensor, scale: float) -> Tensor:
    """``s (eps_c - eps_ptb)``: the update of every weak-model guidance."""
    return scale * (pred_cond - pred_perturbed)


@dataclasses.dataclass(frozen=True)
class AttentionEdit:
    """On an attention layer: ``(1 - u) SDPA(q, k, v) + u v`` on ``heads`` (all if ``None``); ``image_only``:
    on joint attention, image tokens attend only to themselves among image tokens (and to all text tokens)."""

    heads: tuple[int, ...] | None = None
    strength: float = 1.0
    image_only: bool = False


@dataclasses.dataclass(frozen=True)
class TokenShuffle:
    """At a block's input: the tokens of the hidden states in a random order, drawn from the method's generator
    (its per-run state)."""


@dataclasses.dataclass(frozen=True)
class BlockSkip:
    """A transformer block that passes its input through: its outputs become its ``hidden_states`` (and
    ``encoder_hidden_states``) inputs, as diffusers' ``skip_layers`` leaves a skipped block out."""


LayerEdit = AttentionEdit | TokenShuffle | BlockSkip


class Perturbation(Guidance):
    """Base class of weak-model guidance (PAG, SoftPAG, TPG, SLG): ``D = D_c + s (D_c - D_weak)``.

    The weak model is the denoiser with some layers edited; :meth:`edits` names them and says how
    (:class:`AttentionEdit`, :class:`TokenShuffle`, :class:`BlockSkip`). ``guide()`` installs the edits as hooks
    that act only on the batch rows of this method's branch, so every branch runs in one denoiser call.
    """

    branch: ClassVar[str] = "perturbed"

    def update(self, pred_cond: Tensor, pred_other: Tensor, state: Any = None) -> Tensor:
        return perturbation_update(pred_cond, pred_other, self.scale)

    def edits(self, denoiser: nn.Module) -> dict[str, LayerEdit]:
        """The layers of ``denoiser`` (by module name) that the weak model changes, and how."""
        raise NotImplementedError
