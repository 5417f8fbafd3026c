"""What the tabs share: the device slot, the upload picker's filter, the examples and reading uploads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..files import Upload, open_upload

MAX_CONCURRENCY = 1  # one job at a time on the device: generate, protect and detect share one slot
MAX_FILES = 8  # images per /protect or /detect request
IMAGE_TYPES = [".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"]  # the picker's filter; content decides
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"  # one-click example images (scripts/make_examples.py)
DEVICE_SLOT = {"concurrency_limit": MAX_CONCURRENCY, "concurrency_id": "device"}  # every event's queue options


def examples_available() -> bool:
    """Whether the example images of the Protect and Detect tabs are there."""
    return all((EXAMPLES / f).is_file() for f in ("star-32.png", "checker-128.png", "clean-16.png", "pgd8-16.png"))


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


def read_uploads(files: Any, purpose: str) -> list[Upload]:
    """The decoded uploads of a ``gr.File`` value (1 to :data:`MAX_FILES`); every failure is a ``gr.Error``."""
    import gradio as gr

    try:
        paths = upload_paths(files)
    except ValueError as error:
        raise gr.Error(str(error)) from None
    if not paths:
        raise gr.Error("upload at least one image (PNG, JPEG, WebP, BMP or TIFF)")
    if len(paths) > MAX_FILES:
        raise gr.Error(f"at most {MAX_FILES} images per request, got {len(paths)}")
    loaded = []
    for path in paths:
        try:
            loaded.append(open_upload(path, purpose=purpose))
        except ValueError as error:
            raise gr.Error(str(error)) from None
    return loaded
