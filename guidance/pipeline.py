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
import copy
import dataclasses
import inspect
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from . import prediction as P
from .cfg import CFG
from .corrector import LangevinCorrector
from .hooks import ACTIVE_RUN, PASS, intercept_calls
from .method import Guidance
from .samplers import langevin_correct

#: the scale the pipeline's own CFG gets when a call would otherwise skip the
#: unconditional branch (its value cancels out, see the module docstring)
FORCED_PIPELINE_SCALE = 2.0
_MISSING = object()


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
    #: denoiser arguments without a batch dimension
    unbatched: tuple[str, ...] = ()
    #: joint attention puts the text tokens before the image tokens (FLUX) rather than after (SD3)
    text_first: bool = False


_RESCALE = ("guidance_rescale", "CFG rescaling inside the pipeline would act on the already guided prediction")
FAMILIES: tuple[Family, ...] = (
    Family(
        "sd",
        (
            "StableDiffusionPipeline",
            "StableDiffusionImg2ImgPipeline",
            "StableDiffusionInpaintPipeline",
            "StableDiffusionControlNetPipeline",
            "StableDiffusionControlNetImg2ImgPipeline",
            "StableDiffusionControlNetInpaintPipeline",
        ),
        "unet",
        "uncond_cond",
        "guidance_scale",
        refused=(_RESCALE,),
    ),
    Family(
        "sdxl",
        (
            "StableDiffusionXLPipeline",
            "StableDiffusionXLImg2ImgPipeline",
            "StableDiffusionXLInpaintPipeline",
            "StableDiffusionXLControlNetPipeline",
            "StableDiffusionXLControlNetImg2ImgPipeline",
            "StableDiffusionXLControlNetInpaintPipeline",
        ),
        "unet",
        "uncond_cond",
        "guidance_scale",
        refused=(_RESCALE,),
    ),
    Family(
        "sd3",
        (
            "StableDiffusion3Pipeline",
            "StableDiffusion3Img2ImgPipeline",
            "StableDiffusion3InpaintPipeline",
            "StableDiffusion3ControlNetPipeline",
        ),
        "transformer",
        "uncond_cond",
        "guidance_scale",
        refused=(("skip_guidance_layers", "skip-layer guidance calls the denoiser outside the CFG batch"),),
    ),
    Family(
        "flux",
        ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxControlNetPipeline"),
        "transformer",
        "sequential",
        "true_cfg_scale",
        timestep_divisor=1000.0,
        unbatched=("img_ids", "txt_ids"),
        text_first=True,
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

    alpha_sigma: Callable[[Tensor], tuple[Tensor, Tensor]]
    coefficients: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def schedule_of(scheduler: Any) -> Schedule:
    """Read the noise schedule and prediction type from a diffusers scheduler (duck-typed)."""
    config = scheduler.config
    name = type(scheduler).__name__
    kind = config.get("prediction_type", "epsilon")
    n_train = config.get("num_train_timesteps", 1000)
    if P.is_flow_schedule(name, config):
        return Schedule(
            lambda t: P.flow(t.float() / n_train),
            lambda a, s: P.x0_coefficients(a, s, "flow"),
        )
    if name.startswith("EDM"):
        sigma_data = config["sigma_data"]
        sign = -1.0 if kind == "v_prediction" else 1.0
        return Schedule(
            lambda t: P.edm(torch.exp(4 * t.float()), sigma_data),
            lambda a, s: P.edm_x0_coefficients(a, s, sigma_data, sign),
        )
    if getattr(scheduler, "alphas_cumprod", None) is not None and kind in P.PREDICTION_TYPES:
        if config.get("timestep_type", "discrete") == "continuous":
            alpha_sigma = lambda t: P.ve_to_vp(torch.exp(4 * t.float()))
        else:
            cumprod = scheduler.alphas_cumprod
            alpha_sigma = lambda t: P.vp_discrete(cumprod, t)
        return Schedule(alpha_sigma, lambda a, s: P.x0_coefficients(a, s, kind))
    raise TypeError(
        f"guide() cannot read the noise schedule of {name}: it needs a flow-matching scheduler, an EDM scheduler "
        f"or one with `alphas_cumprod` and prediction_type in {P.PREDICTION_TYPES} (got {kind!r})"
    )


def _map_batched(value: Any, fn: Callable[[Tensor], Tensor], n: int) -> Any:
    """Apply ``fn`` to every tensor in ``value`` (nested in dicts, lists, tuples) whose batch size is ``n``."""
    if isinstance(value, Tensor):
        return fn(value) if value.ndim >= 1 and value.shape[0] == n else value
    if isinstance(value, dict):
        return {key: _map_batched(item, fn, n) for key, item in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_map_batched(item, fn, n) for item in value)
    return value


def _prediction(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output.sample


def _with_prediction(output: Any, pred: Tensor) -> Any:
    if isinstance(output, tuple):
        return (pred, *output[1:])
    output.sample = pred
    return output


def steps_of_the_call(pipe: Any) -> int:
    """How many denoiser evaluations (one per step of a first-order scheduler) the running call makes.

    Pipelines set ``_num_timesteps`` to the length of the timesteps their loop runs over, after cutting them
    for ``strength``, ``denoising_start`` and ``denoising_end`` (``guide()`` clears it before each call). Otherwise
    the scheduler's timesteps from its ``begin_index`` on.
    """
    count = vars(pipe).get("_num_timesteps")
    if isinstance(count, int) and count > 0:
        return count
    scheduler = pipe.scheduler
    timesteps = getattr(scheduler, "timesteps", None)
    steps = (len(timesteps) if timesteps is not None else 0) - (getattr(scheduler, "begin_index", None) or 0)
    return max(steps, 1)


class _Run:
    """Per-call state: method states, batch rows of the perturbed branches, the pending conditional output."""

    def __init__(self, controller: _Controller, pipeline_scale: float, has_uncond: bool) -> None:
        self.controller = controller
        self.family = controller.family
        self.pipeline_scale = pipeline_scale
        #: whether the call runs an unconditional branch; ``has_uncond``: whether the current step does (a
        #: step-end callback such as diffusers' SDCFGCutoffCallback may switch the pipeline's CFG off)
        self.call_has_uncond = self.has_uncond = has_uncond
        methods = controller.methods
        if has_uncond and not any(m.branch == "uncond" for m in methods):
            methods = (*methods, CFG(pipeline_scale))  # the pipeline's own CFG, composed with perturbations
        self.methods = methods
        self.states = [m.new_state(self.family.name) for m in methods]
        self.perturbations = [i for i, m in enumerate(methods) if m.branch == "perturbed"]
        #: batch rows each perturbation acts on during the current denoiser call (read by the hooks)
        self.rows: dict[int, slice | None] = dict.fromkeys(self.perturbations)
        self.pending: tuple[Tensor, Tensor, dict[int, Tensor], float] | None = None
        self.schedule = schedule_of(controller.pipe.scheduler)
        self.evaluations = 0
        self.total: int | None = None
        self.correction: tuple[Tensor, Tensor] | None = None  # (model input before, after) the last correction
        corrector = controller.corrector
        self.corrector_generator = torch.Generator().manual_seed(corrector.seed) if corrector is not None else None

    # -- one denoiser call ------------------------------------------------------------------------------------
    def forward(self, call: Callable[..., Any], inputs: tuple[tuple, dict], x: Tensor, t: Tensor) -> Any:
        n = x.shape[0]
        self.has_uncond = self.call_has_uncond and self._pipeline_cfg_on()
        if self.family.layout == "sequential" and self.has_uncond and self.pending is not None:
            output = call(*inputs[0], **inputs[1])  # the unconditional call of a FLUX step
            return _with_prediction(output, self._finish_sequential(x, t, _prediction(output)))
        if self.has_uncond and self.family.layout != "sequential":
            if n % 2:
                raise RuntimeError(f"{self.family.name}: expected a CFG batch of even size, got {n}")
            cond_rows = slice(n // 2, n) if self.family.layout == "uncond_cond" else slice(0, n // 2)
        else:
            cond_rows = slice(0, n)
        fraction = self._fraction()
        if self.controller.corrector is not None:
            x, inputs = self._correct(call, inputs, x, t, cond_rows, fraction)
        output, pred, perturbed = self._branches(call, inputs, x, cond_rows, fraction)
        return _with_prediction(output, self._combine(x, t, pred, perturbed, cond_rows, fraction))

    def _branches(self, call, inputs, x, cond_rows, fraction) -> tuple[Any, Tensor, dict[int, Tensor]]:
        """Evaluate the denoiser on the call's rows and on every active perturbation's copy of the cond rows."""
        n, b = x.shape[0], cond_rows.stop - cond_rows.start
        active = [i for i in self.perturbations if self.methods[i].active(fraction)]
        if not active:
            output = call(*inputs[0], **inputs[1])
            return output, _prediction(output), {}
        if self.controller.sequential:
            output = call(*inputs[0], **inputs[1])
            cond_only = self._rebind(inputs, lambda v: v[cond_rows], n)
            perturbed = {i: self._perturbed_call(call, cond_only, {i: slice(None)})[i] for i in active}
            return output, _prediction(output), perturbed
        expanded = self._rebind(inputs, lambda v: torch.cat([v, *[v[cond_rows]] * len(active)]), n)
        rows = {i: slice(n + j * b, n + (j + 1) * b) for j, i in enumerate(active)}
        output, everything = self._perturbed_call(call, expanded, rows, keep_output=True)
        return output, everything[:n], {i: everything[r] for i, r in rows.items()}

    def _correct(self, call, inputs, x, t, cond_rows, fraction) -> tuple[Tensor, tuple[tuple, dict]]:
        """Langevin corrector steps on the noisy sample at this level, with the guided score (Song et al. 2021)."""
        corrector = self.controller.corrector
        n, b = x.shape[0], cond_rows.stop - cond_rows.start
        t_cond = t[cond_rows] if t.numel() > 1 else t.expand(b)
        alpha, sigma = self.schedule.alpha_sigma(t_cond)
        if alpha.min() < 1e-4:  # pure noise (flow matching at sigma = 1): nothing to correct, and no VE scale
            return x, inputs
        a = P.broadcast(alpha, x[cond_rows])
        coef_a, coef_b = (P.broadcast(c, x[cond_rows]) for c in self.schedule.coefficients(alpha, sigma))
        saved = copy.deepcopy([st for st in self.states if not isinstance(st, torch.Generator)])

        def denoise(x_ve: Tensor, _sigma: Tensor) -> Tensor:  # guided x0 on the VE scale x0 + (sigma / alpha) eps
            x_in = (x_ve * a).to(x.dtype)
            x_all = x_in.repeat(n // b, *[1] * (x.ndim - 1))
            _, pred, perturbed = self._branches(call, self._with_sample(inputs, x_all), x_all, cond_rows, fraction)
            g = self._guided_rows(x_all, t, pred, perturbed, cond_rows, fraction)
            return coef_a * x_in.float() + coef_b * g.float()

        x_cond = x[cond_rows]
        x_ve, _ = langevin_correct(
            denoise,
            x_cond.float() / a,
            sigma / alpha,
            steps=corrector.steps,
            snr=corrector.snr,
            generator=self.corrector_generator,
        )
        it = iter(saved)
        self.states = [st if isinstance(st, torch.Generator) else next(it) for st in self.states]
        corrected = (x_ve * a).to(x.dtype)
        self.correction = (x_cond, corrected)
        x_all = corrected.repeat(n // b, *[1] * (x.ndim - 1))
        return x_all, self._with_sample(inputs, x_all)

    def _pipeline_cfg_on(self) -> bool:
        """Whether the pipeline still runs its CFG batch this step (its ``do_classifier_free_guidance``, if any)."""
        if self.family.layout == "sequential":
            return True
        return bool(getattr(self.controller.pipe, "do_classifier_free_guidance", True))

    def _with_sample(self, inputs: tuple[tuple, dict], x: Tensor) -> tuple[tuple, dict]:
        args, kwargs = inputs
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, self.controller.parameter_names[0]: x}

    def apply_correction(self, sample: Tensor) -> Tensor:
        """The scheduler's ``sample`` moved by the last correction (model inputs are ``c * sample``)."""
        if self.correction is None:
            return sample
        before, after = self.correction
        self.correction = None
        rows = sample[: before.shape[0]].float()
        scale = (before.float() * rows).sum() / rows.square().sum()  # x_in = c * latents
        delta = ((after.float() - before.float()) / scale).to(sample.dtype)
        return sample + delta.repeat(sample.shape[0] // delta.shape[0], *[1] * (sample.ndim - 1))

    def _perturbed_call(self, call, inputs, rows, keep_output=False):
        self.rows.update(rows)
        try:
            output = call(*inputs[0], **inputs[1])
        finally:
            self.rows.update(dict.fromkeys(rows))
        pred = _prediction(output)
        return (output, pred) if keep_output else {i: pred for i in rows}

    def _rebind(self, inputs: tuple[tuple, dict], fn: Callable[[Tensor], Tensor], n: int) -> tuple[tuple, dict]:
        """The call's arguments with ``fn`` applied along the batch (names in ``family.unbatched`` untouched)."""
        args, kwargs = inputs
        names = self.controller.parameter_names
        skip = self.family.unbatched
        return (
            tuple(v if names[i] in skip else _map_batched(v, fn, n) for i, v in enumerate(args)),
            {k: v if k in skip else _map_batched(v, fn, n) for k, v in kwargs.items()},
        )

    def _fraction(self) -> float:
        """``i / n`` for the i-th of the ``n`` denoising steps this call runs (read at its first evaluation)."""
        if self.total is None:
            self.total = steps_of_the_call(self.controller.pipe)
        fraction = min(self.evaluations / self.total, 1 - 1e-9)
        self.evaluations += 1
        return fraction

    # -- combining the branches ------------------------------------------------------------------------------
    def _combine(self, x, t, pred, perturbed, cond_rows, fraction) -> Tensor:
        """The output the pipeline expects: its own CFG combination of it is the guided prediction."""
        channels = x.shape[1]
        learned_sigma = x.ndim == 4 and pred.shape[1] == 2 * channels
        rest = pred[:, channels:] if learned_sigma else None
        if self.has_uncond and self.family.layout == "sequential":  # FLUX's conditional call: wait for the other
            perturbed = {i: p[:, :channels] if learned_sigma else p for i, p in perturbed.items()}
            self.pending = (x, pred[cond_rows], perturbed, fraction)
            eps = pred
        else:
            g = self._guided_rows(x, t, pred, perturbed, cond_rows, fraction)
            eps = g.repeat(x.shape[0] // g.shape[0], *[1] * (g.ndim - 1))
        return eps if rest is None else torch.cat([eps, rest], dim=1)

    def _guided_rows(self, x, t, pred, perturbed, cond_rows, fraction) -> Tensor:
        """The guided prediction for the cond rows of a batched call (learned-sigma channels dropped)."""
        channels = x.shape[1]
        if x.ndim == 4 and pred.shape[1] == 2 * channels:
            pred = pred[:, :channels]
            perturbed = {i: p[:, :channels] for i, p in perturbed.items()}
        cond = pred[cond_rows]
        if not self.has_uncond:
            return self.guided(x, t, cond, None, perturbed, fraction)
        uncond_rows = slice(0, cond.shape[0]) if cond_rows.start else slice(cond.shape[0], None)
        x_half, t_half = x[cond_rows], (t[cond_rows] if t.numel() > 1 else t)
        return self.guided(x_half, t_half, cond, pred[uncond_rows], perturbed, fraction)

    def _finish_sequential(self, x: Tensor, t: Tensor, uncond: Tensor) -> Tensor:
        x_cond, cond, perturbed, fraction = self.pending
        self.pending = None
        if x_cond.data_ptr() != x.data_ptr() or x_cond.shape != x.shape:
            raise RuntimeError("the unconditional call did not follow the conditional one on the same latents")
        g = self.guided(x, t, cond, uncond, perturbed, fraction).float()
        s = self.pipeline_scale  # the pipeline then computes u + s (c - u); solve it for u
        return ((g - s * cond.float()) / (1 - s)).to(uncond.dtype)

    def guided(self, x, t, cond, uncond, perturbed, fraction) -> Tensor:
        """``D_c + sum_m update_m`` in the methods' spaces, returned in model space and dtype."""
        if x.ndim == cond.ndim and x.shape[1] > cond.shape[1]:  # SD inpainting: mask and image channels follow
            x = x[:, : cond.shape[1]]
        x32, cond32 = x.float(), cond.float()
        total = cond32.clone()
        coefs = None
        for i, (method, state) in enumerate(zip(self.methods, self.states)):
            if not method.active(fraction):
                continue
            other = uncond if method.branch == "uncond" else perturbed.get(i)
            if other is None:
                continue
            other32 = other.float()
            if method.space == "x0":
                if coefs is None:
                    a, b = self.schedule.coefficients(*self.schedule.alpha_sigma(t.expand(x.shape[0])))
                    coefs = P.broadcast(a, x32), P.broadcast(b, x32)
                a, b = coefs
                total += method.update(a * x32 + b * cond32, a * x32 + b * other32, state) / b
            else:
                total += method.update(cond32, other32, state)
        return total.to(cond.dtype)


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
        self.signature: inspect.Signature | None = None
        self.parameter_names: list[str] = []
        self.run: _Run | None = None
        self._busy = threading.Lock()

    def intercept(self, module: torch.nn.Module, call: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """The denoiser's calls during this pipeline's own calls in this thread (others pass, see hooks.ACTIVE_RUN)."""
        run = ACTIVE_RUN.get()
        if run is None or run.controller is not self or module is not self.denoiser:
            return PASS
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        x, t = bound[self.parameter_names[0]], bound["timestep"]
        t = torch.as_tensor(t, device=x.device).reshape(-1) * self.family.timestep_divisor
        return run.forward(call, (args, kwargs), x, t)

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
        bound.apply_defaults()
        arguments = bound.arguments
        for name, reason in self.family.refused:
            if arguments.get(name) not in (None, 0, 0.0, [], ()):
                raise ValueError(f"{type(pipe).__name__}({name}=...) is not supported inside guide(): {reason}")
        if any(m.branch == "uncond" for m in self.methods):
            self._ensure_uncond_branch(pipe, arguments)
        has_uncond = self._has_uncond(pipe, arguments)
        if self.corrector is not None:
            self._check_corrector(pipe)
        if self.corrector is not None and has_uncond and self.family.layout == "sequential":
            raise ValueError(
                f"{type(pipe).__name__}: the Langevin corrector needs every branch in one denoiser call; FLUX's true "
                "CFG runs the unconditional branch in a separate call (use the corrector without true CFG)"
            )
        self.run = _Run(self, float(arguments[self.family.scale_arg]), has_uncond)
        token = ACTIVE_RUN.set(self.run)
        previous_count = vars(pipe).pop("_num_timesteps", _MISSING)  # a stale count from an earlier call
        try:
            return call(*bound.args, **bound.kwargs)
        finally:
            ACTIVE_RUN.reset(token)
            self.run = None
            if previous_count is not _MISSING and "_num_timesteps" not in vars(pipe):
                pipe._num_timesteps = previous_count

    def _check_corrector(self, pipe: Any) -> None:
        """The corrector moves the latents the denoiser sees; refuse where other inputs are computed from them."""
        if getattr(pipe, "controlnet", None) is not None:
            raise ValueError(
                f"{type(pipe).__name__}: the Langevin corrector is not supported with ControlNet (the ControlNet "
                "residuals are computed from the latents before the denoiser call, not from the corrected ones)"
            )
        config = getattr(self.denoiser, "config", {})
        inputs, outputs = config.get("in_channels"), config.get("out_channels")
        if inputs is not None and outputs is not None and outputs not in (inputs, 2 * inputs):  # 2x: learned sigma
            raise ValueError(
                f"{type(pipe).__name__}: the Langevin corrector needs a denoiser whose input is the latents alone "
                f"(this one takes {inputs} channels, e.g. inpainting's mask and image, and returns {outputs})"
            )

    def _has_uncond(self, pipe: Any, arguments: dict[str, Any]) -> bool:
        if arguments[self.family.scale_arg] <= 1 or self._distilled(pipe):
            return False
        if self.family.layout == "sequential":
            return arguments.get("negative_prompt") is not None or arguments.get("negative_prompt_embeds") is not None
        return True

    def _distilled(self, pipe: Any) -> bool:
        config = getattr(getattr(pipe, self.family.denoiser), "config", {})
        return config.get("time_cond_proj_dim") is not None

    def _ensure_uncond_branch(self, pipe: Any, arguments: dict[str, Any]) -> None:
        if self._distilled(pipe):
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

    from .perturbation import install

    inner = getattr(denoiser, "_orig_mod", denoiser)  # torch.compile(module) wraps the module: read its own forward
    controller.denoiser = denoiser
    controller.signature = inspect.signature(type(inner).forward.__get__(inner))
    controller.parameter_names = list(controller.signature.parameters)
    with contextlib.ExitStack() as undo:  # all or nothing: whatever was installed is removed if a later part fails
        undo.callback(install(controller, inner))  # validates the layer selectors and processors first
        undo.callback(intercept_calls(denoiser, controller.intercept))
        original_class = type(pipe)
        pipe.__class__ = _guided_class(original_class, controller)
        undo.callback(setattr, pipe, "__class__", original_class)
        if corrector is not None:
            undo.callback(_restore_step, pipe.scheduler, vars(pipe.scheduler).get("step"))
            pipe.scheduler.step = _correcting_step(pipe.scheduler.step, controller)
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
