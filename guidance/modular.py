"""Our methods as diffusers ``BaseGuidance`` guiders, for modular pipelines.

Modular guiders receive only the branch predictions (not the noisy sample), so
they serve methods in ``"model"`` space: CFG, APG with ``space="model"``, and the
weak-model guidance (PAG, SoftPAG, TPG, SLG), which is the same in every space.
A modular denoise loop calls the denoiser once per branch, so each weak model
is its own denoiser call: the guider installs the method's layer edits (the same
hooks ``guide()`` uses, acting on every row of that call) in ``prepare_models``
and removes them in ``cleanup_models``.
The per-run state is renewed at step 0, as diffusers' own guiders do.
Available when the installed diffusers has ``diffusers.guiders``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from .hooks import ACTIVE_RUN, PASS, intercept_calls
from .method import Guidance, Perturbation
from .pag import PAG
from .perturbation import install

try:
    from diffusers.configuration_utils import register_to_config
    from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput
except ImportError:  # diffusers without modular guiders
    BaseGuidance = None

COND, UNCOND = "pred_cond", "pred_uncond"


def as_guider(*methods: Guidance, start: float | None = None, stop: float | None = None) -> Any:
    """A ``BaseGuidance`` running ``methods``: at most one of the unconditional branch (CFG, or APG in model space)
    and any weak-model guidance (PAG, SoftPAG, TPG, SLG), combined as ``guide()`` combines them.

    Each method acts at steps ``i`` of ``n`` with ``start <= i / n < stop``, as in ``guide()``; ``start`` and
    ``stop`` given here replace every method's own.
    """
    if BaseGuidance is None:
        raise ImportError("the installed diffusers has no `diffusers.guiders` (modular guiders need diffusers>=0.35)")
    _check(methods)
    interval = {k: v for k, v in (("start", start), ("stop", stop)) if v is not None}
    methods = tuple(dataclasses.replace(m, **interval) for m in methods)  # validated as each method's own interval
    return SteerguardGuider(
        methods=[m.to_dict() for m in methods],
        start=min(m.start for m in methods),
        stop=max(m.stop for m in methods),
    )


def _check(methods: tuple[Any, ...]) -> None:
    if not methods:
        raise ValueError("as_guider() needs at least one guidance method")
    for method in methods:
        if not isinstance(method, Guidance):
            raise TypeError(f"as_guider() takes guidance methods (CFG, APG, PAG, ...), got {type(method).__name__}")
        if method.branch == "uncond" and method.space != "model":
            raise ValueError(
                f"{type(method).__name__}(space={method.space!r}): modular guiders do not see the noisy sample "
                "needed to form x0; use space='model' here, or guide() on a classic pipeline for the paper's "
                "x0-space form"
            )
        if method.branch not in ("uncond", "perturbed") or (
            method.branch == "perturbed" and not isinstance(method, Perturbation)
        ):
            raise ValueError(f"{type(method).__name__}: a modular guider cannot run its {method.branch!r} branch")
        if isinstance(method, PAG) and method.joint == "image":
            raise ValueError(
                "PAG(joint='image') needs where the image tokens sit in each joint attention, which a modular "
                "guider does not see; use joint='full' here"
            )
    if sum(m.branch == "uncond" for m in methods) > 1:
        raise ValueError("at most one method of the unconditional branch (CFG or APG) per guider")


class _Controller:
    """What the perturbation hooks read of a ``guide()`` controller: the methods (and a family without joint
    layout: a modular guider perturbs whole denoiser calls)."""

    family = dataclasses.make_dataclass(
        "ModularFamily", [("text_first", bool, False), ("sequence_first", bool, False), ("image_queries", bool, False)]
    )()

    def __init__(self, methods: tuple[Guidance, ...]) -> None:
        self.methods = methods


class _Call:
    """The run the hooks see during one perturbed denoiser call: every row is method ``index``'s branch."""

    def __init__(self, controller: _Controller, index: int, states: list[Any]) -> None:
        self.controller, self.states, self.tokens = controller, states, None
        self.rows = {i: (slice(None) if i == index else None) for i in range(len(controller.methods))}
        self.batch = 0  # the rows are whole calls: no module's batch needs mapping to them


if BaseGuidance is not None:

    class SteerguardGuider(BaseGuidance):
        """A diffusers guider for steerguard methods (see :func:`as_guider`); ``methods``: their ``to_dict()``."""

        _input_predictions = [COND, UNCOND]  # noqa: RUF012  (diffusers' attribute; the perturbed ones follow)

        @register_to_config
        def __init__(
            self,
            methods: list[dict[str, Any]] | None = None,
            start: float = 0.0,
            stop: float = 1.0,
            enabled: bool = True,
            method: dict[str, Any] | None = None,  # the single method of guiders saved before `methods`
        ):
            chosen = list(methods or []) + ([method] if method is not None else [])
            self.methods = tuple(Guidance.from_dict(m) for m in chosen)
            _check(self.methods)
            self._input_predictions = [COND, UNCOND] + [f"pred_perturbed_{i}" for i in range(len(self.methods))]
            super().__init__(start, stop, enabled)
            self._controller = _Controller(self.methods)
            self.run_state: list[Any] = [None] * len(self.methods)
            self._undo: list[Callable[[], None]] = []

        # -- which branches this step runs
        def _active(self) -> list[int]:
            if not self._enabled:
                return []
            n = self._num_inference_steps
            fraction = 0.0 if n is None else self._step / n
            if n is not None and not self._start <= fraction < self._stop:
                return []
            return [i for i, m in enumerate(self.methods) if n is None or m.active(fraction)]

        def _branches(self) -> list[tuple[int, str]]:
            """``(input tuple index, prediction name)`` of each denoiser call of this step, the conditional first."""
            branches = [(0, COND)]
            for i in self._active():
                if self.methods[i].branch == "uncond":
                    branches.insert(1, (1, UNCOND))
                else:
                    branches.append((0, f"pred_perturbed_{i}"))
            return branches

        def _batches(self, make_batch: Any) -> list[Any]:
            if self._step == 0:
                self.run_state = [m.new_state() for m in self.methods]
            return [make_batch(index, name) for index, name in self._branches()]

        def prepare_inputs(self, data: dict[str, tuple[Any, Any]]) -> list[Any]:
            return self._batches(lambda i, name: self._prepare_batch(data, i, name))

        def prepare_inputs_from_block_state(self, data: Any, input_fields: dict[str, Any]) -> list[Any]:
            return self._batches(lambda i, name: self._prepare_batch_from_block_state(input_fields, data, i, name))

        # -- the weak model of a perturbed branch, for its denoiser call only
        def prepare_models(self, denoiser: nn.Module) -> None:
            self.cleanup_models(denoiser)  # anything a call that never came left behind
            super().prepare_models(denoiser)
            branches = self._branches()
            name = branches[self._count_prepared - 1][1] if self._count_prepared <= len(branches) else COND
            if not name.startswith("pred_perturbed_"):
                return
            run = _Call(self._controller, int(name.rsplit("_", 1)[1]), self.run_state)
            self._undo.append(install(self._controller, denoiser))
            spent = False

            def once(module: nn.Module, call: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
                """The next call of the denoiser runs the weak model; then every edit is removed, even if it fails
                (a later call of the denoiser, by this loop or by anything else, is never perturbed)."""
                nonlocal spent
                if spent:
                    return PASS
                spent = True
                token = ACTIVE_RUN.set(run)
                try:
                    return call(*args, **kwargs)
                finally:
                    ACTIVE_RUN.reset(token)
                    self.cleanup_models(denoiser)

            self._undo.append(intercept_calls(denoiser, once))

        def cleanup_models(self, denoiser: nn.Module) -> None:
            while self._undo:
                self._undo.pop()()

        def forward(self, pred_cond: Any, pred_uncond: Any = None, **perturbed: Any) -> Any:
            pred = pred_cond
            for i in self._active():
                method, state = self.methods[i], self.run_state[i]
                other = pred_uncond if method.branch == "uncond" else perturbed[f"pred_perturbed_{i}"]
                pred = pred + method.update(pred_cond, other, state)
            return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)

        @property
        def is_conditional(self) -> bool:
            branches = self._branches()
            current = min(max(self._count_prepared, 1), len(branches)) - 1
            return branches[current][1] != UNCOND

        @property
        def num_conditions(self) -> int:
            return len(self._branches())
