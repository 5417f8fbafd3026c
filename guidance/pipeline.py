"""``guide(pipe, *methods)``: guidance methods swapped into unchanged diffusers pipelines.

Two scoped, reversible interceptions make a classic pipeline's own ``__call__``
use our guidance:

* the denoiser's calls (``unet`` / ``transformer``) go through the controller
  (:func:`.hooks.intercept_calls`: a subclass of the module's own class whose
  ``__call__`` asks first). It reads the conditional and unconditional
  predictions of each step, applies the methods (in x0 or model space) and
  hands the pipeline outputs whose own CFG combination equals the guided
  prediction: both halves of a CFG batch are set to it (``u + s (c - u)`` is
  then exactly it), and for FLUX's true CFG, which calls the denoiser twice,
  the unconditional output is solved from ``u + s (c - u) = guided``. Sitting
  on ``__call__``, it survives what re-wraps ``forward``: model / sequential
  CPU offload (diffusers re-applies accelerate's hooks after every call), group
  offloading, ``torch.compile(module)`` and ``module.compile()`` (the compiled
  call runs inside, unchanged, so the graph is not recompiled per step);
* the pipeline instance gets a subclass of its own class whose ``__call__``
  starts a fresh *run* (momentum buffers are reset at the start of every
  pipeline call) and makes sure the call produces an unconditional branch.

Scope and threads: guidance acts only during the guided pipeline's own
``__call__``, in the thread (or asyncio task) that makes it
(:data:`.hooks.ACTIVE_RUN`). Other pipelines sharing the denoiser (``from_pipe``,
``Pipeline(**pipe.components)``), guided or not, and calls of the denoiser from
other threads are untouched; a second concurrent call of the *same* guided
pipeline object is refused (diffusers pipelines keep per-call state on the
instance and its scheduler: give each thread its own pipeline object and
scheduler; they may share the models).

The branch layout is read at every step: a step-end callback that switches the
pipeline's CFG off (diffusers' ``SDCFGCutoffCallback``) leaves the conditional
branch only, and the CFG-type method stops there.

Perturbation methods (PAG, SoftPAG, TPG) add a weak-model branch each: the
denoiser interception appends copies of the conditional rows to the batch and
the perturbation hooks (:mod:`.perturbation`) act on those rows only, so one
denoiser call evaluates every branch (or one call per branch with
``sequential=True``).

Entering is all or nothing (a failure removes whatever was installed); on exit
everything is removed: the pipeline's and the denoiser's classes, hook
registries and attention modules are as they were.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from .corrector import LangevinCorrector
from .engine import Run
from .families import FAMILIES, Family, family_of, schedule_of, steps_of_the_call
from .hooks import ACTIVE_RUN, PASS, intercept_calls
from .method import Guidance

__all__ = ["FAMILIES", "FORCED_PIPELINE_SCALE", "Family", "family_of", "guide", "schedule_of", "steps_of_the_call"]

#: the scale the pipeline's own CFG gets when a call would otherwise skip the
#: unconditional branch (its value cancels out, see the module docstring)
FORCED_PIPELINE_SCALE = 2.0
_MISSING = object()
#: scheduler attributes holding a sample from an earlier step that the next update starts from (UniPC's and
#: SA-Solver's corrector, DPM-Solver singlestep, KDPM2, PNDM's Runge-Kutta and second PLMS step)
STORED_SAMPLES = ("last_sample", "sample", "cur_sample")


class _Controller:
    def __init__(
        self, pipe: Any, methods: tuple[Guidance, ...], sequential: bool, corrector: LangevinCorrector | None
    ) -> None:
        self.pipe = pipe
        self.methods = methods
        self.sequential = sequential
        self.corrector = corrector
        self.family = family_of(pipe)
        self.denoiser: torch.nn.Module | None = None
        #: every denoiser the pipeline calls (the first, and Wan 2.2's low-noise ``transformer_2``)
        self.denoisers: tuple[torch.nn.Module, ...] = ()
        #: the pipeline's CFG scale of the running call for each denoiser (by ``id``)
        self.stage_scales: dict[int, float] = {}
        self.signature: inspect.Signature | None = None
        self.parameter_names: list[str] = []
        self.run: Run | None = None
        #: the bound arguments of the running call
        self.arguments: dict[str, Any] = {}
        self._busy = threading.Lock()

    def intercept(self, module: torch.nn.Module, call: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """The denoiser's calls during this pipeline's own calls in this thread (others pass, see hooks.ACTIVE_RUN)."""
        run = ACTIVE_RUN.get()
        if run is None or run.controller is not self or not any(module is d for d in self.denoisers):
            return PASS
        if len(self.denoisers) > 1:  # Wan 2.2: the low-noise stage has its own CFG scale
            run.use_pipeline_scale(self.stage_scales[id(module)])
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        family = self.family
        x = bound[self.parameter_names[0]]
        given = bound["timestep"] if "timestep" in bound else bound[self.parameter_names[1]]  # Z-Image: ``t``
        if isinstance(x, list | tuple):  # Z-Image: one latent per sample
            x = torch.stack(list(x))
        # float32: FLUX passes t / 1000 in bf16, and bf16 rounds t * 1000 to multiples of 4 above 512
        t = torch.as_tensor(given, device=x.device).float()
        token_times = None
        if t.ndim == 2 and t.shape[0] == x.shape[0] and t.shape[1] > 1:  # one per token (LTX image-to-video, Wan TI2V)
            token_times, t = t, t.amax(dim=1)  # the generated tokens' time: the step's
        elif t.ndim == 5 and x.ndim == 5 and t.shape[0] == x.shape[0] and t.shape[2] == x.shape[2] > 1:
            token_times, t = t.flatten(1), t.amax(dim=(1, 2, 3, 4))  # one per frame, (B, 1, F, 1, 1): Cosmos 2
        t = t.reshape(-1)
        t = (1 - t if family.timestep_reversed else t) * family.timestep_divisor
        if family.timestep_scale_key is not None:
            t = t / float(self.denoiser.config[family.timestep_scale_key])
        return run.forward(call, (args, kwargs), x, t, timestep=given, token_times=token_times)

    def call(self, call: Callable[..., Any], pipe: Any, args: tuple, kwargs: dict) -> Any:
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(
                f"this guided {type(pipe).__name__} is already running a call (in this or another thread): calls of "
                "one guided pipeline cannot be nested or concurrent; give each thread its own pipeline object "
                "(they may share components)"
            )
        try:
            return self._call(call, pipe, args, kwargs)
        finally:
            self._busy.release()

    def _call(self, call: Callable[..., Any], pipe: Any, args: tuple, kwargs: dict) -> Any:
        signature = inspect.signature(call)
        bound = signature.bind(pipe, *args, **kwargs)
        given = dict(bound.arguments)  # what the call itself passes
        bound.apply_defaults()
        arguments = bound.arguments
        for name, reason in self.family.refused:
            if arguments.get(name) not in (None, 0, 0.0, [], ()):
                raise ValueError(f"{type(pipe).__name__}({name}=...) is not supported inside guide(): {reason}")
        self._check_pipeline_state(pipe)
        self._cache_off(pipe, arguments, given)
        rescale = arguments.get(self.family.rescale_arg) or 0.0
        if any(m.branch == "uncond" for m in self.methods):
            self._ensure_uncond_branch(pipe, arguments, solved=rescale > 0)
        has_uncond = self._has_uncond(pipe, arguments)
        if self.corrector is not None:
            self._check_corrector(pipe)
        if self.corrector is not None and has_uncond and self.family.layout == "sequential":
            raise ValueError(
                f"{type(pipe).__name__}: the Langevin corrector needs every branch in one denoiser call; this "
                "pipeline's true CFG runs the unconditional branch in a separate call (use the corrector without "
                "true CFG)"
            )
        scale = self.family.weight(arguments.get(self.family.scale_arg))
        self.stage_scales = {id(d): scale for d in self.denoisers}
        if len(self.denoisers) > 1:
            self.stage_scales[id(self.denoisers[1])] = self._second_scale(pipe, arguments, scale)
        self.run = Run(self, scale, has_uncond, solve_uncond=rescale > 0)
        self.arguments = arguments
        token = ACTIVE_RUN.set(self.run)
        previous_count = vars(pipe).pop("_num_timesteps", _MISSING)  # a stale count from an earlier call
        scheduler = pipe.scheduler  # wrapped per call: the scheduler may have been swapped inside the block
        own_step = vars(scheduler).get("step", _MISSING)
        try:
            if self.corrector is not None:
                scheduler.step = _correcting_step(scheduler.step, self)
            return call(*bound.args, **bound.kwargs)
        finally:
            if self.corrector is not None:
                _restore_step(scheduler, None if own_step is _MISSING else own_step)
            ACTIVE_RUN.reset(token)
            self.run = None
            self.arguments = {}  # the call's tensors are not kept
            if previous_count is not _MISSING and "_num_timesteps" not in vars(pipe):
                pipe._num_timesteps = previous_count

    def _cache_off(self, pipe: Any, arguments: dict[str, Any], given: dict[str, Any]) -> None:
        """With perturbation guidance, the pipeline's prefix cache across steps (:attr:`.families.Family.cache_arg`)
        off: every call of the conditional branch shares it, and a perturbed call would overwrite it with its own
        keys and values. Refused where the call switches it on itself."""
        name = self.family.cache_arg
        if name is None or not any(m.branch == "perturbed" for m in self.methods) or not arguments.get(name):
            return
        if given.get(name):
            raise ValueError(
                f"{type(pipe).__name__}({name}=True) with perturbation guidance: the cache of the prefix keys and "
                "values is shared by every call of the conditional branch, and a perturbed call would overwrite it; "
                f"pass {name}=False (CFG-type methods alone work with the cache)"
            )
        arguments[name] = False

    def _check_pipeline_state(self, pipe: Any) -> None:
        """Refuse the pipeline modes that ``guide()`` cannot follow: FreeInit (its loop reruns), FreeNoise's split
        inference (its modules see slices of the batch)."""
        if getattr(pipe, "free_init_enabled", False):
            raise ValueError(
                f"{type(pipe).__name__}: FreeInit is not supported inside guide(): it reruns the whole denoising loop "
                "from re-noised latents, which the guidance's per-call state (the step's place in the call, APG's "
                "momentum) does not follow; call pipe.disable_free_init()"
            )
        if self.family.frames_dim is not None and any(
            type(module).__name__ == "SplitInferenceModule" for module in self.denoiser.modules()
        ):
            raise ValueError(
                f"{type(pipe).__name__}: FreeNoise's split inference is not supported inside guide(): its modules "
                "run on slices of the batch, where the perturbed rows cannot be told apart; diffusers cannot undo "
                "it: load the UNet again and use FreeNoise without enable_free_noise_split_inference() (FreeNoise "
                "alone is supported)"
            )

    def _second_scale(self, pipe: Any, arguments: dict[str, Any], scale: float) -> float:
        """The CFG scale of the second denoiser's stage (the first stage's unless the call sets its own)."""
        second = arguments.get(self.family.second_scale_arg)
        if second is None:
            return scale
        if scale > 1 and second <= 1:
            raise ValueError(
                f"{type(pipe).__name__}({self.family.second_scale_arg}={second}) with {self.family.scale_arg}="
                f"{scale}: the pipeline still runs the unconditional call in that stage but combines nothing; inside "
                f"guide() give {self.family.second_scale_arg} above 1 or leave it None"
            )
        return float(second)

    def _check_corrector(self, pipe: Any) -> None:
        """The corrector moves the latents the denoiser sees; refuse where other inputs are computed from them,
        and schedulers whose step restarts from a sample they stored (the correction would be dropped)."""
        if self.family.list_args:
            raise ValueError(
                f"{type(pipe).__name__}: the Langevin corrector is not supported on this pipeline (its denoiser takes "
                "the latents as a list, one per sample)"
            )
        scheduler = pipe.scheduler
        order = list(inspect.signature(scheduler.step).parameters)[:3]
        if order != ["model_output", "timestep", "sample"]:  # CogVideoX's DPM: (output, old x0 prediction, t, ...)
            raise ValueError(
                f"{type(scheduler).__name__} is not supported with the Langevin corrector: its step takes "
                f"({', '.join(order)}, ...), not the sample it moves third, and goes on from an earlier step's "
                "prediction; use a scheduler that steps from the sample it is given, e.g. "
                "pipe.scheduler = CogVideoXDDIMScheduler.from_config(pipe.scheduler.config)"
            )
        stored = [name for name in STORED_SAMPLES if name in vars(scheduler)]
        if stored or hasattr(type(scheduler), "state_in_first_order"):
            why = f"keeps {stored[0]!r}" if stored else "runs two stages from its first-stage sample"
            raise ValueError(
                f"{type(scheduler).__name__} is not supported with the Langevin corrector: its step {why} and "
                "rebuilds the next sample from it, so the corrected sample would be silently dropped; use a "
                "scheduler that steps from the sample it is given (DDIM, DDPM, Euler, Euler ancestral, LMS, "
                "DPMSolverMultistep, DEIS, FlowMatchEuler), e.g. "
                "pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)"
            )
        if self.family.prediction is not None:
            raise ValueError(
                f"{type(pipe).__name__}: the Langevin corrector is not supported on this pipeline (it turns the "
                "denoiser's prediction into the scheduler's with the latents before the corrected ones reach it)"
            )
        if getattr(pipe, "controlnet", None) is not None:
            raise ValueError(
                f"{type(pipe).__name__}: the Langevin corrector is not supported with ControlNet (the ControlNet "
                "residuals are computed from the latents before the denoiser call, not from the corrected ones)"
            )
        config = getattr(self.denoiser, "config", {})
        if config.get("visual_cond"):  # Kandinsky 5 image-to-image: the image's channels follow the latents
            raise ValueError(
                f"{type(pipe).__name__}: the Langevin corrector needs a denoiser whose input is the latents alone "
                "(this one takes the input image's latents and mask beside them)"
            )
        inputs, outputs = config.get("in_channels"), config.get("out_channels")
        if inputs is not None and outputs is not None and outputs not in (inputs, 2 * inputs):  # 2x: learned sigma
            raise ValueError(
                f"{type(pipe).__name__}: the Langevin corrector needs a denoiser whose input is the latents alone "
                f"(this one takes {inputs} channels, e.g. inpainting's mask and image, and returns {outputs})"
            )

    def _has_uncond(self, pipe: Any, arguments: dict[str, Any]) -> bool:
        if not self.family.runs_cfg(arguments.get(self.family.scale_arg)) or self._distilled(pipe):
            return False
        if self._image_guidance_off(arguments):  # InstructPix2Pix: no guidance batch at all
            return False
        if self.family.layout == "sequential" and not self.family.negative_by_default:
            return self._sequential_negative(pipe, arguments)
        return True

    def _sequential_negative(self, pipe: Any, arguments: dict[str, Any]) -> bool:
        """Whether a call with a separate unconditional call (FLUX, Qwen-Image) runs true CFG: a negative prompt,
        or every negative embedding the family needs (FLUX: the sequence and the pooled ones, the pipeline's own
        test); some without the others is refused (the pipeline would silently run no true CFG)."""
        if arguments.get("negative_prompt") is not None:
            return True
        needed = self.family.negative_embeds
        given = [name for name in needed if arguments.get(name) is not None]
        if given and len(given) < len(needed):
            missing = [name for name in needed if name not in given]
            raise ValueError(
                f"{type(pipe).__name__}: {', '.join(given)} without {', '.join(missing)}; pass them together (the "
                "pipeline runs its true CFG only with all of them) or pass negative_prompt"
            )
        return bool(given)

    def _image_guidance_off(self, arguments: dict[str, Any]) -> bool:
        """Whether the call's image guidance scale is below 1, where InstructPix2Pix runs no guidance batch."""
        name = self.family.image_scale_arg
        return name is not None and arguments.get(name) is not None and arguments[name] < 1

    def _distilled(self, pipe: Any) -> bool:
        """A guidance-distilled model that runs no unconditional branch: an LCM-style UNet (``time_cond_proj_dim``)
        or a pipeline marked distilled (FLUX.2 klein's ``is_distilled``)."""
        config = getattr(getattr(pipe, self.family.denoiser), "config", {})
        flag = self.family.distilled_flag
        marked = flag is not None and bool(getattr(pipe, "config", {}).get(flag))
        return config.get("time_cond_proj_dim") is not None or marked

    def _ensure_uncond_branch(self, pipe: Any, arguments: dict[str, Any], solved: bool = False) -> None:
        """Switch the pipeline's unconditional branch on for a CFG-type method; ``solved``: the engine hands the
        pipeline a solved unconditional half (for its ``guidance_rescale``), as it always does for a separate
        unconditional call."""
        if self._distilled(pipe):
            raise ValueError(
                f"{type(pipe).__name__}: this guidance-distilled model (time_cond_proj_dim or is_distilled is set) "
                "runs no unconditional branch, so CFG-type guidance cannot be applied"
            )
        # the engine solves the pipeline's own u + s (c - u) for u: s <= 1 would skip the branch, and where u is
        # solved (a separate unconditional call, as FLUX's, or the rescaled CFG batch) the rounding of that solve
        # grows like s / (s - 1) away from 2 (10 % per step at 1.01 in bf16); the guided result does not depend on
        # s, so it is always 2 there
        scale_arg = self.family.scale_arg
        if not self.family.runs_cfg(arguments[scale_arg]) or self.family.layout == "sequential" or solved:
            arguments[scale_arg] = self.family.argument(FORCED_PIPELINE_SCALE + self.family.cfg_above - 1)
        if self._image_guidance_off(arguments):
            image_scale = self.family.image_scale_arg
            raise ValueError(
                f"{type(pipe).__name__}({image_scale}={arguments[image_scale]}): the pipeline runs its guidance batch "
                f"only with {image_scale} >= 1, so CFG-type guidance (which takes its text guidance's place) has no "
                "branch to act on; give it 1 (no image guidance) or more"
            )
        if self.family.second_scale_arg in arguments:  # the method's scale decides in every stage
            arguments[self.family.second_scale_arg] = None
        if self.family.layout == "sequential" and self.family.negative_by_default:
            return
        if self.family.layout == "sequential" and arguments.get("negative_prompt") is None:
            if self._sequential_negative(pipe, arguments):
                return
            if arguments.get("prompt_embeds") is not None:
                raise ValueError(
                    f"{type(pipe).__name__}: guidance needs an unconditional branch; with prompt_embeds, pass "
                    f"{' and '.join(self.family.negative_embeds)} too"
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


def _split(items: tuple[Guidance | LangevinCorrector, ...]) -> tuple[tuple[Guidance, ...], LangevinCorrector | None]:
    """Validate ``guide()``'s arguments: guidance methods and at most one corrector."""
    if not items:
        raise ValueError("guide() needs at least one guidance method, e.g. guide(pipe, APG(7.5))")
    for item in items:
        if not isinstance(item, (Guidance, LangevinCorrector)):
            raise TypeError(f"guide() takes guidance methods (CFG, APG, PAG, ...), got {type(item).__name__}")
    methods = tuple(m for m in items if isinstance(m, Guidance))
    correctors = [m for m in items if isinstance(m, LangevinCorrector)]
    uncond = [m for m in methods if m.branch == "uncond"]
    if len(uncond) > 1:
        raise ValueError(f"at most one of CFG/APG per call, got {[type(m).__name__ for m in uncond]}")
    if len(correctors) > 1:
        raise ValueError("at most one LangevinCorrector per guide()")
    return methods, (correctors[0] if correctors else None)


@contextlib.contextmanager
def guide(pipe: Any, *methods: Guidance | LangevinCorrector, sequential: bool = False) -> Iterator[Any]:
    """Use ``methods`` in every call of ``pipe`` inside the ``with`` block.

    >>> with guide(pipe, APG(7.5), PAG(3.0)):
    ...     image = pipe("a photo of a cat").images[0]

    At most one CFG-type method (CFG, APG) and any number of perturbation methods
    (PAG, SoftPAG, TPG); their updates add up. With a CFG-type method the
    pipeline's own CFG scale argument only switches the unconditional branch on
    (it is raised above 1 if needed) and the method's scale decides; with
    perturbations only, the pipeline's own CFG (if its scale > 1) is kept and
    composed with them. The perturbed branches are batched with the others in
    one denoiser call; ``sequential=True`` runs them as separate calls (less
    memory). A :class:`LangevinCorrector` adds corrector steps with the guided
    score before every denoiser evaluation. On exit the pipeline is exactly as
    it was.
    """
    guidance, corrector = _split(methods)
    controller = _Controller(pipe, guidance, sequential, corrector)
    denoiser = getattr(pipe, controller.family.denoiser, None)
    if not isinstance(denoiser, torch.nn.Module):
        raise TypeError(f"guide() needs {type(pipe).__name__}.{controller.family.denoiser} to be a torch module")
    if getattr(pipe, "scheduler", None) is None:
        raise TypeError(f"guide() needs {type(pipe).__name__}.scheduler")
    schedule_of(pipe.scheduler)  # fail early on an unknown schedule
    if hasattr(type(pipe), "_steerguard_base"):
        raise RuntimeError("this pipeline is already inside guide(); combine the methods in one guide() call")
    scale_arg = controller.family.scale_arg
    if (
        any(m.branch == "uncond" for m in guidance)
        and scale_arg not in inspect.signature(type(pipe).__call__).parameters
    ):
        raise ValueError(
            f"{type(pipe).__name__} runs no unconditional branch (it has no {scale_arg}: a guidance-distilled "
            "model's pipeline), so CFG-type guidance (CFG, APG) cannot be applied to it; perturbation guidance "
            "(PAG, SoftPAG, TPG) can"
        )

    from .perturbation import install

    inner = getattr(denoiser, "_orig_mod", denoiser)  # torch.compile(module) wraps the module: read its own forward
    controller.denoiser = denoiser
    second = getattr(pipe, controller.family.second_denoiser or "", None)
    controller.denoisers = (denoiser,) + ((second,) if isinstance(second, torch.nn.Module) else ())
    controller.signature = inspect.signature(type(inner).forward.__get__(inner))
    controller.parameter_names = list(controller.signature.parameters)
    with contextlib.ExitStack() as undo:  # all or nothing: whatever was installed is removed if a later part fails
        for module in controller.denoisers:  # validates the layer selectors and processors first
            undo.callback(install(controller, module))
        for module in controller.denoisers:
            undo.callback(intercept_calls(module, controller.intercept))
        original_class = type(pipe)
        pipe.__class__ = _guided_class(original_class, controller)
        undo.callback(setattr, pipe, "__class__", original_class)
        yield pipe


def _restore_step(scheduler: Any, own_step: Callable[..., Any] | None) -> None:
    """Put back an instance-level ``step`` someone else installed, or none."""
    if own_step is None:
        vars(scheduler).pop("step", None)
    else:
        scheduler.step = own_step


def _correcting_step(step: Callable[..., Any], controller: _Controller) -> Callable[..., Any]:
    """``scheduler.step`` that starts from the corrected sample of the current step."""

    def corrected_step(model_output: Tensor, timestep: Any, sample: Tensor, *args: Any, **kwargs: Any) -> Any:
        run = ACTIVE_RUN.get()
        if run is not None and run.controller is controller:
            sample = run.apply_correction(sample)
        return step(model_output, timestep, sample, *args, **kwargs)

    return corrected_step
