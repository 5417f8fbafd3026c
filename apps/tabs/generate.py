"""The Generate tab: guided generation (class or prompt, guidance, sampler, model) -> image grid, caption."""

from __future__ import annotations

import inspect
from typing import Any

from .. import services
from ..generate import METHODS, PERTURBATIONS, SOFTPAG_STRENGTH, Request, class_names, grid, samplers_for
from ..models import DEFAULT_MODEL, listed_models
from .common import DEVICE_SLOT

COMPARE = ("none", "cfg", "apg")


def generation_models(model: str = DEFAULT_MODEL) -> list[str]:
    """``model`` first, then the other generation models of ``models.txt`` (text-to-image, class-conditional)."""
    listed = [name for name, role in listed_models() if "text-to-image" in role or "class-conditional" in role]
    return [model, *(name for name in listed if name != model)]


def generate_tab(model: str = DEFAULT_MODEL, device: str | None = None) -> None:
    """The Generate tab (``/generate``) of the open ``gr.Blocks``, generating with ``model`` by default."""
    import gradio as gr

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
            p = services.load_pipeline(model_name, device)
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
                rows.extend(services.generate_images(p, request))
            except ValueError as error:
                raise gr.Error(str(error)) from None
        scale_up = max(1, 256 // rows[0].width)
        caption = " | ".join(f"row {i + 1}: {r.describe()}" for i, r in enumerate(requests))
        return grid(rows, columns=len(rows) // len(requests), scale=scale_up), caption

    pipe = services.load_pipeline(model, device)
    names = class_names(pipe)
    samplers = samplers_for(pipe)
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
            **DEVICE_SLOT,
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
