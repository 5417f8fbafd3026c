"""The Protect tab: image files, method, eps (in 1/255), steps, seed -> comparison gallery, metrics table,
protected PNG files, summary."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..files import perturbation_image, restore_mode, save_new
from ..services import PROTECT_METHODS, mimicry_preview, protect_image
from .common import DEVICE_SLOT, EXAMPLES, IMAGE_TYPES, examples_available, read_uploads


def protect_tab(device: str | None = None) -> None:
    """The Protect tab (``/protect``) of the open ``gr.Blocks``."""
    import gradio as gr
    import pandas as pd

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
        loaded = read_uploads(files, "protect")
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

    with gr.Tab("Protect"):
        gr.Markdown(
            "Add an imperceptible L-infinity perturbation that misleads the (demo) VAE encoder, so that "
            "diffusion-based editing or mimicry of the image fails: **amortized** (a pre-trained protector, "
            "one forward pass, FastProtect-style), **photoguard** (PGD encoder attack) or **mist** (Mist's "
            "textural loss plus its semantic loss through the demo DiT; images up to 256 px). Measured effects "
            "on the demo models are modest: see benchmarks/RESULTS.md."
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
        if examples_available():
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
            **DEVICE_SLOT,
        )
