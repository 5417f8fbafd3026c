"""One generation request, shared by the app, its API and the CLI."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from PIL import Image

from guidance import APG, CFG, REGISTRY, guide
from guidance.pipeline import family_of

METHODS = ("none", *REGISTRY)  # what the UI and the CLI offer


@dataclasses.dataclass(frozen=True)
class Request:
    """What to generate. ``subject`` is a class name for class-conditional models, else a prompt."""

    subject: str
    method: str = "apg"
    scale: float = 4.0
    eta: float = 0.0
    norm_threshold: float | None = None  # None: the family default ("auto")
    momentum: float | None = None  # None: the paper's -0.5
    steps: int = 25
    seed: int = 0
    num_images: int = 4

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not 1 <= self.steps <= 200:
            raise ValueError(f"steps must be between 1 and 200, got {self.steps}")
        if not 1 <= self.num_images <= 16:
            raise ValueError(f"num_images must be between 1 and 16, got {self.num_images}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed}")
        self.guidance()  # validates the method's own arguments

    def guidance(self):
        if self.method == "cfg":
            return CFG(self.scale)
        if self.method == "apg":
            return APG(
                self.scale,
                eta=self.eta,
                norm_threshold="auto" if self.norm_threshold is None else self.norm_threshold,
                momentum="auto" if self.momentum is None else self.momentum,
            )
        return None


def class_names(pipe: Any) -> list[str] | None:
    """The class names of a class-conditional pipeline (DiT), else ``None``."""
    labels = getattr(pipe, "labels", None)
    return sorted(labels, key=labels.get) if labels else None


def generate(pipe: Any, request: Request) -> list[Image.Image]:
    """Run ``pipe`` for ``request`` with per-image seeds (same seed, same image, whatever the batch)."""
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
    method = request.guidance()
    scale_arg = family_of(pipe).scale_arg
    if method is None:
        call[scale_arg] = 1.0
        output = pipe(**call)
    else:
        with guide(pipe, method):
            output = pipe(**call)
    return output.images


def grid(images: list[Image.Image], columns: int | None = None, scale: int = 1) -> Image.Image:
    """Tile images (all the same size) into one contact sheet, optionally enlarged by ``scale`` (nearest)."""
    columns = columns or len(images)
    w, h = images[0].size
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        sheet.paste(image.convert("RGB"), ((i % columns) * w, (i // columns) * h))
    return sheet.resize((sheet.width * scale, sheet.height * scale), Image.NEAREST) if scale > 1 else sheet
