"""The steerguard Gradio app: built by :func:`build_app`, nothing loaded at import.

Tabs grow with the library; the named API endpoint ``/generate`` serves programs
(``gradio_client.Client(url).predict(..., api_name="/generate")``).
"""

from __future__ import annotations

from typing import Any

from .generate import METHODS, PERTURBATIONS, Request, class_names, generate, grid
from .models import DEFAULT_MODEL, listed_models, load_pipeline

COMPARE = ("none", "cfg", "apg")
MAX_CONCURRENCY = 1  # one generation at a time per model on one device


def build_app(model: str = DEFAULT_MODEL, device: str | None = None):
    """A ``gr.Blocks`` app generating with ``model`` (the embedded demo DiT by default)."""
    import gradio as gr

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
            )
            chosen = Request(method=method, **base)
            requests = [Request(method=m, **base) for m in COMPARE] + [chosen] if compare else [chosen]
        except (TypeError, ValueError) as error:
            raise gr.Error(str(error)) from None
        progress(0, desc="loading the model")
        p = pipe()
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

    names = class_names(pipe())
    with gr.Blocks(title="steerguard") as app:
        gr.Markdown(f"# steerguard\nGuidance for diffusers pipelines. Model: `{model}`.")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    if names:
                        subject = gr.Dropdown(names, value=names[0], label="class")
                    else:
                        subject = gr.Textbox("a lighthouse at dusk", label="prompt")
                    method = gr.Radio(list(METHODS), value="apg", label="guidance")
                    scale = gr.Slider(1, 20, value=6, step=0.5, label="scale w")
                    with gr.Accordion("APG options", open=False):
                        eta = gr.Slider(0, 1, value=0, step=0.05, label="eta (parallel component)")
                        threshold = gr.Number(None, label="norm threshold r (empty: family default)")
                        momentum = gr.Slider(-0.9, 0.9, value=-0.5, step=0.05, label="momentum beta")
                    with gr.Row():
                        perturbation = gr.Radio(list(PERTURBATIONS), value="none", label="weak-model guidance")
                        perturbation_scale = gr.Slider(0, 10, value=2, step=0.5, label="its scale s")
                    corrector_steps = gr.Slider(0, 5, value=0, step=1, label="Langevin corrector steps per level")
                    steps = gr.Slider(1, 100, value=25, step=1, label="steps")
                    seed = gr.Number(0, precision=0, label="seed")
                    num_images = gr.Slider(1, 8, value=4, step=1, label="images")
                    compare = gr.Checkbox(False, label="compare with none / CFG / APG on the same seeds")
                    button = gr.Button("Generate", variant="primary")
                with gr.Column():
                    image = gr.Image(label="images", type="pil", format="png")
                    caption = gr.Markdown()
            inputs = [
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
            ]
            button.click(run_generate, inputs, [image, caption], api_name="generate", concurrency_limit=MAX_CONCURRENCY)
            if names:
                gr.Examples(
                    [[names[0], "apg", 8, 0, None, -0.5, 20, 0, 4, True]],
                    inputs,
                    [image, caption],
                    fn=run_generate,
                    cache_examples=False,
                )
        gr.Markdown("Models listed in `models.txt`: " + ", ".join(f"`{n}`" for n, _ in listed_models()))
    app.queue(default_concurrency_limit=MAX_CONCURRENCY, max_size=64)
    return app


__all__ = ["build_app", "class_names"]
