"""One generation request, shared by the app, its API and the CLI; its choices come from :mod:`guidance.registry`.

The options of a request are the inputs of the registry's entries, named by kind: a guidance method's inputs
as they are (``scale``, ``eta``...), a perturbation's with ``perturbation_`` in front (``perturbation_scale``), a
sampler's with ``sampler_`` (``sampler_snr``). The CLI and the app build their controls from :func:`options`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from PIL import Image, ImageDraw, ImageFont

from guidance import LangevinCorrector, guide, registry
from guidance.pipeline import family_of
from guidance.registry import SOFTPAG_STRENGTH, Entry, Input
from protect import Cancelled, Step

PREFIX = {"guidance": "", "perturbation": "perturbation_", "scheduler": "sampler_", "score_sampler": "sampler_"}
SAMPLER_KINDS = ("scheduler", "score_sampler")

__all__ = [
    "SOFTPAG_STRENGTH",
    "Option",
    "Request",
    "check_generates_from_text",
    "class_names",
    "generate",
    "grid",
    "methods",
    "options",
    "perturbations",
    "samplers",
    "samplers_for",
    "scheduler_for",
    "showcase",
    "softpag_heads",
    "using_sampler",
]


def methods() -> tuple[str, ...]:
    """CFG-type guidance the UI and the CLI offer: "none" and the registry's guidance entries."""
    return ("none", *registry.names("guidance"))


def perturbations() -> tuple[str, ...]:
    """Weak-model guidance, combinable with the above: "none" and the registry's perturbation entries."""
    return ("none", *registry.names("perturbation"))


def samplers() -> tuple[str, ...]:
    """ "default" (the pipeline's own scheduler), the registry's schedulers, then its score samplers."""
    return ("default", *(name for kind in SAMPLER_KINDS for name in registry.names(kind)))


def sampler_entry(name: str) -> Entry | None:
    """The registry entry of sampler ``name`` (``None`` for "default")."""
    if name == "default":
        return None
    for kind in SAMPLER_KINDS:
        if name in registry.names(kind):
            return registry.get(kind, name)
    raise ValueError(f"sampler must be one of {samplers()}, got {name!r}")


class Option(NamedTuple):
    """A registry input as a request option: its description, the entries that take it, its kind's prefix."""

    spec: Input
    users: tuple[str, ...]
    prefix: str


def options() -> dict[str, Option]:
    """Every registry input by its option name (``perturbation_scale``...): the CLI's flags, the app's controls."""
    out: dict[str, Option] = {}
    for kind, prefix in PREFIX.items():
        for entry in registry.entries(kind):
            for spec in entry.inputs:
                known = out.get(prefix + spec.name, Option(spec, (), prefix))
                out[prefix + spec.name] = known._replace(users=(*known.users, entry.name))
    return out


@dataclasses.dataclass(frozen=True)
class Request:
    """What to generate. ``subject`` is a class name for class-conditional models, else a prompt."""

    subject: str
    method: str = "apg"
    scale: float = 4.0
    eta: float = 0.0
    norm_threshold: float | str | None = None  # None: the family default ("auto"); "off": no threshold; else r > 0
    momentum: float | None = None  # None: the paper's -0.5
    steps: int = 25
    seed: int = 0
    num_images: int = 4
    perturbation: str = "none"
    perturbation_scale: float = 2.0
    corrector_steps: int = 0
    sampler: str = "default"
    extra: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.method not in methods():
            raise ValueError(f"method must be one of {methods()}, got {self.method!r}")
        if not 1 <= self.steps <= 200:
            raise ValueError(f"steps must be between 1 and 200, got {self.steps}")
        if not 1 <= self.num_images <= 16:
            raise ValueError(f"num_images must be between 1 and 16, got {self.num_images}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed}")
        if self.perturbation not in perturbations():
            raise ValueError(f"perturbation must be one of {perturbations()}, got {self.perturbation!r}")
        if not 0 <= self.corrector_steps <= 10:
            raise ValueError(f"corrector_steps must be between 0 and 10, got {self.corrector_steps}")
        if isinstance(self.norm_threshold, str) and self.norm_threshold != "off":
            raise ValueError(
                f"norm_threshold must be a number > 0, None (default) or 'off', got {self.norm_threshold!r}"
            )
        known = options()
        for name, _ in self.extra:
            if name not in known or name in {f.name for f in dataclasses.fields(self)}:
                raise ValueError(f"unknown option {name!r}; the registry's options: {', '.join(known)}")
        sampler = sampler_entry(self.sampler)
        if sampler is not None:
            sampler.values(self._given(sampler))  # the sampler's own inputs
        self._methods(None)  # validates the methods' own arguments (SoftPAG's heads depend on the model)

    def option(self, name: str) -> Any:
        """The value of option ``name``: the field of that name, else the ``extra`` value (``None``: default)."""
        if name in {f.name for f in dataclasses.fields(self)}:
            return getattr(self, name)
        return dict(self.extra).get(name)

    def evaluations(self) -> int:
        """Denoiser evaluations per image, what the cost estimate counts: a score sampler's levels (``steps``)
        times its steps per level (annealed Langevin, plus the final denoising) or times 1 + its corrector steps
        (predictor-corrector); otherwise the steps times 1 + the Langevin corrector's steps."""
        entry = sampler_entry(self.sampler)
        if entry is not None and entry.kind == "score_sampler":
            values = entry.values(self._given(entry))
            if "steps_per_level" in values:
                return self.steps * values["steps_per_level"] + 1
            return self.steps * (1 + values["corrector_steps"])
        return self.steps * (1 + self.corrector_steps)

    def branches(self) -> int:
        """Denoiser batches per evaluation: the conditional one, plus CFG's and a perturbation's."""
        return 1 + (self.method != "none") + (self.perturbation != "none")

    def _given(self, entry: Entry) -> dict[str, Any]:
        return {spec.name: self.option(PREFIX[entry.kind] + spec.name) for spec in entry.inputs}

    def guidance(self, pipe: Any = None) -> tuple:
        """The guidance methods (and corrector) of this request, for ``guide()``.

        SoftPAG's heads depend on the model: ``pipe`` is required when ``perturbation == "softpag"``.
        """
        if self.perturbation == "softpag" and pipe is None:
            raise ValueError("SoftPAG needs the pipeline to choose its heads: call guidance(pipe)")
        return self._methods(pipe)

    def _methods(self, pipe: Any) -> tuple:
        chosen: list = []
        for kind, name in (("guidance", self.method), ("perturbation", self.perturbation)):
            if name != "none":
                entry = registry.get(kind, name)
                chosen.append(entry(self._given(entry), pipe))
        if self.corrector_steps:
            chosen.append(LangevinCorrector(steps=self.corrector_steps, seed=self.seed))
        return tuple(chosen)

    def describe(self) -> str:
        """A label naming the method, its scale and every option that is not the default."""
        parts = [f"{self.method} {self.scale:g}" if self.method != "none" else "no CFG"]
        if self.method == "apg":
            options = [f"eta {self.eta:g}"] if self.eta else []
            if self.norm_threshold == "off":
                options.append("no threshold")
            elif self.norm_threshold is not None:
                options.append(f"r {self.norm_threshold:g}")
            if self.momentum is not None and self.momentum != -0.5:
                options.append(f"beta {self.momentum:g}")
            parts[0] += f" ({', '.join(options)})" if options else ""
        if self.perturbation != "none":
            parts.append(f"{self.perturbation} {self.perturbation_scale:g}")
        if self.corrector_steps:
            parts.append(f"{self.corrector_steps} corrector step(s)")
        text = " + ".join(parts)
        return text if self.sampler == "default" else f"{text} ({self.sampler})"


def showcase(request: Request) -> list[Request]:
    """``request`` after the same request with no CFG, with CFG and with default APG: distinct rows (a method
    already compared is not repeated), options that a method does not use reset to their defaults."""
    rows: list[Request] = []
    for method in (*methods(), None):
        row = request if method is None else dataclasses.replace(request, method=method)
        if row.method != "apg" or method is not None:
            row = dataclasses.replace(row, eta=0.0, norm_threshold=None, momentum=None)
        elif row.momentum == -0.5:  # the default, spelled out
            row = dataclasses.replace(row, momentum=None)
        if row not in rows:
            rows.append(row)
    return rows


def softpag_heads(pipe: Any) -> tuple[tuple[str, int], ...]:
    """All heads of the denoiser's default self-attention layer(s), the layers PAG perturbs by default."""
    return registry.softpag_heads(pipe)


#: call arguments that are input images: a pipeline that takes one makes images from an image, not from a prompt
IMAGE_INPUTS = ("image", "mask_image", "control_image")
#: pipelines whose ``image`` is optional (without one they generate from the prompt alone)
OPTIONAL_IMAGE = ("FluxKontextPipeline",)


def is_unconditional(pipe: Any) -> bool:
    """Whether ``pipe`` is an unconditional UNet pipeline (``DDPMPipeline``-like: a ``UNet2DModel``, no prompt, no
    classes)."""
    from diffusers import UNet2DModel

    try:
        family_of(pipe)
    except TypeError:
        return isinstance(getattr(pipe, "unet", None), UNet2DModel) and class_names(pipe) is None
    return False


def check_generates_from_text(pipe: Any) -> None:
    """``ValueError`` unless ``guide()`` serves ``pipe`` and it makes images from a prompt or a class alone (what
    Generate and ``steerguard generate`` ask of it)."""
    name = type(pipe).__name__
    try:
        family_of(pipe)
    except TypeError as error:
        raise ValueError(str(error)) from None
    parameters = inspect.signature(type(pipe).__call__).parameters
    if "num_frames" in parameters:
        raise ValueError(
            f"{name} makes videos; Generate and `steerguard generate` make images: call this pipeline from Python "
            "inside guide()"
        )
    needed = [p for p in IMAGE_INPUTS if p in parameters and not (p == "image" and name in OPTIONAL_IMAGE)]
    if needed:
        raise ValueError(
            f"{name} makes images from an input image ({', '.join(needed)}); Generate and `steerguard generate` "
            "make them from a prompt or a class: load a text-to-image model, or call this pipeline from Python "
            "inside guide()"
        )


def scheduler_for(pipe: Any, sampler: str) -> Any:
    """A new scheduler of ``sampler`` from ``pipe``'s scheduler config (``None`` for "default" and the score
    samplers); ``ValueError`` when the sampler cannot serve this pipeline."""
    entry = sampler_entry(sampler)
    if entry is None:
        return None
    try:
        built = entry({}, pipe)
    except ValueError as error:
        raise ValueError(f"{sampler}: {error}") from None
    return None if entry.kind == "score_sampler" else built


def samplers_for(pipe: Any) -> list[str]:
    """The names of :func:`samplers` that can serve ``pipe``."""
    usable = []
    for name in samplers():
        try:
            scheduler_for(pipe, name)
        except ValueError:
            continue
        usable.append(name)
    return usable


@contextlib.contextmanager
def using_sampler(pipe: Any, sampler: str) -> Iterator[None]:
    """``pipe`` with the scheduler of ``sampler`` for the block; its own scheduler is restored afterwards."""
    scheduler = scheduler_for(pipe, sampler)
    if scheduler is None:
        yield
        return
    original = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield
    finally:
        pipe.scheduler = original


def class_names(pipe: Any) -> list[str] | None:
    """The class names of a class-conditional pipeline (DiT), else ``None``."""
    labels = getattr(pipe, "labels", None)
    return sorted(labels, key=labels.get) if labels else None


def generate(pipe: Any, request: Request, on_step: Callable[[Step], bool | None] | None = None) -> list[Image.Image]:
    """Run ``pipe`` for ``request`` with per-image seeds (same seed, same image, whatever the batch).

    ``on_step(Step)`` is called before every denoising step (one call of the pipeline's denoiser; the guidance
    branches and corrector steps run inside it); returning ``False`` or raising :class:`~protect.pgd.Cancelled`
    stops the generation there. It changes ``pipe`` for the call (scheduler, hooks): serve concurrent callers
    through :func:`apps.services.generate_images`, which holds the device lock.
    """
    device = pipe.device
    generators = [torch.Generator(device).manual_seed(request.seed + i) for i in range(request.num_images)]
    entry = sampler_entry(request.sampler)
    if (entry is not None and entry.kind == "score_sampler") or is_unconditional(pipe):
        with _reporting(pipe, request, on_step):
            return _unconditional(pipe, request, entry, generators)
    check_generates_from_text(pipe)
    names = class_names(pipe)
    call: dict[str, Any] = {"num_inference_steps": request.steps, "generator": generators}
    if names is not None:
        if request.subject not in names:
            raise ValueError(f"unknown class {request.subject!r}; this model knows {', '.join(names)}")
        call["class_labels"] = pipe.get_label_ids([request.subject] * request.num_images)
    else:
        if not request.subject.strip():
            raise ValueError("the prompt is empty")
        call["prompt"] = [request.subject] * request.num_images
    methods = request.guidance(pipe)
    family = family_of(pipe)
    if family.scale_arg in inspect.signature(type(pipe).__call__).parameters:
        call[family.scale_arg] = family.argument(1.0)  # CFG only when a method asks for it
    with using_sampler(pipe, request.sampler), _reporting(pipe, request, on_step):
        if not methods:
            return pipe(**call).images
        with guide(pipe, *methods):
            return pipe(**call).images


def _unconditional(pipe: Any, request: Request, entry: Entry | None, generators: list) -> list[Image.Image]:
    """An unconditional UNet pipeline, by its scheduler (``steps`` steps) or a score sampler (``steps`` levels)."""
    from guidance.score_pipeline import ScoreSamplingPipeline

    if not is_unconditional(pipe):
        raise ValueError(f"{request.sampler}: score samplers serve unconditional UNet pipelines (e.g. demo/unet) only")
    if request.method != "none" or request.perturbation != "none" or request.corrector_steps:
        raise ValueError(
            "this model is unconditional: no guidance applies; use method 'none', no perturbation, no corrector"
        )
    if entry is None or entry.kind == "scheduler":
        with using_sampler(pipe, request.sampler):
            call = {"batch_size": request.num_images, "num_inference_steps": request.steps, "generator": generators}
            return pipe(**call).images
    score = ScoreSamplingPipeline(pipe.unet, pipe.scheduler)
    sampler = entry(request._given(entry), pipe)
    if sampler["sampler"] == "annealed_langevin" and "epsilon" not in sampler:
        # a step that lets the chain mix at the last level, alpha_L = eps = sigma_L^2 (benchmarks/RESULTS.md)
        sampler["epsilon"] = float(score.sigmas(request.steps)[-1] ** 2)
    return score(request.num_images, num_levels=request.steps, generator=generators, **sampler)


@contextlib.contextmanager
def _reporting(pipe: Any, request: Request, on_step: Callable[[Step], bool | None] | None) -> Iterator[None]:
    """``on_step`` before every call of ``pipe``'s denoiser while the block runs."""
    if on_step is None:
        yield
        return
    entry = sampler_entry(request.sampler)  # a score sampler calls the UNet once per evaluation, not per step
    total = request.evaluations() if entry is not None and entry.kind == "score_sampler" else request.steps
    done, start = [0], time.perf_counter()

    def before(module: torch.nn.Module, args: tuple) -> None:
        step = Step(min(done[0], total), total, None, time.perf_counter() - start)
        if on_step(step) is False:
            raise Cancelled(f"stopped after {step.step} of {total} denoising steps")
        done[0] += 1

    denoiser = pipe.unet if is_unconditional(pipe) else getattr(pipe, family_of(pipe).denoiser)
    handle = denoiser.register_forward_pre_hook(before)
    try:
        yield
    finally:
        handle.remove()


LABEL_HEIGHT = 18  # pixels of the band above each labelled row


def grid(
    images: list[Image.Image], columns: int | None = None, scale: int = 1, labels: list[str] | None = None
) -> Image.Image:
    """Tile images (all the same size) into one contact sheet, optionally enlarged by ``scale`` (nearest), with
    ``labels[r]`` written in a band above row ``r``."""
    columns = columns or len(images)
    w, h = images[0].size
    rows = math.ceil(len(images) / columns)
    if labels is not None and len(labels) != rows:
        raise ValueError(f"got {len(labels)} labels for {rows} rows")
    sheet = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        sheet.paste(image.convert("RGB"), ((i % columns) * w, (i // columns) * h))
    sheet = sheet.resize((sheet.width * scale, sheet.height * scale), Image.NEAREST) if scale > 1 else sheet
    if labels is None:
        return sheet
    band, row_height = LABEL_HEIGHT, h * max(scale, 1)
    labelled = Image.new("RGB", (sheet.width, sheet.height + rows * band), "white")
    draw, font = ImageDraw.Draw(labelled), ImageFont.load_default(size=band - 4)
    for r, label in enumerate(labels):
        top = r * (row_height + band)
        draw.text((4, top + 1), f"row {r + 1}: {label}", fill="black", font=font)
        labelled.paste(sheet.crop((0, r * row_height, sheet.width, (r + 1) * row_height)), (0, top + band))
    return labelled
