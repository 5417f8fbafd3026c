"""One builder per tab of the Gradio app: each adds its controls to the open ``gr.Blocks`` and wires its API."""

from .detect import detect_tab
from .generate import generate_tab
from .protect import protect_tab

__all__ = ["detect_tab", "generate_tab", "protect_tab"]
