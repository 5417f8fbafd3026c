"""The Protect tab: image files, method, eps (in 1/255), steps, seed -> comparison gallery, metrics table,
protected PNG files, summary, before/after slider.

A request's cost is estimated from the images' headers before anything is decoded (:mod:`apps.cost`) and
refused above the server's budget; a running request shows every PGD step with the time left, stops at the
next step when its client goes or presses Stop, or at the time limit, and clears the previous results first.
"""

from __future__ import annotations

from protect import AMORTIZED_BUDGETS, Cancelled
from protect.survival import MARGIN

from ..cost import Costs, check_budget, protect_seconds
from ..disk import OutputFolders
from ..files import perturbation_image, save_new
from ..jobs import Job, Limits, duration, gradio_alive
from ..services import (
    ASPL_FINETUNE,
    DEFAULT_PGD_STEPS,
    EPS_255,
    PGD_STEPS,
    PGD_TILE,
    PREVIEW_STRENGTH,
    PROTECT_METHODS,
    check_protect_options,
    default_steps,
    mimicry_preview,
    protect_image,
)
from .common import (
    EXAMPLES,
    IMAGE_TYPES,
    LANES,
    decode_uploads,
    examples_available,
    memory_errors,
    upload_sizes,
)


def protect_tab(
    device: str | None = None,
    limits: Limits | None = None,
    costs: Costs | None = None,
    folders: OutputFolders | None = None,
) -> None:
    """The Protect tab (``/protect``) of the open ``gr.Blocks``, within ``limits`` (refused above
    ``limits.max_seconds`` by the unit costs measured in ``costs``; without ``costs``, no estimate), writing into
    ``folders``."""
    import gradio as gr
    import pandas as pd

    limits = limits or Limits()
    folders = folders or OutputFolders(limits.output_age)

    def protect(files, method, eps, steps, seed, preview=True, progress=gr.Progress()):  # noqa: B008
        """Protect images against mimicry by diffusion models (an imperceptible L-infinity perturbation against
        the photo VAE encoder); returns a comparison gallery, a metrics table, the protected PNG files, a summary
        and a before/after pair.

        Args:
            files: image files (PNG, JPEG, WebP, BMP or TIFF), at most the server's file and pixel limits.
            method: "amortized" (one forward pass of the photo protector, texture-weighted budget),
                "amortized-full" (the same at the full budget everywhere), "photoguard", "mist", "sds"
                (PGD; sds: Diff-Protect's SDS+) or "aspl" (Anti-DreamBooth: PGD against a copy of the photo
                latent model fine-tuned on the image's crops as it goes; its default is 60 steps).
            eps: the L-infinity budget in 1/255 units, 1 to 32.
            steps: PGD steps (photoguard, mist, sds, aspl), 1 to 500.
            seed: seed of the PGD start (image i uses seed + i).
            preview: also edit the original and the protected image with the photo latent model (SDEdit).
        """
        try:
            eps, steps, seed = float(eps), int(steps), int(seed)
        except (TypeError, ValueError):
            raise gr.Error("eps, steps and seed must be numbers") from None
        try:
            check_protect_options(method, eps, steps, seed)
        except ValueError as error:
            raise gr.Error(str(error)) from None
        sizes = upload_sizes(files, limits)
        if costs is not None:
            estimate = protect_seconds(
                costs, [s for _, s in sizes], method, steps, PGD_TILE, bool(preview), finetune=ASPL_FINETUNE
            )
            listed = ", ".join(f"{w}x{h}" for _, (w, h) in sizes)
            how = "one forward pass" if method in AMORTIZED_BUDGETS else f"{steps} PGD steps"
            try:
                check_budget(
                    estimate,
                    limits.max_seconds,
                    f"protecting {len(sizes)} image(s) of {listed} pixels (width x height) with {method}, {how}",
                    "send fewer or smaller images, fewer steps, or the amortized method",
                )
            except ValueError as error:
                raise gr.Error(str(error)) from None
        job = Job("protect", time_limit=limits.time_limit, alive=gradio_alive(), progress=progress)
        loaded = decode_uploads(sizes, "protect")
        out_dir = folders.new()
        gallery, rows, outputs = [], [], []
        survivors = 0
        for i, upload in enumerate(loaded):
            try:
                job.start(f"protecting {upload.name} ({i + 1}/{len(loaded)})", i / len(loaded))
                with memory_errors(f"protecting {upload.name}"):
                    protected, metrics = protect_image(
                        upload.image,
                        method=method,
                        eps=eps / 255,
                        steps=steps,
                        seed=seed + i,
                        device=device,
                        tile=PGD_TILE,
                        on_step=job,
                        mode=upload.mode,
                        icc_profile=upload.icc_profile,
                    )
            except ValueError as error:
                raise gr.Error(f"{upload.name}: {error}") from None
            except Cancelled as error:
                raise gr.Error(str(error)) from None
            outputs.append(str(save_new(protected, out_dir, f"{upload.name}-protected")))
            gallery += [
                (upload.image, f"{upload.name}: original"),
                (protected, f"{upload.name}: protected ({method}, eps {eps:g}/255)"),
                (perturbation_image(upload.image, protected, eps / 255), f"{upload.name}: perturbation, amplified"),
            ]
            edit_psnr = excess_psnr = None
            if preview:
                try:
                    job.start(f"mimicry preview of {upload.name}", (i + 0.5) / len(loaded))
                    with memory_errors(f"the mimicry preview of {upload.name}"):
                        mimicry = mimicry_preview(upload.image, protected, seed=seed + i, device=device)
                except (Cancelled, ValueError) as error:
                    raise gr.Error(str(error)) from None
                if mimicry is not None:
                    before, after, info = mimicry
                    crop = f"{info['crop']}px centre crop"
                    gallery += [
                        (before, f"{upload.name}: SDEdit {info['strength']:g} of the original ({crop})"),
                        (after, f"{upload.name}: SDEdit {info['strength']:g} of the protected image (same noise)"),
                    ]
                    edit_psnr = round(info["psnr_between_edits"], 2)
                    excess_psnr = round(info["excess_psnr_between_edits"], 2)
            w, h = upload.size
            values = [round(float(metrics[k]), 4) for k in ("psnr", "ssim", "linf_255", "seconds")]
            survival = metrics["survival"]
            kept = [
                f"{p['verdict']} ({p['vs_noise']:.2g}x noise)" for p in survival["purifications"].values()
            ]  # jpeg75, noisy_upscale
            survivors += survival["verdict"] == "survives"
            rows.append([upload.name, f"{w}x{h}", protected.mode, *values, edit_psnr, excess_psnr, *kept])
        progress(1, desc="done")
        columns = ["file", "size", "mode", "PSNR (dB)", "SSIM", "Linf (/255)", "seconds", "edits PSNR (dB)"]
        columns += ["edits PSNR beyond the perturbation (dB)"]
        columns += ["after JPEG q75", "after noisy upscaling"]
        table = pd.DataFrame(rows, columns=columns)
        how = "one forward pass of the amortized protector" if method in AMORTIZED_BUDGETS else f"{steps} PGD steps"
        summary = (
            f"Protected {len(loaded)} image(s) with **{method}** (eps {eps:g}/255, {how}, seed {seed}) "
            f"against the photo demo VAE in {duration(job.elapsed)}. Download the PNG files (deleted from this "
            f"server after {duration(limits.output_age)}): re-encoding them (JPEG, resizing) weakens the protection. "
            f"**{survivors} of {len(loaded)} survive** JPEG q75 and noisy upscaling (the last two columns: the shift "
            f"of the photo VAE's latent after the purification, against same-budget random noise after it; survives "
            f"at >= {MARGIN:g}x the noise's)."
            + (
                " The mimicry preview edits the same centre crop of the original and of the protected image with "
                f"the photo latent diffusion model (SDEdit, strength {PREVIEW_STRENGTH:g}, same noise); a lower "
                "'edits PSNR' means "
                "the protection changed the edit more (compare with random noise of the same budget in "
                "benchmarks/RESULTS.md). Part of that change can be the perturbation itself, carried through "
                "unchanged, which does not harm the copy: 'beyond the perturbation' leaves that part out."
                if preview
                else ""
            )
        )
        first = loaded[0]
        return gallery, table, outputs, summary, (first.image, gallery[1][0])

    def clear():
        return None, None, None, "", None

    with gr.Tab("Protect"):
        gr.Markdown(
            "Add an imperceptible L-infinity perturbation that misleads the VAE encoder (here the small photo "
            "demo VAE, a stand-in for Stable Diffusion's), so that diffusion-based editing or mimicry of the "
            "image fails: **amortized** (a pre-trained protector, one forward pass, FastProtect-style; it spends "
            "less of the budget on flat regions, where a perturbation shows; **amortized-full** spends all of it, "
            "as PGD does, and matches 100-step PhotoGuard's damage), "
            "**photoguard** (PGD encoder attack), **mist** (Mist's textural loss plus its semantic loss "
            "through the photo latent diffusion model), **sds** (Diff-Protect's SDS+: the latent model's "
            "denoising loss pushed up, the least visible of the PGD methods at equal budget) or **aspl** "
            "(Anti-DreamBooth, against fine-tuning: the same loss of a copy of the latent model that is fine-tuned "
            "on the image's 128 px crops as the attack goes, the way a DreamBooth or LoRA attacker would; each "
            "image is protected with its own crops, 60 steps by default). "
            "Images are protected at their native resolution. "
            "What survives purification is measured in benchmarks/RESULTS.md. The metrics say per image whether the "
            "protection survives JPEG q75 and noisy upscaling (the latent shift left, against random noise). "
            f"Each request may use up to {limits.max_files} images and {limits.max_pixels:,} pixels in all"
            + (f", and about {duration(limits.max_seconds)} of estimated work" if limits.max_seconds else "")
            + "; Stop ends a running request at its next step."
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
                protect_eps = gr.Slider(*EPS_255, value=8, step=1, label="budget eps (in 1/255)")
                protect_steps = gr.Slider(
                    *PGD_STEPS, value=DEFAULT_PGD_STEPS, step=1, label="PGD steps (photoguard, mist, sds, aspl)"
                )
                protect_seed = gr.Number(0, precision=0, label="seed")
                protect_preview = gr.Checkbox(True, label="mimicry preview (SDEdit by the photo latent model)")
                with gr.Row():
                    protect_button = gr.Button("Protect", variant="primary", elem_id="protect-button")
                    protect_stop = gr.Button("Stop", variant="stop", elem_id="protect-stop")
            with gr.Column():
                protect_gallery = gr.Gallery(
                    label="original | protected | perturbation (amplified) | edit of the original | edit of the "
                    "protected image",
                    columns=5,
                    format="png",
                    elem_id="protect-gallery",
                )
                protect_slider = gr.ImageSlider(
                    label="before / after (first image, lossless PNG)",
                    type="pil",
                    format="png",
                    elem_id="protect-slider",
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
        outputs = [protect_gallery, protect_table, protect_out, protect_summary, protect_slider]
        running = protect_button.click(clear, None, outputs, queue=False, api_visibility="private").then(
            protect, protect_inputs, outputs, api_name="protect", **LANES["protect"]
        )
        protect_stop.click(None, None, None, cancels=[running], api_visibility="private")
        # each method's own default steps when it is chosen (ASPL needs rounds of fine-tunes between its steps)
        protect_method.input(
            lambda method: gr.update(value=default_steps(method)),
            protect_method,
            protect_steps,
            queue=False,
            api_visibility="private",
        )
