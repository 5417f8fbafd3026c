"""``guide(pipe, *methods)``: guidance methods swapped into unchanged diffusers pipelines.

Two scoped, named, reversible hooks make a classic pipeline's own ``__call__``
use our guidance:

* a ``diffusers.hooks`` hook on the denoiser (``unet`` / ``transformer``),
  named ``"steerguard.guide"``, reads the conditional and unconditional
  predictions of each step, applies the methods (in x0 or model space) and
  hands the pipeline outputs whose own CFG combination equals the guided
  prediction: both halves of a CFG batch are set to it (``u + s (c - u)`` is
  then exactly it), and for FLUX's true CFG, which calls the denoiser twice,
  the unconditional output is solved from ``u + s (c - u) = guided``;
* the pipeline instance gets a subclass of its own class whose ``__call__``
  starts a fresh *run* (momentum buffers are reset at the start of every
  pipeline call) and makes sure the call produces an unconditional branch.

On exit both are removed: the pipeline's class, the denoiser's ``forward`` and
hook registry are as they were.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from . import prediction as P
from .method import Guidance

HOOK_NAME = "steerguard.guide"
#: the scale the pipeline's own CFG gets when a call would otherwise skip the
#: unconditional branch (its value cancels out, see the module docstring)
FORCED_PIPELINE_SCALE = 2.0


@dataclasses.dataclass(frozen=True)
class Family:
    """How a family of pipelines lays out its guidance branches."""

    name: str
    classes: tuple[str, ...]
    denoiser: str
    #: "uncond_cond" / "cond_uncond": one batched call, halves in this order;
    #: "sequential": a conditional call, then an unconditional one (FLUX true CFG)
    layout: str
    #: the ``__call__`` argument whose value > 1 switches the unconditional branch on
    scale_arg: str
    #: the denoiser sees ``timestep / timestep_divisor`` (FLUX: 1000)
    timestep_divisor: float = 1.0
    #: call arguments that would bypass or double the guidance, with the reason
    refused: tuple[tuple[str, str], ...] = ()


_RESCALE = ("guidance_rescale", "CFG rescaling inside the pipeline would act on the already guided prediction")
FAMILIES: tuple[Family, ...] = (
    Family(
        "sd",
        ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
        "unet",
        "uncond_cond",
        "guidance_scale",
        refused=(_RESCALE,),
    ),
    Family(
        "sdxl",
        ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"),
        "unet",
        "uncond_cond",
        "guidance_scale",
        refused=(_RESCALE,),
    ),
    Family(
        "sd3",
        ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"),
        "transformer",
        "uncond_cond",
        "guidance_scale",
        refused=(("skip_guidance_layers", "skip-layer guidance calls the denoiser outside the CFG batch"),),
    ),
    Family(
        "flux",
        ("FluxPipeline", "FluxImg2ImgPipeline"),
        "transformer",
        "sequential",
        "true_cfg_scale",
        timestep_divisor=1000.0,
    ),
    Family("dit", ("DiTPipeline",), "transformer", "cond_uncond", "guidance_scale"),
    Family("pixart", ("PixArtSigmaPipeline", "PixArtAlphaPipeline"), "transformer", "uncond_cond", "guidance_scale"),
)


def family_of(pipe: Any) -> Family:
    """The :class:`Family` serving ``pipe`` (matched on its class and base classes)."""
    names = [cls.__name__ for cls in type(pipe).__mro__]
    for name in names:
        for family in FAMILIES:
            if name in family.classes:
                return family
    supported = ", ".join(c for f in FAMILIES for c in f.classes)
    raise TypeError(
        f"guide() cannot serve {type(pipe).__name__}: it is none of the supported pipelines ({supported}) "
        "nor a subclass of one"
    )


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Maps a denoiser's timestep to ``(alpha, sigma)`` and its output to x0 (see :mod:`.prediction`)."""

    describe: str
    alpha_sigma: Callable[[Tensor], tuple[Tensor, Tensor]]
    coefficients: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def schedule_of(scheduler: Any) -> Schedule:
    """Read the noise schedule and prediction type from a diffusers scheduler (duck-typed)."""
    config = scheduler.config
    name = type(scheduler).__name__
    kind = config.get("prediction_type", "epsilon")
    n_train = config.get("num_train_timesteps", 1000)
    if name.startswith("FlowMatch") or kind == "flow_prediction" or config.get("use_flow_sigmas", False):
        return Schedule(
            f"flow matching ({name})",
            lambda t: P.flow(t.float() / n_train),
            lambda a, s: P.x0_coefficients(a, s, "flow"),
        )
    if name.startswith("EDM"):
        sigma_data = config["sigma_data"]
        sign = -1.0 if kind == "v_prediction" else 1.0
        return Schedule(
            f"EDM preconditioning ({name}, {kind})",
            lambda t: P.edm(torch.exp(4 * t.float()), sigma_data),
            lambda a, s: P.edm_x0_coefficients(a, s, sigma_data, sign),
        )
    if getattr(scheduler, "alphas_cumprod", None) is not None and kind in P.PREDICTION_TYPES:
        if config.get("timestep_type", "discrete") == "continuous":
            alpha_sigma = lambda t: P.ve_to_vp(torch.exp(4 * t.float()))
        else:
            cumprod = scheduler.alphas_cumprod
            alpha_sigma = lambda t: P.vp_discrete(cumprod, t)
        return Schedule(f"VP ({name}, {kind})", alpha_sigma, lambda a, s: P.x0_coefficients(a, s, kind))
    raise TypeError(
        f"guide() cannot read the noise schedule of {name}: it needs a flow-matching scheduler, an EDM scheduler "
        f"or one with `alphas_cumprod` and prediction_type in {P.PREDICTION_TYPES} (got {kind!r})"
    )


class _Run:
    """Per-call state: fresh method states, the pending conditional output of a sequential layout."""

    def __init__(self, controller: _Controller, pipeline_scale: float) -> None:
        self.controller = controller
        self.pipeline_scale = pipeline_scale
        self.states = [m.new_state(controller.family.name) for m in controller.methods]
        self.pending: tuple[Tensor, Tensor] | None = None  # (x, cond prediction)
        self.schedule = schedule_of(controller.pipe.scheduler)

    def guided(self, x: Tensor, t: Tensor, cond: Tensor, uncond: Tensor) -> Tensor:
        """``D_c + sum_m update_m`` in the methods' spaces, returned in model space and dtype."""
        cond32, uncond32, x32 = cond.float(), uncond.float(), x.float()
        total = cond32.clone()
        coefs = None
        for method, state in zip(self.controller.methods, self.states):
            if method.space == "x0":
                if coefs is None:
                    a, b = self.schedule.coefficients(*self.schedule.alpha_sigma(t.expand(x.shape[0])))
                    coefs = P.broadcast(a, x32), P.broadcast(b, x32)
                a, b = coefs
                update = method.update(a * x32 + b * cond32, a * x32 + b * uncond32, state) / b
            else:
                update = method.update(cond32, uncond32, state)
            total += update
        return total.to(cond.dtype)

    def on_output(self, x: Tensor, t: Tensor, pred: Tensor) -> Tensor:
        family = self.controller.family
        channels = x.shape[1]
        learned_sigma = x.ndim == 4 and pred.shape[1] == 2 * channels
        eps, rest = (pred[:, :channels], pred[:, channels:]) if learned_sigma else (pred, None)
        if family.layout == "sequential":
            eps = self._sequential(x, t, eps)
        else:
            if eps.shape[0] % 2:
                raise RuntimeError(f"{family.name}: expected a CFG batch of even size, got {eps.shape[0]}")
            first, second = eps.chunk(2)
            cond, uncond = (second, first) if family.layout == "uncond_cond" else (first, second)
            x_half, t_half = x.chunk(2)[0], (t.chunk(2)[0] if t.numel() > 1 else t)
            g = self.guided(x_half, t_half, cond, uncond)
            eps = torch.cat([g, g])
        return eps if rest is None else torch.cat([eps, rest], dim=1)

    def _sequential(self, x: Tensor, t: Tensor, pred: Tensor) -> Tensor:
        if self.pending is None:  # the conditional call of a step
            self.pending = (x, pred)
            return pred
        x_cond, cond = self.pending
        self.pending = None
        if x_cond.data_ptr() != x.data_ptr() or x_cond.shape != x.shape:
            raise RuntimeError("the unconditional call did not follow the conditional one on the same latents")
        g = self.guided(x, t, cond, pred).float()
        s = self.pipeline_scale  # the pipeline then computes u + s (c - u); solve it for u
        return ((g - s * cond.float()) / (1 - s)).to(pred.dtype)


class _DenoiserHook:
    """A ``diffusers.hooks.ModelHook`` (duck-typed) replacing the denoiser's forward."""

    _is_stateful = False

    def __init__(self, controller: _Controller, signature: inspect.Signature) -> None:
        self.controller = controller
        self.signature = signature
        self.fn_ref = None
        self.sample_arg = next(iter(signature.parameters))

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        return module

    def deinitalize_hook(self, module: torch.nn.Module) -> torch.nn.Module:  # sic: diffusers' spelling
        return module

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        return module

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        output = self.fn_ref.original_forward(*args, **kwargs)
        run = self.controller.run
        if run is None:  # the denoiser called outside a pipeline call
            return output
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        x, t = bound[self.sample_arg], bound["timestep"]
        t = torch.as_tensor(t, device=x.device).reshape(-1) * self.controller.family.timestep_divisor
        if isinstance(output, tuple):
            return (run.on_output(x, t, output[0]), *output[1:])
        output.sample = run.on_output(x, t, output.sample)
        return output


class _Controller:
    def __init__(self, pipe: Any, methods: tuple[Guidance, ...]) -> None:
        self.pipe = pipe
        self.methods = methods
        self.family = family_of(pipe)
        self.run: _Run | None = None

    def call(self, call: Callable[..., Any], pipe: Any, args: tuple, kwargs: dict) -> Any:
        if self.run is not None:
            raise RuntimeError("this guided pipeline is already running a call (calls cannot be nested or concurrent)")
        signature = inspect.signature(call)
        bound = signature.bind(pipe, *args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        for name, reason in self.family.refused:
            if arguments.get(name) not in (None, 0, 0.0, [], ()):
                raise ValueError(f"{type(pipe).__name__}({name}=...) is not supported inside guide(): {reason}")
        self._ensure_uncond_branch(pipe, arguments)
        self.run = _Run(self, float(arguments[self.family.scale_arg]))
        try:
            return call(*bound.args, **bound.kwargs)
        finally:
            self.run = None

    def _ensure_uncond_branch(self, pipe: Any, arguments: dict[str, Any]) -> None:
        config = getattr(getattr(pipe, self.family.denoiser), "config", {})
        if config.get("time_cond_proj_dim") is not None:
            raise ValueError(
                f"{type(pipe).__name__}: this guidance-distilled denoiser (time_cond_proj_dim is set) runs no "
                "unconditional branch, so CFG-type guidance cannot be applied"
            )
        if arguments[self.family.scale_arg] <= 1:
            arguments[self.family.scale_arg] = FORCED_PIPELINE_SCALE
        if self.family.layout == "sequential" and arguments.get("negative_prompt") is None:
            if arguments.get("negative_prompt_embeds") is not None:
                return
            if arguments.get("prompt_embeds") is not None:
                raise ValueError(
                    f"{type(pipe).__name__}: guidance needs an unconditional branch; with prompt_embeds, pass "
                    "negative_prompt_embeds and negative_pooled_prompt_embeds too"
                )
            arguments["negative_prompt"] = ""


def _guided_class(cls: type, controller: _Controller) -> type:
    original_call = cls.__call__

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        return controller.call(original_call, self, args, kwargs)

    __call__.__signature__ = inspect.signature(original_call)  # type: ignore[attr-defined]
    __call__.__doc__ = original_call.__doc__
    namespace = {
        "__call__": __call__,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
        "_steerguard_base": cls,
    }
    return type(cls.__name__, (cls,), namespace)


def _validate(methods: tuple[Guidance, ...]) -> None:
    if not methods:
        raise ValueError("guide() needs at least one guidance method, e.g. guide(pipe, APG(7.5))")
    for method in methods:
        if not isinstance(method, Guidance):
            raise TypeError(f"guide() takes guidance methods (CFG, APG, ...), got {type(method).__name__}")
    uncond = [m for m in methods if m.branch == "uncond"]
    if len(uncond) > 1:
        raise ValueError(f"at most one of CFG/APG per call, got {[type(m).__name__ for m in uncond]}")


@contextlib.contextmanager
def guide(pipe: Any, *methods: Guidance) -> Iterator[Any]:
    """Use ``methods`` in every call of ``pipe`` inside the ``with`` block.

    >>> with guide(pipe, APG(7.5)):
    ...     image = pipe("a photo of a cat").images[0]

    Inside the block the pipeline's own CFG scale argument only switches the
    unconditional branch on (it is raised above 1 if needed); the methods'
    scales decide. On exit the pipeline is exactly as it was.
    """
    _validate(methods)
    controller = _Controller(pipe, methods)
    denoiser = getattr(pipe, controller.family.denoiser, None)
    if not isinstance(denoiser, torch.nn.Module):
        raise TypeError(f"guide() needs {type(pipe).__name__}.{controller.family.denoiser} to be a torch module")
    if getattr(pipe, "scheduler", None) is None:
        raise TypeError(f"guide() needs {type(pipe).__name__}.scheduler")
    schedule_of(pipe.scheduler)  # fail early on an unknown schedule
    if hasattr(type(pipe), "_steerguard_base"):
        raise RuntimeError("this pipeline is already inside guide(); combine the methods in one guide() call")

    from diffusers.hooks import HookRegistry

    had_registry = hasattr(denoiser, "_diffusers_hook")
    had_forward = "forward" in vars(denoiser)
    registry = HookRegistry.check_if_exists_or_initialize(denoiser)
    signature = inspect.signature(type(denoiser).forward.__get__(denoiser))  # the class forward, not a wrapper
    registry.register_hook(_DenoiserHook(controller, signature), HOOK_NAME)
    original_class = type(pipe)
    pipe.__class__ = _guided_class(original_class, controller)
    try:
        yield pipe
    finally:
        pipe.__class__ = original_class
        registry.remove_hook(HOOK_NAME, recurse=False)
        if not had_registry and not registry.hooks:
            del denoiser._diffusers_hook
        if not had_forward:
            vars(denoiser).pop("forward", None)
