"""Our methods as diffusers ``BaseGuidance`` guiders, for modular pipelines.

Modular guiders receive only the branch predictions (not the noisy sample), so
they serve methods in ``"model"`` space: CFG, and APG with ``space="model"``.
The per-run state is renewed at step 0, as diffusers' own guiders do.
Available when the installed diffusers has ``diffusers.guiders``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .method import Guidance

try:
    from diffusers.configuration_utils import register_to_config
    from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput
except ImportError:  # diffusers without modular guiders
    BaseGuidance = None


def as_guider(method: Guidance, *, start: float | None = None, stop: float | None = None) -> Any:
    """A ``BaseGuidance`` running ``method`` (CFG, or APG in model space).

    The guider acts at steps ``i`` of ``n`` with ``start <= i / n < stop``, as ``guide()`` does; ``start`` and
    ``stop`` default to the method's own.
    """
    if BaseGuidance is None:
        raise ImportError("the installed diffusers has no `diffusers.guiders` (modular guiders need diffusers>=0.35)")
    if method.space != "model":
        raise ValueError(
            f"{type(method).__name__}(space={method.space!r}): modular guiders do not see the noisy sample needed to "
            "form x0; use space='model' here, or guide() on a classic pipeline for the paper's x0-space form"
        )
    start = method.start if start is None else start
    stop = method.stop if stop is None else stop
    method = dataclasses.replace(method, start=start, stop=stop)  # validated as the method's own interval
    return SteerguardGuider(method=method.to_dict(), start=start, stop=stop)


if BaseGuidance is not None:

    class SteerguardGuider(BaseGuidance):
        """A diffusers guider for any steerguard method of the ``"uncond"`` branch."""

        _input_predictions = ["pred_cond", "pred_uncond"]  # noqa: RUF012  (diffusers' attribute)

        @register_to_config
        def __init__(self, method: dict[str, Any], start: float = 0.0, stop: float = 1.0, enabled: bool = True):
            super().__init__(start, stop, enabled)
            self.method = Guidance.from_dict(method)
            self.run_state: Any = None

        def _batches(self, make_batch: Any) -> list[Any]:
            if self._step == 0:
                self.run_state = self.method.new_state()
            indices = [0] if self.num_conditions == 1 else [0, 1]
            return [make_batch(i, name) for i, name in zip(indices, self._input_predictions)]

        def prepare_inputs(self, data: dict[str, tuple[Any, Any]]) -> list[Any]:
            return self._batches(lambda i, name: self._prepare_batch(data, i, name))

        def prepare_inputs_from_block_state(self, data: Any, input_fields: dict[str, Any]) -> list[Any]:
            return self._batches(lambda i, name: self._prepare_batch_from_block_state(input_fields, data, i, name))

        def forward(self, pred_cond: Any, pred_uncond: Any = None) -> Any:
            pred = pred_cond
            if self._is_active():
                pred = pred_cond + self.method.update(pred_cond, pred_uncond, self.run_state)
            return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)

        @property
        def is_conditional(self) -> bool:
            return self._count_prepared == 1

        @property
        def num_conditions(self) -> int:
            return 2 if self._is_active() else 1

        def _is_active(self) -> bool:
            if not self._enabled:
                return False
            if self._num_inference_steps is None:
                return True
            return self._start <= self._step / self._num_inference_steps < self._stop
