"""Scoped, reversible interception of module calls, and the guided run active in the current thread.

* :func:`attach` registers a named ``diffusers.hooks`` hook on a module and returns its remover.
* :func:`intercept_calls` routes every call of a module (``module(...)``) through ``handler``: the
  module's class is swapped for a subclass whose ``__call__`` asks ``handler`` first. This sits above
  everything that re-wraps ``forward`` (accelerate's offload hooks, which diffusers removes and re-adds
  after every call; group offloading; ``torch.compile(module)``'s ``OptimizedModule`` and
  ``module.compile()``, whose compiled call then runs untouched inside). Several handlers may share
  one module (pipelines sharing components); the original class comes back when the last one leaves.
* :data:`ACTIVE_RUN` holds the guided run of the pipeline call in progress *in this thread* (a
  ``ContextVar``): hooks act only for it, so the same modules called from another thread, or by
  another pipeline, are left alone.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from typing import Any

from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

#: the guided run of the pipeline call in progress in the current thread / task, or ``None``
ACTIVE_RUN: contextvars.ContextVar[Any] = contextvars.ContextVar("steerguard_active_run", default=None)

#: ``handler(module, call, args, kwargs)`` returns the output, or :data:`PASS` to let the call through
Handler = Callable[[nn.Module, Callable[..., Any], tuple, dict], Any]
PASS = object()

_LOCK = threading.Lock()
_HANDLERS: dict[nn.Module, list[Handler]] = {}
_CLASSES: dict[type, type] = {}


#: registries that :func:`attach` created, with whether their module had an instance-level ``forward`` then
_CREATED: dict[int, bool] = {}


def attach(module: nn.Module, hook: ModelHook, name: str) -> Callable[[], None]:
    """Register ``hook`` on ``module`` as ``name``; the returned function removes it and leaves the module as it was.

    The hook registry is removed with the last hook that :func:`attach` put in a registry it created, whatever
    order several attachments to one module are detached in; a hook registered after this one that wraps the
    call (``new_forward``: another ``guide()``'s attention hook, diffusers' caches) keeps acting when this one
    leaves first.
    """
    with _LOCK:
        if not hasattr(module, "_diffusers_hook"):
            had_forward = "forward" in vars(module)
            _CREATED[id(HookRegistry.check_if_exists_or_initialize(module))] = had_forward
        registry = HookRegistry.check_if_exists_or_initialize(module)
        try:
            registry.register_hook(hook, name)
        except BaseException:
            _drop_registry(module, registry)
            raise

    def detach() -> None:
        with _LOCK:
            following = _following_wrapper(registry, name)
            registry.remove_hook(name, recurse=False)
            if following is not None and following[0].forward is not following[1]:
                # diffusers (<= 0.42) hands the chain below the removed hook to the next hook's ``forward``; when
                # that hook has its own ``new_forward``, it is the wrapper that must get it (as
                # ``original_forward``), or the next hook silently stops acting
                fn_ref, own_forward = following
                fn_ref.original_forward, fn_ref.forward = fn_ref.forward, own_forward
            _drop_registry(module, registry)

    return detach


def _following_wrapper(registry: HookRegistry, name: str) -> tuple[Any, Any] | None:
    """The function reference of the hook after ``name`` in ``registry`` and its own forward, when that hook
    wraps the call (``new_forward``); else None."""
    order, refs = getattr(registry, "_hook_order", None), getattr(registry, "_fn_refs", None)
    if not isinstance(order, list) or not isinstance(refs, list) or name not in order:
        return None
    index = order.index(name)
    if index + 1 >= len(refs) or getattr(refs[index + 1], "original_forward", None) is None:
        return None
    return refs[index + 1], refs[index + 1].forward


def _drop_registry(module: nn.Module, registry: HookRegistry) -> None:
    """Remove an empty registry that :func:`attach` created, and the ``forward`` it left on the module."""
    if registry.hooks or id(registry) not in _CREATED:
        return
    had_forward = _CREATED.pop(id(registry))
    vars(module).pop("_diffusers_hook", None)
    if not had_forward:
        vars(module).pop("forward", None)


def _intercepting_class(base: type) -> type:
    if base not in _CLASSES:

        def __call__(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            def call(*a: Any, **k: Any) -> Any:
                return base.__call__(self, *a, **k)

            for handler in tuple(_HANDLERS.get(self, ())):
                output = handler(self, call, args, kwargs)
                if output is not PASS:
                    return output
            return call(*args, **kwargs)

        namespace = {"__call__": __call__, "__module__": base.__module__, "__qualname__": base.__qualname__}
        _CLASSES[base] = type(base.__name__, (base,), {**namespace, "_steerguard_intercepted": base})
    return _CLASSES[base]


def intercept_calls(module: nn.Module, handler: Handler) -> Callable[[], None]:
    """Route the calls of ``module`` through ``handler`` until the returned remover is called."""
    with _LOCK:
        handlers = _HANDLERS.get(module)
        if handlers is None:
            if "_steerguard_intercepted" in vars(type(module)):
                raise RuntimeError(f"{type(module).__name__}: calls are intercepted by a stale steerguard hook")
            module.__class__ = _intercepting_class(type(module))
            handlers = _HANDLERS[module] = []
        handlers.append(handler)

    def remove() -> None:
        with _LOCK:
            handlers.remove(handler)
            if not handlers:
                del _HANDLERS[module]
                cls = type(module)
                if "_steerguard_intercepted" in vars(cls):
                    module.__class__ = cls._steerguard_intercepted

    return remove


def intercepted(module: nn.Module) -> bool:
    """Whether any handler currently intercepts the calls of ``module``."""
    return module in _HANDLERS
