"""The per-call branch engine of ``guide()``: one denoiser call of a pipeline step becomes every branch's prediction,
combined by the methods into what the pipeline expects.

A :class:`Run` lives for one pipeline call: the methods' per-run states, the batch rows of the perturbed branches
(read by the perturbation hooks), the corrector's state. Each denoiser evaluation is described by a :class:`Step`
record (its input, timesteps, the rows of the conditional branch, where in the run it is, and whether this step
runs the unconditional branch).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import prediction as P
from .cfg import CFG, cfg_update
from .families import schedule_of, steps_of_the_call
from .samplers import langevin_correct


@dataclasses.dataclass(frozen=True)
class Step:
    """One denoiser evaluation of a pipeline step."""

    #: the denoiser's input (all rows of the call) and timesteps
    x: Tensor
    t: Tensor
    #: the rows of the conditional branch in ``x``
    cond_rows: slice
    #: ``i / n`` for the i-th of the ``n`` steps of the call
    fraction: float
    #: whether this step runs the pipeline's unconditional branch
    has_uncond: bool

    @property
    def rows(self) -> int:
        """How many samples the call makes (the conditional rows)."""
        return self.cond_rows.stop - self.cond_rows.start


def _map_batched(value: Any, fn: Callable[[Tensor], Tensor], n: int, frames: int = 1) -> Any:
    """Apply ``fn`` to every tensor in ``value`` (nested in dicts, lists, tuples) whose batch size is ``n``, and
    (``frames`` > 1) to every one laid out per frame, ``n * frames`` rows sample-major, as ``n`` rows of frames."""
    if isinstance(value, Tensor):
        if value.ndim >= 1 and value.shape[0] == n:
            return fn(value)
        if frames > 1 and value.ndim >= 1 and value.shape[0] == n * frames:
            return fn(value.unflatten(0, (n, frames))).flatten(0, 1)
        return value
    if isinstance(value, dict):
        return {key: _map_batched(item, fn, n, frames) for key, item in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_map_batched(item, fn, n, frames) for item in value)
    return value


def _generated_tokens(kwargs: dict[str, Any], x: Tensor) -> int | None:
    """How many leading tokens of a sequence model's input ``x`` (N, T, C) are the latents being generated, when
    reference-image tokens follow them (the pipeline keeps only the first tokens of the output): FLUX Kontext and
    LongCat-Image Edit mark them by another first coordinate of the position ids than the generated ones' (Kontext:
    1 after 0, LongCat: 2 after 1), Qwen-Image Edit lists one ``(frames, height, width)`` per image in
    ``img_shapes``, the generated one first. None when all are generated."""
    if x.ndim != 3:
        return None
    shapes = kwargs.get("img_shapes")  # per sample: (f, h, w), or a list of them, the generated image first
    first = shapes[0] if isinstance(shapes, list | tuple) and shapes else None
    if isinstance(first, list | tuple) and len(first) > 1 and all(isinstance(s, list | tuple) for s in first):
        sizes = [math.prod(shape) for shape in first]
        if sum(sizes) != x.shape[1]:
            raise RuntimeError(f"img_shapes {first} describe {sum(sizes)} tokens, the input has {x.shape[1]}")
        return sizes[0]
    ids = kwargs.get("img_ids")
    if not isinstance(ids, Tensor):
        return None
    ids = ids[0] if ids.ndim == 3 else ids  # diffusers' deprecated batched ids
    if ids.ndim != 2 or ids.shape[0] != x.shape[1]:
        return None
    reference = ids[:, 0] != ids[0, 0]
    if not reference.any():
        return None
    count = int(reference.int().argmax())
    if not reference[count:].all():
        raise RuntimeError("the reference-image tokens must follow the generated ones (img_ids' first coordinate)")
    return count


def condition_region(times: Tensor, x: Tensor) -> tuple[int, slice] | None:
    """Where the generated latents sit in the denoiser input ``x`` when its timestep is one per token, ``times``
    ``(B, N)``, and a leading block of condition tokens runs below the step's time (LTX-Video image-to-video: the
    first frame's packed tokens at 0; Wan 2.2 TI2V: the first latent frame's patches), as ``(dim, slice)`` of
    ``x``: the tokens after the block on dim 1 of packed ``(B, N, C)`` latents, the frames after it on dim 2 of
    ``(B, C, F, H, W)`` latents whose tokens run frame by frame. None when every token is at the step's time."""
    condition = times < times.amax(dim=1, keepdim=True)
    if not condition.any():
        return None
    count = int((~condition[0]).int().argmax())  # the first generated token
    if not condition[:, :count].all() or condition[:, count:].any():
        raise ValueError(
            "a timestep per token is supported where only a leading block of condition tokens (the first frame) "
            "runs below the step's time, the same in every row (not LTX's condition pipeline's frames anywhere at "
            "any strength)"
        )
    tokens = times.shape[1]
    if x.ndim == 3 and x.shape[1] == tokens:
        return 1, slice(count, None)
    if x.ndim == 5 and tokens % x.shape[2] == 0 and count % (tokens // x.shape[2]) == 0:
        return 2, slice(count // (tokens // x.shape[2]), None)
    raise ValueError(
        f"a timestep per token over {tokens} tokens with {count} condition tokens does not fit the denoiser's input "
        f"{tuple(x.shape)} (packed tokens, or whole leading frames of (B, C, F, H, W) latents)"
    )


def module_rows(rows: slice, size: int, batch: int, name: str) -> slice:
    """The rows of a module's input of ``size`` rows that hold the ``rows`` of the denoiser call's ``batch``: the
    same, unless the denoiser folds other dimensions into its batch, sample-major (AnimateDiff's UNet: a sample's
    frames in its spatial layers, its pixels in its motion modules); then each sample's ``size / batch`` rows."""
    if size == batch or (rows.start is None and rows.stop is None):
        return rows
    if not batch or size % batch:
        raise RuntimeError(f"{name}: its input's batch of {size} does not fold the denoiser call's batch of {batch}")
    k = size // batch
    return slice(rows.start * k, rows.stop * k)


def generated_channels(x: Tensor, pred: Tensor) -> Tensor:
    """The denoiser input ``x`` without the condition channels that follow the generated ones (SD inpainting's mask
    and image on dim 1, Kandinsky 5 image-to-image's on its channels-last dim -1): ``x`` cut to ``pred``'s size on
    the one dimension where it is larger."""
    if x.ndim != pred.ndim or x.shape == pred.shape:
        return x
    larger = [d for d in range(x.ndim) if x.shape[d] != pred.shape[d]]
    if len(larger) != 1 or x.shape[larger[0]] < pred.shape[larger[0]]:
        raise RuntimeError(f"the denoiser's input {tuple(x.shape)} does not hold its prediction {tuple(pred.shape)}")
    return x.narrow(larger[0], 0, pred.shape[larger[0]])


def _copied_lists(value: Any) -> Any:
    """``value`` with every list in it (nested in lists and dicts) a new list of the same items."""
    if isinstance(value, list):
        return [_copied_lists(item) for item in value]
    if isinstance(value, dict):
        return {key: _copied_lists(item) for key, item in value.items()}
    return value


def _fresh_lists(call: Callable[..., Any]) -> Callable[..., Any]:
    """``call`` handed new lists at every call: the UNet pops the T2I-Adapter's residuals off the list it is given
    (``down_intrablock_additional_residuals``), which would leave a second call of the same step without them."""

    def fresh(*args: Any, **kwargs: Any) -> Any:
        return call(*_copied_lists(list(args)), **_copied_lists(kwargs))

    return fresh


def _solved_uncond(guided: Tensor, cond: Tensor, s: float) -> Tensor:
    """The unconditional prediction ``u`` (float32) for which the pipeline's own ``u + s (c - u)`` is ``guided``."""
    return (guided.float() - s * cond.float()) / (1 - s)


def _raw_prediction(output: Any) -> Any:
    """The denoiser output's prediction as the denoiser returned it (a tensor, or Z-Image's list per sample)."""
    return output[0] if isinstance(output, tuple) else output.sample


def _prediction(output: Any) -> Tensor:
    pred = _raw_prediction(output)
    return torch.stack(pred) if isinstance(pred, list) else pred  # Z-Image: one output per sample


def _with_prediction(output: Any, pred: Tensor) -> Any:
    if isinstance(_raw_prediction(output), list):
        pred = list(pred.unbind(0))
    if isinstance(output, tuple):
        return (pred, *output[1:])
    output.sample = pred
    return output


class Run:
    """Per-call state: method states, batch rows of the perturbed branches, the pending conditional output.

    ``controller`` is the ``guide()`` controller of the pipeline (its family, methods, corrector, pipeline,
    denoiser parameter names and ``sequential`` choice).
    """

    def __init__(self, controller: Any, pipeline_scale: float, has_uncond: bool, solve_uncond: bool = False) -> None:
        self.controller = controller
        self.family = controller.family
        self.pipeline_scale = pipeline_scale
        #: a batched CFG call hands back the true conditional half and the unconditional half solved from the
        #: pipeline's ``u + s (c - u) = guided`` (the pipeline's ``guidance_rescale`` reads the conditional half),
        #: instead of the guided prediction in both halves
        self.solve_uncond = solve_uncond
        #: whether the call runs an unconditional branch (a step may not: see :meth:`step_of`)
        self.has_uncond = has_uncond
        methods = controller.methods
        #: (text, image) token counts of the current denoiser call of a sequence model (FLUX, AuraFlow), else None
        self.tokens: tuple[int, int] | None = None
        #: where the generated latents sit in the denoiser's input and output, ``(dim, slice)``, when others share
        #: it: reference-image tokens after them (FLUX Kontext, Qwen-Image Edit), condition tokens or frames before
        #: them at a lower timestep (LTX-Video image-to-video, Wan 2.2 TI2V) or as the first frame (Kandinsky 5,
        #: HunyuanVideo image-to-video); else None
        self.generated: tuple[int, slice] | None = None
        #: index of the pipeline's own CFG among the methods (composed with perturbations), if it runs one
        self.own_cfg: int | None = None
        #: the own CFG's weights where the pipeline holds a tensor of them (Stable Video Diffusion: one per frame)
        self.own_weights: Tensor | None = None
        if has_uncond and not any(m.branch == "uncond" for m in methods):
            methods, self.own_cfg = (*methods, CFG(pipeline_scale)), len(methods)
        self.methods = methods
        self.states = [m.new_state(self.family.name) for m in methods]
        self.perturbations = [i for i, m in enumerate(methods) if m.branch == "perturbed"]
        #: batch rows each perturbation acts on during the current denoiser call (read by the hooks)
        self.rows: dict[int, slice | None] = dict.fromkeys(self.perturbations)
        #: the batch of the denoiser call those rows index (a module that folds the frames into its batch sees
        #: ``batch * frames`` rows, sample-major: see :func:`module_rows`)
        self.batch = 0
        self.pending: tuple[Step, Tensor, dict[int, Tensor]] | None = None
        self.schedule = schedule_of(controller.pipe.scheduler, self.family.prediction)
        self.evaluations = 0
        self.total: int | None = None
        self.correction: tuple[Tensor, Tensor] | None = None  # (model input before, after) the last correction
        corrector = controller.corrector
        self.corrector_generator = torch.Generator().manual_seed(corrector.seed) if corrector is not None else None

    # -- one denoiser call ------------------------------------------------------------------------------------
    def forward(
        self,
        call: Callable[..., Any],
        inputs: tuple[tuple, dict],
        x: Tensor,
        t: Tensor,
        timestep: Any = None,
        token_times: Tensor | None = None,
    ) -> Any:
        """The output of one denoiser call (``timestep``: the timestep argument as the denoiser got it; ``t``: the
        step's time per row; ``token_times``: the time per token ``(B, N)`` of a denoiser that takes one)."""
        call = _fresh_lists(call)  # one step may call the denoiser several times on the same arguments
        if self.family.layout == "sequential" and self.pending is not None:
            output = call(*inputs[0], **inputs[1])  # the unconditional call of a FLUX step
            return _with_prediction(output, self._finish_sequential(x, t, _prediction(output)))
        has_uncond = self.has_uncond and self._pipeline_cfg_on() and not self._cfg_cut(timestep)
        step = self.step_of(x, t, has_uncond)
        context = inputs[1].get("encoder_hidden_states")
        self.tokens = None
        if context is not None and x.ndim == 3:
            self.tokens = (context.shape[1], x.shape[1])
        elif x.ndim == 4 and self.family.joint_tokens is not None:  # AuraFlow, HiDream: latents as images
            self.tokens = self.family.joint_tokens(getattr(self.controller.pipe, self.family.denoiser), x, inputs[1])
        self.generated = self._generated_region(inputs[1], x, token_times)
        if self.generated is not None and self.controller.corrector is not None:
            raise ValueError(
                "the Langevin corrector is not supported with reference-image or condition tokens (FLUX Kontext with "
                "an image, Qwen-Image Edit, LTX-Video, Wan 2.2 TI2V, Kandinsky 5 and HunyuanVideo image-to-video; "
                "Qwen-Image 2.1, whose output covers its text): it would move them with the generated latents"
            )
        self._follow_pipeline_scale(timestep)
        if self.controller.corrector is not None:
            step, inputs = self._correct(call, inputs, step)
        output, pred, perturbed = self._branches(call, inputs, step)
        return _with_prediction(output, self._combine(step, pred, perturbed))

    def _generated_region(
        self, kwargs: dict[str, Any], x: Tensor, token_times: Tensor | None
    ) -> tuple[int, slice] | None:
        """Where the generated latents sit in this denoiser call's input and output (:attr:`generated`)."""
        first_frame = self.family.image_first_frame
        dim = None if first_frame is None else first_frame(self.controller.pipe)
        if dim is not None:  # Kandinsky 5, HunyuanVideo image-to-video: the image's frame is not stepped
            return dim, slice(1, None)
        if token_times is not None:  # LTX-Video image-to-video, Wan 2.2 TI2V
            return condition_region(token_times, x)
        if self.family.generated_last:  # Qwen-Image 2.1: the last image's tokens end the input and the output
            return 1, slice(-math.prod(kwargs["img_shapes"][0][-1]), None)
        count = _generated_tokens(kwargs, x)  # FLUX Kontext, Qwen-Image Edit, LongCat-Image Edit
        return None if count is None else (1, slice(0, count))

    def _cfg_cut(self, timestep: Any) -> bool:
        """Whether the pipeline skips its unconditional branch at this step (:attr:`.families.Family.cfg_cut`)."""
        cut = self.family.cfg_cut
        if cut is None:
            return False
        return cut(self.controller.pipe, self.controller.arguments, timestep, self.evaluations, self._steps())

    def use_pipeline_scale(self, scale: float) -> None:
        """The pipeline's CFG scale from this denoiser call on (Wan 2.2's second stage has its own)."""
        if scale == self.pipeline_scale:
            return
        self.pipeline_scale = scale
        self._set_own_cfg(scale)

    def _follow_pipeline_scale(self, timestep: Any = None) -> None:
        """The pipeline's own CFG at the scale the pipeline holds now: a step-end callback may change it
        (``pipe._guidance_scale``, read by diffusers' pipelines at every step), and it must count here too."""
        if self.own_cfg is None or self.family.layout == "sequential":
            return
        held = vars(self.controller.pipe).get("_guidance_scale")
        if isinstance(held, Tensor) and held.numel() > 1:  # SVD: a weight per sample and frame, (B, F, 1, 1, 1)
            self.own_weights = held
            return
        current = self._dynamic_scale(timestep) or self._scale_now()
        if current is not None and current != self.methods[self.own_cfg].scale:
            self._set_own_cfg(current)

    def _dynamic_scale(self, timestep: Any) -> float | None:
        """The scale the pipeline combines this step's CFG with when it sets it only after the denoiser call
        (:attr:`.families.Family.dynamic_scale`), else None."""
        scale = self.family.dynamic_scale
        if scale is None:
            return None
        index = self.evaluations - 1  # this step's (counted when its record was made)
        return scale(self.controller.pipe, self.controller.arguments, timestep, index, self._steps())

    def _set_own_cfg(self, scale: float) -> None:
        """The pipeline's own CFG (composed with perturbations), if it runs one, at ``scale``."""
        if self.own_cfg is not None:
            methods = list(self.methods)
            methods[self.own_cfg] = CFG(float(scale))
            self.methods = tuple(methods)

    def _scale_now(self) -> float | None:
        """The CFG weight of the scale the pipeline holds now (``pipe._guidance_scale``), if it runs its CFG at it."""
        current = vars(self.controller.pipe).get("_guidance_scale")
        if not isinstance(current, int | float):
            return None
        return self.family.weight(current) if self.family.runs_cfg(current) else None

    def step_of(self, x: Tensor, t: Tensor, has_uncond: bool) -> Step:
        """The record of the denoiser evaluation of one step (the branch layout is read anew at every step: a
        step-end callback such as diffusers' SDCFGCutoffCallback may switch the pipeline's CFG off)."""
        n = x.shape[0]
        if has_uncond and self.family.layout == "text_image_uncond":
            if n % 3:
                raise RuntimeError(f"{self.family.name}: expected a guidance batch of three thirds, got {n} rows")
            return Step(x, t, slice(0, n // 3), self._fraction(), has_uncond)
        if has_uncond and self.family.layout != "sequential":
            if n % 2:
                raise RuntimeError(f"{self.family.name}: expected a CFG batch of even size, got {n}")
            cond_rows = slice(n // 2, n) if self.family.layout == "uncond_cond" else slice(0, n // 2)
        else:
            cond_rows = slice(0, n)
        return Step(x, t, cond_rows, self._fraction(), has_uncond)

    def _branches(self, call, inputs, step: Step) -> tuple[Any, Tensor, dict[int, Tensor]]:
        """Evaluate the denoiser on the call's rows and on every active perturbation's copy of the cond rows."""
        cond_rows = step.cond_rows
        n, b = step.x.shape[0], step.rows
        active = [i for i in self.perturbations if self.methods[i].active(step.fraction)]
        if not active:
            output = call(*inputs[0], **inputs[1])
            return output, _prediction(output), {}
        if self.controller.sequential:
            output = call(*inputs[0], **inputs[1])
            if any(inputs[1].get(name) is not None for name in self.family.padded_args):
                # the cond rows alone would be padded to another length than these arguments: the whole batch
                # again, perturbed on the cond rows
                calls = {i: self._perturbed_call(call, inputs, {i: cond_rows})[i][cond_rows] for i in active}
                return output, _prediction(output), calls
            cond_only = self._rebind(inputs, n, cond_rows, copies=0)
            perturbed = {i: self._perturbed_call(call, cond_only, {i: slice(None)})[i] for i in active}
            return output, _prediction(output), perturbed
        expanded = self._rebind(inputs, n, cond_rows, len(active))
        rows = {i: slice(n + j * b, n + (j + 1) * b) for j, i in enumerate(active)}
        output, everything = self._perturbed_call(call, expanded, rows, keep_output=True)
        return output, everything[:n], {i: everything[r] for i, r in rows.items()}

    def _correct(self, call, inputs, step: Step) -> tuple[Step, tuple[tuple, dict]]:
        """Langevin corrector steps on the noisy sample at this level, with the guided score (Song et al. 2021)."""
        corrector = self.controller.corrector
        x, t, cond_rows = step.x, step.t, step.cond_rows
        n, b = x.shape[0], step.rows
        t_cond = t[cond_rows] if t.numel() > 1 else t.expand(b)
        alpha, sigma = self.schedule.alpha_sigma(t_cond)
        if alpha.min() < 1e-4:  # pure noise (flow matching at sigma = 1): nothing to correct, and no VE scale
            return step, inputs
        a = P.broadcast(alpha, x[cond_rows])
        coef_a, coef_b = (P.broadcast(c, x[cond_rows]) for c in self.schedule.coefficients(alpha, sigma))
        # the corrector's evaluations must not advance the methods' per-run state (APG's momentum)
        saved = [m.save_state(st) for m, st in zip(self.methods, self.states)]

        def denoise(x_ve: Tensor, _sigma: Tensor) -> Tensor:  # guided x0 on the VE scale x0 + (sigma / alpha) eps
            x_in = (x_ve * a).to(x.dtype)
            at = dataclasses.replace(step, x=x_in.repeat(n // b, *[1] * (x.ndim - 1)))
            _, pred, perturbed = self._branches(call, self._with_sample(inputs, at.x), at)
            g = self._guided_rows(at, pred, perturbed)
            return coef_a * x_in.float() + coef_b * self.family.output_sign * g.float()  # HiDream: negated

        x_cond = x[cond_rows]
        x_ve, _ = langevin_correct(
            denoise,
            x_cond.float() / a,
            sigma / alpha,
            steps=corrector.steps,
            snr=corrector.snr,
            generator=self.corrector_generator,
        )
        self.states = [m.restore_state(st, old) for m, st, old in zip(self.methods, self.states, saved)]
        corrected = (x_ve * a).to(x.dtype)
        self.correction = (x_cond, corrected)
        x_all = corrected.repeat(n // b, *[1] * (x.ndim - 1))
        return dataclasses.replace(step, x=x_all), self._with_sample(inputs, x_all)

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

    def _sample(self, inputs: tuple[tuple, dict]) -> Any:
        """The denoiser call's sample (its first parameter)."""
        args, kwargs = inputs
        return args[0] if args else kwargs[self.controller.parameter_names[0]]

    def _perturbed_call(self, call, inputs, rows, keep_output=False):
        self.rows.update(rows)
        self.batch = len(self._sample(inputs))  # Z-Image: a list of samples
        try:
            output = call(*inputs[0], **inputs[1])
        finally:
            self.rows.update(dict.fromkeys(rows))
        pred = _prediction(output)
        return (output, pred) if keep_output else {i: pred for i in rows}

    def _rebind(self, inputs: tuple[tuple, dict], n: int, cond_rows: slice, copies: int) -> tuple[tuple, dict]:
        """The call's arguments along the batch of ``n`` rows: ``copies`` copies of the ``cond_rows`` appended to
        them, or (``copies=0``) the ``cond_rows`` alone. Names in ``family.unbatched`` are untouched; the
        per-sample lists of ``family.list_args`` are rebound as the tensors are; the names of ``family.batch_dims``
        along their own batch dimension."""
        args, kwargs = inputs
        names = self.controller.parameter_names
        skip, lists, dims = self.family.unbatched, self.family.list_args, dict(self.family.batch_dims)

        def rebind(name: str, value: Any) -> Any:
            if name in skip:
                return value
            if name in lists and isinstance(value, list | tuple) and len(value) == n:
                cond = list(value[cond_rows])
                return cond if copies == 0 else [*value, *cond * copies]
            fn = (lambda v: v[cond_rows]) if copies == 0 else (lambda v: torch.cat([v, *[v[cond_rows]] * copies]))
            if name in dims and isinstance(value, Tensor):
                if value.ndim <= dims[name] or value.shape[dims[name]] != n:
                    shape = tuple(value.shape)
                    raise RuntimeError(f"{name} {shape}: expected the batch of {n} on dim {dims[name]}")
                return fn(value.movedim(dims[name], 0)).movedim(0, dims[name])
            return _map_batched(value, fn, n, frames)

        frames = 1
        if self.family.frames_dim is not None:  # AnimateDiff: the prompt embeddings and ControlNet residuals per frame
            frames = self._sample(inputs).shape[self.family.frames_dim]
        return (
            tuple(rebind(names[i], v) for i, v in enumerate(args)),
            {k: rebind(k, v) for k, v in kwargs.items()},
        )

    def _fraction(self) -> float:
        """``i / n`` for the i-th of the ``n`` denoising steps this call runs."""
        fraction = min(self.evaluations / self._steps(), 1 - 1e-9)
        self.evaluations += 1
        return fraction

    def _steps(self) -> int:
        """The ``n`` denoising steps this call runs (read at its first evaluation)."""
        if self.total is None:
            self.total = steps_of_the_call(self.controller.pipe)
        return self.total

    # -- combining the branches ------------------------------------------------------------------------------
    def _combine(self, step: Step, pred: Tensor, perturbed: dict[int, Tensor]) -> Tensor:
        """The output the pipeline expects: its own CFG combination of it is the guided prediction."""
        x = step.x
        channels = x.shape[1]
        learned_sigma = x.ndim == 4 and pred.shape[1] == 2 * channels
        rest = pred[:, channels:] if learned_sigma else None
        if step.has_uncond and self.family.layout == "sequential":  # FLUX's conditional call: wait for the other
            perturbed = {i: p[:, :channels] if learned_sigma else p for i, p in perturbed.items()}
            self.pending = (step, pred[step.cond_rows], perturbed)
            eps = pred
        else:
            g = self._guided_rows(step, pred, perturbed)
            if step.has_uncond and self.solve_uncond:
                eps = self._solved_halves(step, pred[:, :channels] if learned_sigma else pred, g)
            else:
                eps = g.repeat(x.shape[0] // g.shape[0], *[1] * (g.ndim - 1))
        return eps if rest is None else torch.cat([eps, rest], dim=1)

    def _solved_halves(self, step: Step, pred: Tensor, guided: Tensor) -> Tensor:
        """The CFG batch's halves ``(u', c)``, in the family's order, with ``u' + s (c - u') = guided`` at the
        pipeline's scale ``s`` now (a step-end callback may change it)."""
        cond = pred[step.cond_rows]
        s = self._scale_now() or self.pipeline_scale
        if self.family.layout == "text_image_uncond":
            return self._solved_thirds(pred, guided, s)
        uncond = _solved_uncond(guided, cond, s).to(guided.dtype)
        halves = [uncond, cond] if self.family.layout == "uncond_cond" else [cond, uncond]
        return torch.cat(halves)

    def _solved_thirds(self, pred: Tensor, guided: Tensor, s: float) -> Tensor:
        """InstructPix2Pix's thirds ``(c, c_I, u)`` with the text branch true and one of the others solved so that the
        pipeline's ``u + s (c - c_I) + s_I (c_I - u)`` is ``guided``: ``u`` unless ``s_I`` is 1, else ``c_I``."""
        c, image, uncond = (part.float() for part in pred.split(guided.shape[0]))
        g, s_image = guided.float(), self.image_scale()
        if s_image != 1:
            uncond = (g - s * (c - image) - s_image * image) / (1 - s_image)
        else:
            image = (g - s * c) / (1 - s)
        return torch.cat([c, image, uncond]).to(guided.dtype)

    def _guided_rows(self, step: Step, pred: Tensor, perturbed: dict[int, Tensor]) -> Tensor:
        """The guided prediction for the cond rows of a batched call (learned-sigma channels dropped)."""
        x, t, cond_rows = step.x, step.t, step.cond_rows
        channels = x.shape[1]
        if x.ndim == 4 and pred.shape[1] == 2 * channels:
            pred = pred[:, :channels]
            perturbed = {i: p[:, :channels] for i, p in perturbed.items()}
        cond = pred[cond_rows]
        if not step.has_uncond:
            return self.guided(x, t, cond, None, perturbed, step.fraction)
        b = cond.shape[0]
        x_half, t_half = x[cond_rows], (t[cond_rows] if t.numel() > 1 else t)
        if self.family.layout == "text_image_uncond":  # InstructPix2Pix: the methods' uncond is the image branch
            image, uncond = pred[b : 2 * b], pred[2 * b :]
            g = self.guided(x_half, t_half, cond, image, perturbed, step.fraction)
            image_guidance = (self.image_scale() - 1) * (image.float() - uncond.float())
            return (g.float() + image_guidance).to(g.dtype)
        uncond_rows = slice(0, b) if cond_rows.start else slice(b, None)
        return self.guided(x_half, t_half, cond, pred[uncond_rows], perturbed, step.fraction)

    def image_scale(self) -> float:
        """The pipeline's image guidance scale ``s_I`` now (InstructPix2Pix's ``image_guidance_scale``; SD's pipeline
        holds it, a step-end callback may change it there)."""
        held = vars(self.controller.pipe).get("_image_guidance_scale")
        return float(held if isinstance(held, int | float) else self.controller.arguments[self.family.image_scale_arg])

    def _finish_sequential(self, x: Tensor, t: Tensor, uncond: Tensor) -> Tensor:
        step, cond, perturbed = self.pending
        self.pending = None
        # the same latents: the same tensor, or (Cosmos 2 video-to-world builds each call's input anew) equal values
        if step.x.shape != x.shape or (step.x.data_ptr() != x.data_ptr() and not torch.equal(step.x, x)):
            raise RuntimeError("the unconditional call did not follow the conditional one on the same latents")
        g = self.guided(x, t, cond, uncond, perturbed, step.fraction)
        return _solved_uncond(g, cond, self.pipeline_scale).to(uncond.dtype)

    def guided(self, x, t, cond, uncond, perturbed, fraction) -> Tensor:
        """``D_c + sum_m update_m`` in the methods' spaces, returned in model space and dtype. Where reference-image
        or condition latents share the denoiser's input with the generated ones (:attr:`generated`) the methods see
        the generated ones only (APG's norms and projections are per sample). The others get the methods over every
        token, from a fresh state (APG's momentum is the generated tokens'): the pipeline drops them, but diffusers'
        ``guidance_rescale`` reads their statistics (LTX-Video image-to-video), which then match the pipeline's own
        CFG."""
        if self.generated is None:
            return self._guided(x, t, cond, uncond, perturbed, fraction)
        dim, where = self.generated
        index = (slice(None),) * dim + (where,)
        if cond.ndim <= dim or x[index].shape[dim] != cond[index].shape[dim]:
            raise RuntimeError(f"the prediction {tuple(cond.shape)} does not cover the input {tuple(x.shape)}")
        if cond.shape[dim] == x.shape[dim]:
            states, self.states = self.states, [m.new_state(self.family.name) for m in self.methods]
            try:
                out = self._guided(x, t, cond, uncond, perturbed, fraction)
            finally:
                self.states = states
        else:  # the output is longer than the input (Qwen-Image 2.1's text tokens): the others keep the cond's
            out = cond.clone()
        heads = {i: p[index] for i, p in perturbed.items()}
        other = None if uncond is None else uncond[index]
        out[index] = self._guided(x[index], t, cond[index], other, heads, fraction)
        return out

    def _guided(self, x, t, cond, uncond, perturbed, fraction) -> Tensor:
        x = generated_channels(x, cond)
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
            if i == self.own_cfg and self.own_weights is not None:
                weights = self.own_weights.to(cond32.device, torch.float32)
                total += cfg_update(
                    cond32, other32, weights.reshape(*weights.shape, *[1] * (cond32.ndim - weights.ndim))
                )
                continue
            if method.space == "x0":
                if coefs is None:
                    a, b = self.schedule.coefficients(*self.schedule.alpha_sigma(t.expand(x.shape[0])))
                    coefs = P.broadcast(a, x32), P.broadcast(b, x32)
                a, b = coefs
                b = b * self.family.output_sign  # Z-Image's output is the negated velocity
                total += method.update(a * x32 + b * cond32, a * x32 + b * other32, state) / b
            else:
                total += method.update(cond32, other32, state)
        return total.to(cond.dtype)
