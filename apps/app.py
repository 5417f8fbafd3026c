"""The steerguard Gradio app: built by :func:`build_app`, nothing loaded at import.

Tabs grow with the library; named API endpoints serve programs
(``gradio_client.Client(url).predict(..., api_name="/generate")``):

* ``/generate``: guided generation (class or prompt, guidance options; then, optional, the sampler and the
  model, one of :func:`generation_models`) -> image grid, caption;
* ``/protect``: image files, method, eps (in 1/255), steps, seed -> comparison gallery, metrics table,
  protected PNG files, summary;
* ``/detect``: image files -> JSON verdicts (score, threshold, verdict per image), score plot, note.

Uploads are decoded only by :func:`apps.uploads.open_upload` (content sniffing, size and pixel caps before
decoding); a bad upload answers with a ``gr.Error`` message and the server keeps serving.
"""

from __future__ import annotations

import inspect
import tempfile
from pathlib import Path
from typing import Any

from .generate import (
    METHODS,
    PERTURBATIONS,
    SOFTPAG_STRENGTH,
    Request,
    class_names,
    generate,
    grid,
    samplers_for,
)
from .models import DEFAULT_MODEL, listed_models, load_pipeline
from .uploads import (
    MAX_BYTES,
    PROTECT_METHODS,
    detect_images,
    load_detector,
    mimicry_preview,
    open_upload,
    perturbation_image,
    protect_image,
    restore_mode,
    save_new,
)

COMPARE = ("none", "cfg", "apg")
MAX_CONCURRENCY = 1  # one job at a time on the device: generate, protect and detect share one slot
MAX_FILES = 8  # images per /protect or /detect request
IMAGE_TYPES = [".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"]  # the picker's filter; content decides
EXAMPLES = Path(__file__).resolve().parent / "examples"  # one-click example images (scripts/make_examples.py)


def _paths(files: Any) -> list[str]:
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


def generation_models(model: str = DEFAULT_MODEL) -> list[str]:
    """``model`` first, then the other generation models of ``models.txt`` (text-to-image, class-conditional)."""
    listed = [name for name, role in listed_models() if "text-to-image" in role or "class-conditional" in role]
    return [model, *(name for name in listed if name != model)]


def launch_options() -> dict[str, Any]:
    """``launch()`` options the app is meant to run with (the upload size cap, enforced by Gradio too)."""
    return {"max_file_size": MAX_BYTES}


def build_app(model: str = DEFAULT_MODEL, device: str | None = None, detector: str | Path | None = None):
    """A ``gr.Blocks`` app generating with ``model`` (the embedded demo DiT by default).

    ``detector`` is the folder of a saved EPS-AD detector for the Detect tab (default
    ``demo_models/eps_detector``; without one, ``/detect`` answers "no detector available").
    """
    import gradio as gr
    import pandas as pd

    def pipe():
        return load_pipeline(model, device)

    def run_generate(
        subject,
        method,
        scale,
        eta,
        threshold,
        momentum,
        perturbation,
        perturbation_scale,
        corrector_steps,
        steps,
        seed,
        num_images,
        compare,
        sampler="default",
        model_name=model,
        progress=gr.Progress(),  # noqa: B008  (Gradio's idiom)
    ) -> tuple[Any, str]:
        try:
            base = dict(
                subject=subject,
                scale=float(scale),
                eta=float(eta),
                steps=int(steps),
                seed=int(seed),
                num_images=int(num_images),
                norm_threshold=float(threshold) if threshold else None,
                momentum=None if momentum is None else float(momentum),
                perturbation=perturbation,
                perturbation_scale=float(perturbation_scale),
                corrector_steps=int(corrector_steps),
                sampler=sampler or "default",
            )
            chosen = Request(method=method, **base)
            requests = [Request(method=m, **base) for m in COMPARE] + [chosen] if compare else [chosen]
        except (TypeError, ValueError) as error:
            raise gr.Error(str(error)) from None
        model_name = model_name or model
        progress(0, desc=f"loading {model_name}")
        try:
            p = load_pipeline(model_name, device)
        except Exception as error:  # a hub model offline, missing weights, no disk space: say so, keep serving
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300].rstrip(".")
            raise gr.Error(
                f"could not load the model {model_name!r}: {reason}. Hub models are downloaded on first use and "
                f"need network access; `{model}` is always available."
            ) from None
        rows = []
        for i, request in enumerate(requests):
            progress(i / len(requests), desc=f"generating: {request.describe()}")
            try:
                rows.extend(generate(p, request))
            except ValueError as error:
                raise gr.Error(str(error)) from None
        scale_up = max(1, 256 // rows[0].width)
        caption = " | ".join(f"row {i + 1}: {r.describe()}" for i, r in enumerate(requests))
        return grid(rows, columns=len(rows) // len(requests), scale=scale_up), caption

    def uploads(files, purpose: str):
        try:
            paths = _paths(files)
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

    def run_protect(files, method, eps, steps, seed, preview=True, progress=gr.Progress()):  # noqa: B008
        try:
            eps, steps, seed = float(eps), int(steps), int(seed)
        except (TypeError, ValueError):
            raise gr.Error("eps, steps and seed must be numbers") from None
        if method not in PROTECT_METHODS:
            raise gr.Error(f"method must be one of {PROTECT_METHODS}, got {method!r}")
        if not 1 <= eps <= 32:
            raise gr.Error(f"eps must be between 1 and 32 (in 1/255 units), got {eps:g}")
        if not 1 <= steps <= 500:
            raise gr.Error(f"steps must be between 1 and 500, got {steps}")
        if not 0 <= seed < 2**63:
            raise gr.Error(f"seed must be a non-negative integer, got {seed}")
        loaded = uploads(files, "protect")
        out_dir = Path(tempfile.mkdtemp(prefix="steerguard-protect-"))
        gallery, rows, outputs = [], [], []
        for i, upload in enumerate(loaded):
            progress(i / len(loaded), desc=f"protecting {upload.name} ({i + 1}/{len(loaded)})")
            try:
                protected, metrics = protect_image(
                    upload.image, method=method, eps=eps / 255, steps=steps, seed=seed + i, device=device
                )
            except ValueError as error:
                raise gr.Error(f"{upload.name}: {error}") from None
            protected = restore_mode(protected, upload.mode)
            outputs.append(str(save_new(protected, out_dir, f"{upload.name}-protected")))
            gallery += [
                (upload.image, f"{upload.name}: original"),
                (protected, f"{upload.name}: protected ({method}, eps {eps:g}/255)"),
                (perturbation_image(upload.image, protected, eps / 255), f"{upload.name}: perturbation, amplified"),
            ]
            edit_psnr = None
            if preview:
                progress((i + 0.5) / len(loaded), desc=f"mimicry preview of {upload.name}")
                mimicry = mimicry_preview(upload.image, protected, seed=seed + i, device=device)
                if mimicry is not None:
                    before, after, info = mimicry
                    crop = f"{info['crop']}px crop, class {info['class']}"
                    gallery += [
                        (before, f"{upload.name}: SDEdit 0.3 of the original ({crop})"),
                        (after, f"{upload.name}: SDEdit 0.3 of the protected image (same noise)"),
                    ]
                    edit_psnr = round(info["psnr_between_edits"], 2)
            w, h = upload.size
            values = [round(float(metrics[k]), 4) for k in ("psnr", "ssim", "linf_255", "seconds")]
            rows.append([upload.name, f"{w}x{h}", protected.mode, *values, edit_psnr])
        progress(1, desc="done")
        columns = ["file", "size", "mode", "PSNR (dB)", "SSIM", "Linf (/255)", "seconds", "edits PSNR (dB)"]
        table = pd.DataFrame(rows, columns=columns)
        how = "one forward pass of the demo amortized protector" if method == "amortized" else f"{steps} PGD steps"
        summary = (
            f"Protected {len(loaded)} image(s) with **{method}** (eps {eps:g}/255, {how}, seed {seed}) "
            "against the demo VAE. Download the PNG files: re-encoding them (JPEG, resizing) weakens the protection."
            + (
                " The mimicry preview edits the same centre crop of the original and of the protected image with "
                "the demo DiT (SDEdit, strength 0.3, same noise); a lower 'edits PSNR' means the protection "
                "changed the edit more (random noise of 8/255 gives about 44 dB on the demo images)."
                if preview
                else ""
            )
        )
        return gallery, table, outputs, summary

    def run_detect(files):
        loaded = uploads(files, "detect")
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

    names = class_names(pipe())
    samplers = samplers_for(pipe())
    examples = all((EXAMPLES / f).is_file() for f in ("star-32.png", "checker-128.png", "clean-16.png", "pgd8-16.png"))
    with gr.Blocks(title="steerguard") as app:
        gr.Markdown(f"# steerguard\nGuidance for diffusers pipelines. Model: `{model}`.")
        with gr.Tab("Generate"):
            g: dict[str, Any] = {}  # the controls, by run_generate's parameter names
            with gr.Row():
                with gr.Column():
                    g["model_name"] = gr.Dropdown(
                        generation_models(model), value=model, label="model (hub models need network access)"
                    )
                    if names:
                        g["subject"] = gr.Dropdown(
                            names, value=names[0], allow_custom_value=True, label="class (or a prompt: text models)"
                        )
                    else:
                        g["subject"] = gr.Textbox("a lighthouse at dusk", label="prompt")
                    g["method"] = gr.Radio(list(METHODS), value="apg", label="guidance")
                    g["scale"] = gr.Slider(1, 20, value=6, step=0.5, label="scale w")
                    with gr.Accordion("APG options", open=False):
                        g["eta"] = gr.Slider(0, 1, value=0, step=0.05, label="eta (parallel component)")
                        g["threshold"] = gr.Number(None, label="norm threshold r (empty: family default)")
                        g["momentum"] = gr.Slider(-0.9, 0.9, value=-0.5, step=0.05, label="momentum beta")
                    with gr.Row():
                        g["perturbation"] = gr.Radio(
                            list(PERTURBATIONS),
                            value="none",
                            label="weak-model guidance",
                            info=f"softpag: every head of PAG's layer at strength {SOFTPAG_STRENGTH:g}",
                        )
                        g["perturbation_scale"] = gr.Slider(0, 10, value=2, step=0.5, label="its scale s")
                    g["corrector_steps"] = gr.Slider(0, 5, value=0, step=1, label="Langevin corrector steps per level")
                    with gr.Row():
                        g["sampler"] = gr.Radio(samplers, value="default", label="sampler")
                        g["steps"] = gr.Slider(1, 100, value=25, step=1, label="steps")
                    g["seed"] = gr.Number(0, precision=0, label="seed")
                    g["num_images"] = gr.Slider(1, 8, value=4, step=1, label="images")
                    g["compare"] = gr.Checkbox(
                        False, label="compare with none / CFG / APG on the same seeds", elem_id="generate-compare"
                    )
                    button = gr.Button("Generate", variant="primary", elem_id="generate-button")
                with gr.Column():
                    image = gr.Image(label="images", type="pil", format="png", elem_id="generate-image")
                    caption = gr.Markdown(elem_id="generate-caption")
            parameters = [name for name in inspect.signature(run_generate).parameters if name != "progress"]
            button.click(
                run_generate,
                [g[name] for name in parameters],
                [image, caption],
                api_name="generate",
                concurrency_limit=MAX_CONCURRENCY,
                concurrency_id="device",
            )
            if names:
                example = dict(
                    subject=names[0], method="apg", scale=8, eta=0, threshold=None, momentum=-0.5,
                    perturbation="softpag", perturbation_scale=2, corrector_steps=0, sampler="default", steps=20,
                    seed=0, num_images=4, compare=True,
                )  # fmt: skip
                gr.Examples(
                    [list(example.values())],
                    [g[name] for name in example],
                    example_labels=[f"{names[0]}, 4 seeds, SoftPAG 2 on: none / CFG 8 / APG 8"],
                    cache_examples=False,
                    elem_id="generate-examples",
                )
        with gr.Tab("Protect"):
            gr.Markdown(
                "Add an imperceptible L-infinity perturbation that misleads the (demo) VAE encoder, so that "
                "diffusion-based editing or mimicry of the image fails: **amortized** (a pre-trained protector, "
                "one forward pass, FastProtect-style), **photoguard** (PGD encoder attack) or **mist** (Mist's "
                "textural loss). Measured effects on the demo models are modest: see benchmarks/RESULTS.md."
            )
            with gr.Row():
                with gr.Column():
                    protect_files = gr.File(
                        file_count="multiple",
                        file_types=IMAGE_TYPES,
                        type="filepath",
                        label="images",
                        elem_id="protect-files",
                    )
                    protect_method = gr.Radio(list(PROTECT_METHODS), value="amortized", label="method")
                    protect_eps = gr.Slider(1, 32, value=8, step=1, label="budget eps (in 1/255)")
                    protect_steps = gr.Slider(1, 500, value=50, step=1, label="PGD steps (photoguard, mist)")
                    protect_seed = gr.Number(0, precision=0, label="seed")
                    protect_preview = gr.Checkbox(True, label="mimicry preview (SDEdit by the demo DiT, before/after)")
                    protect_button = gr.Button("Protect", variant="primary", elem_id="protect-button")
                with gr.Column():
                    protect_gallery = gr.Gallery(
                        label="original | protected | perturbation (amplified) | edit of the original | edit of the "
                        "protected image",
                        columns=5,
                        elem_id="protect-gallery",
                    )
                    protect_table = gr.Dataframe(label="metrics", interactive=False)
                    protect_out = gr.File(label="protected PNG files", file_count="multiple")
                    protect_summary = gr.Markdown(elem_id="protect-summary")
            protect_inputs = [protect_files, protect_method, protect_eps, protect_steps, protect_seed, protect_preview]
            if examples:
                gr.Examples(
                    [
                        [
                            [str(EXAMPLES / "star-32.png"), str(EXAMPLES / "checker-128.png")],
                            "photoguard",
                            8,
                            20,
                            0,
                            True,
                        ],
                        [[str(EXAMPLES / "checker-128.png")], "amortized", 8, 1, 0, True],
                        [[str(EXAMPLES / "star-32.png")], "mist", 4, 50, 0, True],
                    ],
                    protect_inputs,
                    example_labels=[
                        "two demo shapes (32 and 128 px): PhotoGuard 8/255",
                        "one shape: amortized protector 8/255",
                        "one shape: Mist 4/255",
                    ],
                    cache_examples=False,
                    elem_id="protect-examples",
                )
            protect_button.click(
                run_protect,
                protect_inputs,
                [protect_gallery, protect_table, protect_out, protect_summary],
                api_name="protect",
                concurrency_limit=MAX_CONCURRENCY,
                concurrency_id="device",
            )
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
            if examples:
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
                run_detect,
                [detect_files],
                [detect_json, detect_plot, detect_note],
                api_name="detect",
                concurrency_limit=MAX_CONCURRENCY,
                concurrency_id="device",
            )
        gr.Markdown("Models listed in `models.txt`: " + ", ".join(f"`{n}`" for n, _ in listed_models()))
    app.queue(default_concurrency_limit=MAX_CONCURRENCY, max_size=64)
    return app


__all__ = ["MAX_FILES", "build_app", "class_names", "generation_models", "launch_options"]
