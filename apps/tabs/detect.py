"""The Detect tab: image files -> JSON verdicts (score, threshold, verdict per image), score plot, note."""

from __future__ import annotations

from pathlib import Path

from ..jobs import Limits
from ..services import detect_images, load_detector
from .common import EXAMPLES, IMAGE_TYPES, LANES, examples_available, read_uploads


def detect_tab(device: str | None = None, detector: str | Path | None = None, limits: Limits | None = None) -> None:
    """The Detect tab (``/detect``) of the open ``gr.Blocks``, scoring with the detector saved in ``detector``
    (default ``demo_models/eps_detector``; without one, ``/detect`` answers "no detector available"), in its own
    queue lane (it answers while a protection or a generation runs)."""
    import gradio as gr
    import pandas as pd

    limits = limits or Limits()

    def detect(files):
        """Flag adversarial (protected) images with the EPS-AD detector (Expected Perturbation Score and a
        deep-kernel MMD); returns JSON verdicts (score, threshold, verdict per image), a score plot and a note.

        Args:
            files: image files (PNG, JPEG, WebP, BMP or TIFF); they are resized to the detector's resolution.
        """
        loaded = read_uploads(files, "detect", limits)
        try:
            model = load_detector(detector, device)
        except (FileNotFoundError, ValueError, OSError) as error:
            raise gr.Error(str(error)) from None
        try:
            results = detect_images(model, [u.image for u in loaded])
        except ValueError as error:
            raise gr.Error(str(error)) from None
        width, height = results[0]["resized_to"]
        note = (
            f"Images are resized to the detector's resolution ({width}x{height}) before scoring; "
            "a perturbation made at another size does not survive resizing intact."
        )
        images = [
            {"file": u.name, "original_size": list(u.size), **{k: r[k] for k in ("score", "threshold", "verdict")}}
            for u, r in zip(loaded, results)
        ]
        verdicts = {"threshold": model.threshold, "resolution": [width, height], "note": note, "images": images}
        bars = [{"name": r["file"], "score": r["score"], "kind": f"upload: {r['verdict']}"} for r in images]
        bars.append({"name": "threshold", "score": model.threshold, "kind": "threshold"})
        clean = getattr(model, "clean_scores", None)
        if clean:
            s = sorted(clean)
            for label, q in (("clean median", 0.5), ("clean 95%", 0.95), ("clean max", 1.0)):
                bars.append({"name": label, "score": s[min(len(s) - 1, int(q * (len(s) - 1)))], "kind": "clean"})
        return verdicts, pd.DataFrame(bars), note

    with gr.Tab("Detect"):
        gr.Markdown(
            "Score images with the EPS-AD detector (Expected Perturbation Score + deep-kernel MMD): "
            "a score above the calibrated threshold flags an adversarial (protected) image. The first example "
            "is a clean shape and its PGD 8/255 version at the detector's own 16 px resolution. The demo "
            "detector's measured rates, false positives on benign changes (JPEG, resizing) included, are in "
            "its model card (demo_models/eps_detector)."
        )
        with gr.Row():
            with gr.Column():
                detect_files = gr.File(
                    file_count="multiple",
                    file_types=IMAGE_TYPES,
                    type="filepath",
                    label="images",
                    elem_id="detect-files",
                )
                detect_button = gr.Button("Detect", variant="primary", elem_id="detect-button")
            with gr.Column():
                detect_json = gr.JSON(label="verdicts", elem_id="detect-json")
                detect_plot = gr.BarPlot(
                    x="name", y="score", color="kind", label="score vs threshold", elem_id="detect-plot"
                )
                detect_note = gr.Markdown(elem_id="detect-note")
        if examples_available():
            gr.Examples(
                [
                    [[str(EXAMPLES / "clean-16.png"), str(EXAMPLES / "pgd8-16.png")]],
                    [[str(EXAMPLES / "star-32.png"), str(EXAMPLES / "checker-128.png")]],
                ],
                [detect_files],
                example_labels=["a clean shape and its PGD 8/255 version", "two clean shapes, 32 and 128 px"],
                cache_examples=False,
                elem_id="detect-examples",
            )
        detect_button.click(
            detect,
            [detect_files],
            [detect_json, detect_plot, detect_note],
            api_name="detect",
            **LANES["detect"],
        )
