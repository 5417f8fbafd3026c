"""What the tabs share: the queue lanes, the upload picker's filter, the examples and reading uploads within a
request's limits."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..files import Upload, open_upload, peek
from ..jobs import Limits

MAX_CONCURRENCY = 1  # the default of an event without a lane
# the picker's filter (Gradio also refuses other names server-side), every usual name of the formats read; the
# content decides (apps.files)
IMAGE_TYPES = [".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".tif", ".tiff"]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"  # one-click example images (scripts/make_examples.py)
# one queue lane per kind of work, so that a long protection or generation never delays /detect
LANES = {
    "generate": {"concurrency_id": "generate", "concurrency_limit": 1},
    "protect": {"concurrency_id": "protect", "concurrency_limit": 1},
    "detect": {"concurrency_id": "detect", "concurrency_limit": 2},
}


EXAMPLE_FILES = ("star-32.png", "checker-128.png", "photo-64.png", "photo-pgd8-64.png")  # of the two tabs


def examples_available() -> bool:
    """Whether the example images of the Protect and Detect tabs are there."""
    return all((EXAMPLES / f).is_file() for f in EXAMPLE_FILES)


def upload_paths(files: Any) -> list[str]:
    """The temp-file paths Gradio handed over for a ``gr.File`` value (one path, a list, or file dicts)."""
    if files is None:
        return []
    items = files if isinstance(files, list | tuple) else [files]
    paths = []
    for item in items:
        path = item.get("path") if isinstance(item, dict) else getattr(item, "name", item)
        if not isinstance(path, str | Path) or not str(path):
            raise ValueError("unexpected upload value; send image files")
        paths.append(str(path))
    return paths


def upload_sizes(files: Any, limits: Limits) -> list[tuple[str, tuple[int, int]]]:
    """The paths and (width, height) of a ``gr.File`` value's images, from their headers alone (nothing decoded),
    within ``limits`` (1 to ``max_files`` images, ``max_pixels`` in all); every failure is a ``gr.Error``."""
    import gradio as gr

    try:
        paths = upload_paths(files)
    except ValueError as error:
        raise gr.Error(str(error)) from None
    if not paths:
        raise gr.Error("upload at least one image (PNG, JPEG, WebP, BMP or TIFF)")
    if len(paths) > limits.max_files:
        raise gr.Error(f"at most {limits.max_files} images per request, got {len(paths)}")
    sizes = []
    for path in paths:
        try:
            sizes.append((path, peek(path)[2]))
        except ValueError as error:
            raise gr.Error(str(error)) from None
    total = sum(w * h for _, (w, h) in sizes)
    if total > limits.max_pixels:
        listed = ", ".join(f"{w}x{h}" for _, (w, h) in sizes)
        raise gr.Error(
            f"the images hold {total:,} pixels in all ({listed}, width x height), more than this server's limit of "
            f"{limits.max_pixels:,} per request; send fewer or smaller images"
        )
    return sizes


def decode_uploads(sizes: list[tuple[str, tuple[int, int]]], purpose: str) -> list[Upload]:
    """The uploads that :func:`upload_sizes` checked, decoded for ``purpose``; every failure is a ``gr.Error``."""
    import gradio as gr

    loaded = []
    for path, _ in sizes:
        try:
            loaded.append(open_upload(path, purpose=purpose))
        except ValueError as error:
            raise gr.Error(str(error)) from None
    return loaded


def read_uploads(files: Any, purpose: str, limits: Limits | None = None) -> list[Upload]:
    """The decoded uploads of a ``gr.File`` value, checked by :func:`upload_sizes` before any decoding."""
    return decode_uploads(upload_sizes(files, limits or Limits()), purpose)


@contextlib.contextmanager
def memory_errors(what: str) -> Iterator[None]:
    """Running out of (GPU) memory during ``what`` as a ``gr.Error`` that says so, the cache emptied for the next
    request, instead of a bare "Error" in the page."""
    import gradio as gr
    import torch

    try:
        yield
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise gr.Error(
            f"{what} ran out of memory on this server (other work may hold it); try again, or send fewer or "
            "smaller images"
        ) from None
