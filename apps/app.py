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

Every request is bounded (:class:`apps.jobs.Limits`, the ``steerguard app`` flags): its images and pixels
are counted from the headers, its time estimated from unit costs measured at start-up (:mod:`apps.cost`) and
refused above the budget before any work; while it runs it reports each step with the time left and stops at
the next step on Stop, on its client's disconnection or at the time limit. Generate, Protect and Detect have
separate queue lanes. Outputs and Gradio's cached copies are deleted after ``output_age``; every answer carries
security headers and an upload request holds at most ``max_files`` files (:mod:`apps.web`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import services
from .cost import Costs
from .device import best_device
from .disk import OutputFolders
from .files import MAX_BYTES
from .jobs import Limits
from .models import DEFAULT_MODEL, listed_models
from .tabs import detect_tab, generate_tab, protect_tab
from .tabs.common import MAX_CONCURRENCY
from .tabs.generate import generation_models
from .web import checked_blocks, middleware


def launch_options(limits: Limits | None = None, mcp: bool = False) -> dict[str, Any]:
    """``launch()`` options the app is meant to run with: the upload size cap (enforced by Gradio too), the
    security headers and the upload file-count limit (:mod:`apps.web`), and with ``mcp`` the API served as an
    MCP server at ``/gradio_api/mcp/`` (tools described by the endpoints' docstrings)."""
    limits = limits or Limits()
    return {
        "max_file_size": MAX_BYTES,
        "app_kwargs": {"middleware": middleware(limits.max_files)},
        "mcp_server": mcp,
    }


def build_app(
    model: str = DEFAULT_MODEL,
    device: str | None = None,
    detector: str | Path | None = None,
    limits: Limits | None = None,
    detect_dtype: str = "auto",
):
    """A ``gr.Blocks`` app generating with ``model`` (the embedded demo DiT by default), serving requests within
    ``limits`` (default :class:`apps.jobs.Limits`).

    ``detector`` is the folder of a saved native-resolution EPS-AD detector for the Detect tab (default
    ``demo_models/photo_detector``; without one, ``/detect`` answers "no detector available"), its score model in
    ``detect_dtype`` (:func:`apps.device.score_dtype`). Building measures
    the unit costs of the work on ``device`` (about a second).
    """
    import gradio as gr

    limits = limits or Limits()
    device = device or str(best_device()[0])
    services.set_max_pipelines(limits.max_pipelines)
    costs = services.calibrate(Costs(device), device)
    folders = OutputFolders(limits.output_age)
    folders.start()
    age = int(limits.output_age)
    with checked_blocks(limits.max_files, title="steerguard", delete_cache=(max(1, age // 2), age)) as app:
        gr.Markdown(f"# steerguard\nGuidance for diffusers pipelines. Model: `{model}`.")
        generate_tab(model, device, limits, costs)
        protect_tab(device, limits, costs, folders)
        detect_tab(device, detector, limits, detect_dtype)
        gr.Markdown("Models listed in `models.txt`: " + ", ".join(f"`{n}`" for n, _ in listed_models()))
    app.queue(default_concurrency_limit=MAX_CONCURRENCY, max_size=64)
    app.output_folders = folders
    return app


__all__ = ["Limits", "build_app", "generation_models", "launch_options"]
