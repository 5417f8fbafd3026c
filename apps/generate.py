"""One generation request, shared by the app, its API and the CLI."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from guidance import APG, CFG, PAG, TPG, LangevinCorrector, SoftPAG, guide
from guidance.layers import default_layers, select, self_attention_layers
from guidance.pipeline import family_of
from guidance.prediction import is_flow_schedule
from protect import Cancelled, Step

METHODS = ("none", "cfg", "apg")  # CFG-type guidance the UI and the CLI offer
# weak-model guidance, combinable with the above; SoftPAG acts on all heads of PAG's default layer at strength
# SOFTPAG_STRENGTH (a half-strength PAG; HeadHunter-searched heads did not help the demo DiT, see RESULTS.md)
PERTURBATIONS = {"none": None, "pag": PAG, "softpag": SoftPAG, "tpg": TPG}
SOFTPAG_STRENGTH = 0.5
# sampler name -> diffusers scheduler class swapped in for the call ("default": the pipeline's own scheduler)
SAMPLERS = {
    "default": None,
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}


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

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not 1 <= self.steps <= 200:
            raise ValueError(f"steps must be between 1 and 200, got {self.steps}")
        if not 1 <= self.num_images <= 16:
            raise ValueError(f"num_images must be between 1 and 16, got {self.num_images}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed}")
        if self.perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation must be one of {tuple(PERTURBATIONS)}, got {self.perturbation!r}")
        if not 0 <= self.corrector_steps <= 10:
            raise ValueError(f"corrector_steps must be between 0 and 10, got {self.corrector_steps}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {tuple(SAMPLERS)}, got {self.sampler!r}")
        if isinstance(self.norm_threshold, str) and self.norm_threshold != "off":
            raise ValueError(
                f"norm_threshold must be a number > 0, None (default) or 'off', got {self.norm_threshold!r}"
            )
        self._methods(heads=((0, 0),))  # validates the methods' own arguments (heads depend on the model)

    def guidance(self, pipe: Any = None) -> tuple:
        """The guidance methods (and corrector) of this request, for ``guide()``.

        SoftPAG's heads depend on the model: ``pipe`` is required when ``perturbation == "softpag"``.
        """
        if self.perturbation == "softpag" and pipe is None:
            raise ValueError("SoftPAG needs the pipeline to choose its heads: call guidance(pipe)")
        return self._methods(softpag_heads(pipe) if self.perturbation == "softpag" else ())

    def _methods(self, heads: tuple) -> tuple:
        methods: list = []
        if self.method == "cfg":
            methods.append(CFG(self.scale))
        elif self.method == "apg":
            methods.append(
                APG(
                    self.scale,
                    eta=self.eta,
                    norm_threshold={None: "auto", "off": None}.get(self.norm_threshold, self.norm_threshold),
                    momentum="auto" if self.momentum is None else self.momentum,
                )
            )
        if self.perturbation == "softpag":
            methods.append(SoftPAG(self.perturbation_scale, heads=heads, strength=SOFTPAG_STRENGTH))
        elif PERTURBATIONS[self.perturbation] is not None:
            methods.append(PERTURBATIONS[self.perturbation](self.perturbation_scale))
        if self.corrector_steps:
            methods.append(LangevinCorrector(steps=self.corrector_steps, seed=self.seed))
        return tuple(methods)

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
    for method in (*METHODS, None):
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
    denoiser = getattr(pipe, family_of(pipe).denoiser)
    attention = self_attention_layers(denoiser)
    chosen = select(attention, default_layers(attention), "self-attention layer")
    return tuple((name, head) for name, module in chosen.items() for head in range(module.heads))


def scheduler_for(pipe: Any, sampler: str) -> Any:
    """A new scheduler of ``sampler`` from ``pipe``'s scheduler config (``None`` for "default"); ``ValueError`` when
    the sampler cannot serve this pipeline."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {tuple(SAMPLERS)}, got {sampler!r}")
    if SAMPLERS[sampler] is None:
        return None
    import diffusers

    config = pipe.scheduler.config
    if is_flow_schedule(type(pipe.scheduler).__name__, config):
        raise ValueError(f"{sampler}: this model samples with flow matching; only the default sampler serves it")
    scheduler = getattr(diffusers, SAMPLERS[sampler]).from_config(config)
    if family_of(pipe).name == "dit" and float(scheduler.init_noise_sigma) != 1.0:
        raise ValueError(f"{sampler}: DiTPipeline does not scale its noise for sigma-parameterised samplers")
    return scheduler


def samplers_for(pipe: Any) -> list[str]:
    """The names in :data:`SAMPLERS` that can serve ``pipe``."""
    usable = []
    for name in SAMPLERS:
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
    call[family_of(pipe).scale_arg] = 1.0  # CFG only when a method asks for it
    with using_sampler(pipe, request.sampler), _reporting(pipe, request, on_step):
        if not methods:
            return pipe(**call).images
        with guide(pipe, *methods):
            return pipe(**call).images


@contextlib.contextmanager
def _reporting(pipe: Any, request: Request, on_step: Callable[[Step], bool | None] | None) -> Iterator[None]:
    """``on_step`` before every call of ``pipe``'s denoiser while the block runs."""
    if on_step is None:
        yield
        return
    total, done, start = request.steps, [0], time.perf_counter()

    def before(module: torch.nn.Module, args: tuple) -> None:
        step = Step(min(done[0], total), total, None, time.perf_counter() - start)
        if on_step(step) is False:
            raise Cancelled(f"stopped after {step.step} of {total} denoising steps")
        done[0] += 1

    handle = getattr(pipe, family_of(pipe).denoiser).register_forward_pre_hook(before)
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
