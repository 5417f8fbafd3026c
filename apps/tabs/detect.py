"""The Detect tab: image files -> JSON verdicts (score, threshold, verdict and what was scored, per image), the
scores against the threshold, a note, and a heat map of patch scores over each flagged image."""

from __future__ import annotations

from pathlib import Path

from ..jobs import Limits
from ..services import describe_result, detect_images, heatmap_image, load_detector
from .common import EXAMPLES, IMAGE_TYPES, LANES, examples_available, memory_errors, read_uploads

SHOWN = ("score", "threshold", "verdict", "resolution", "patch_size", "patches", "tiles")


def detect_tab(
    device: str | None = None, detector: str | Path | None = None, limits: Limits | None = None, dtype: str = "auto"
) -> None:
    """The Detect tab (``/detect``) of the open ``gr.Blocks``, scoring with the detector saved in ``detector``
    (default: :func:`apps.services.default_detector_dir`; without one, ``/detect`` answers "no detector
    available"), in its own queue lane (it answers while a protection or a generation runs). Images are scored
    at their native resolution, on patches of the score model's size, the score model in ``dtype``
    (:func:`apps.device.score_dtype`)."""
    import gradio as gr
    import pandas as pd

    limits = limits or Limits()

    def detect(files):
        """Flag adversarial (protected) images with the EPS-AD detector (Expected Perturbation Score and a
        deep-kernel MMD) at their native resolution; returns JSON verdicts (score, threshold, verdict and what was
        scored per image), a score plot, a note and a heat map of patch scores for each flagged image.

        Args:
            files: image files (PNG, JPEG, WebP, BMP or TIFF); scored on their own pixels, never resized.
        """
        loaded = read_uploads(files, "detect", limits)
        try:
            model = load_detector(detector, device, dtype)
        except (FileNotFoundError, ValueError, OSError) as error:
            raise gr.Error(str(error)) from None
        try:
            with memory_errors("scoring the images"):
                results = detect_images(model, [u.image for u in loaded])
        except ValueError as error:
            raise gr.Error(str(error)) from None
        info = model.describe()
        note = (
            f"Each image is scored at its native resolution, never resized: the EPS of its "
            f"{info['patch_size']}x{info['patch_size']} patches (all of them, or a seeded sample of "
            f"{info['max_patches']} for large images) against clean reference patches, with score model "
            f"{info['score_model']} ({results[0]['score_dtype']}). The threshold flags "
            f"{info['calibrated_fpr']:.0%} of held-out clean images ({info['calibration_images']} calibration "
            "images)"
            + (
                f" and at most that share of them after each of these benign changes: "
                f"{', '.join(info['calibrated_benign_changes'])}"
                if info.get("calibrated_benign_changes")
                else ""
            )
            + ".\n\n"
            + "\n".join(f"- {u.name}: {describe_result(r)}" for u, r in zip(loaded, results))
        )
        images = [
            {"file": u.name, "original_size": list(u.size), **{k: r[k] for k in SHOWN}} for u, r in zip(loaded, results)
        ]
        verdicts = {
            "threshold": model.threshold,
            "calibrated_fpr": info["calibrated_fpr"],
            "calibrated_benign_changes": info.get("calibrated_benign_changes", []),
            "score_model": info["score_model"],
            "score_dtype": results[0]["score_dtype"],
            "patch_size": info["patch_size"],
            "note": note,
            "images": images,
        }
        bars = [{"name": r["file"], "score": r["score"], "kind": f"upload: {r['verdict']}"} for r in images]
        bars.append({"name": "threshold", "score": model.threshold, "kind": "threshold"})
        clean = getattr(model, "clean_scores", None)
        if clean:
            s = sorted(clean)
            for label, q in (("clean median", 0.5), ("clean 95%", 0.95), ("clean max", 1.0)):
                bars.append({"name": label, "score": s[min(len(s) - 1, int(q * (len(s) - 1)))], "kind": "clean"})
        heat = [
            (heatmap_image(u.image, r, model.threshold), f"{u.name}: patch scores (red: high)")
            for u, r in zip(loaded, results)
            if r["verdict"] == "adversarial"
        ]
        return verdicts, pd.DataFrame(bars), note, heat

    with gr.Tab("Detect"):
        gr.Markdown(
            "Score images with the EPS-AD detector (Expected Perturbation Score + deep-kernel MMD) at their "
            "native resolution, on patches of the score model's size: a score above the calibrated threshold "
            "flags an adversarial (protected) image, and a heat map shows where its patches score high. The "
            "measured rates, false positives on benign changes (JPEG, resizing) included, are in "
            "benchmarks/RESULTS.md."
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
                detect_heat = gr.Gallery(label="flagged images: patch scores", elem_id="detect-heatmap", columns=2)
        if examples_available():
            gr.Examples(
                [
                    [[str(EXAMPLES / "photo-64.png"), str(EXAMPLES / "photo-pgd8-64.png")]],
                    [[str(EXAMPLES / "star-32.png"), str(EXAMPLES / "checker-128.png")]],
                ],
                [detect_files],
                example_labels=[
                    "a held-out photo crop and its PhotoGuard 8/255 version (64 px)",
                    "two clean shapes, 32 and 128 px",
                ],
                cache_examples=False,
                elem_id="detect-examples",
            )
        detect_button.click(
            detect,
            [detect_files],
            [detect_json, detect_plot, detect_note, detect_heat],
            api_name="detect",
            **LANES["detect"],
        )
