"""Attaching named hooks to modules through ``diffusers.hooks`` and detaching them without a trace."""

from __future__ import annotations

from collections.abc import Callable

from diffusers.hooks import HookRegistry, ModelHook
from torch import nn


def attach(module: nn.Module, hook: ModelHook, name: str) -> Callable[[], None]:
    """Register ``hook`` on ``module`` as ``name``; the returned function removes it and leaves the module as it was."""
    had_registry = hasattr(module, "_diffusers_hook")
    had_forward = "forward" in vars(module)
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(hook, name)

    def detach() -> None:
        registry.remove_hook(name, recurse=False)
        if not had_registry and not registry.hooks:
            vars(module).pop("_diffusers_hook", None)
        if not had_forward:
            vars(module).pop("forward", None)

    return detach
