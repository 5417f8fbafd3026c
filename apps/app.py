"""The steerguard Gradio app: built by :func:`build_app`, nothing loaded at import.

Tabs grow with the library, one builder each in :mod:`apps.tabs`; named API endpoints serve programs
(``gradio_client.Client(url).predict(..., api_name="/generate")``):

* ``/generate``: guided generation (class or prompt, guidance options; then, optional, the sampler and the
  model, one of :func:`generation_models`) -> image grid, caption;
* ``/protect``: image files, method, eps (in 1/255), steps, seed -> comparison gallery, metrics table,
  protected PNG files, summary;
* ``/detect``: image files -> JSON verdicts (score, threshold, verdict per image), score plot, note.

Uploads are decoded only by :func:`apps.files.open_upload` (content sniffing, size and pixel caps before
decoding); a bad upload answers with a ``gr.Error`` message and the server keeps serving.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .files import MAX_BYTES
from .models import DEFAULT_MODEL, listed_models
from .tabs import detect_tab, generate_tab, protect_tab
from .tabs.common import MAX_CONCURRENCY
from .tabs.generate import generation_models


def launch_options() -> dict[str, Any]:
    """``launch()`` options the app is meant to run with (the upload size cap, enforced by Gradio too)."""
    return {"max_file_size": MAX_BYTES}


def build_app(model: str = DEFAULT_MODEL, device: str | None = None, detector: str | Path | None = None):
    """A ``gr.Blocks`` app generating with ``model`` (the embedded demo DiT by default).

    ``detector`` is the folder of a saved EPS-AD detector for the Detect tab (default
    ``demo_models/eps_detector``; without one, ``/detect`` answers "no detector available").
    """
    import gradio as gr

    with gr.Blocks(title="steerguard") as app:
        gr.Markdown(f"# steerguard\nGuidance for diffusers pipelines. Model: `{model}`.")
        generate_tab(model, device)
        protect_tab(device)
        detect_tab(device, detector)
        gr.Markdown("Models listed in `models.txt`: " + ", ".join(f"`{n}`" for n, _ in listed_models()))
    app.queue(default_concurrency_limit=MAX_CONCURRENCY, max_size=64)
    return app


__all__ = ["build_app", "generation_models", "launch_options"]
