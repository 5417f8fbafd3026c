"""The Generate tab: guided generation (class or prompt, guidance, sampler, model) -> labelled image grid,
caption.

With "compare", the rows are the request without CFG, with CFG, with default APG and the request itself, each
once (:func:`apps.generate.showcase`) and labelled in the grid. A request's cost is estimated before it runs
(refused above the server's budget); it shows every denoising step with the time left and stops at the next
step when its client goes or presses Stop, or at the time limit.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from guidance import registry
from guidance.registry import Input
from protect import Cancelled

from .. import services
from ..cost import Costs, check_budget, generate_seconds
from ..generate import Request, class_names, grid, methods, options, perturbations, samplers_for, showcase
from ..jobs import Job, Limits, gradio_alive
from ..models import DEFAULT_MODEL, listed_models
from .common import LANES, memory_errors

# the /generate API's first parameters, in the order programs send them; every other registry option follows
API_HEAD = (
    "subject", "method", "scale", "eta", "threshold", "momentum", "perturbation", "perturbation_scale",
    "corrector_steps", "steps", "seed", "num_images", "compare", "sampler", "model_name", "no_threshold",
)  # fmt: skip
API_NAMES = {"norm_threshold": "threshold"}  # option -> API parameter, as programs written before the registry send it
REQUIRED = 13  # API_HEAD[:13] are required; the rest have defaults


def control(gr: Any, name: str, spec: Input, users: tuple[str, ...], *_: Any) -> Any:
    """The Gradio control of a registry input: a slider when it is bounded, else a number, checkbox, radio or box."""
    label = f"{spec.help or name} ({', '.join(users)})"
    if spec.choices is not None:
        return gr.Radio(list(spec.choices), value=spec.default, label=label)
    if spec.type is bool:
        return gr.Checkbox(spec.default, label=label)
    if spec.type is str:
        return gr.Textbox(spec.default, label=label)
    if spec.low is not None and spec.high is not None and spec.default is not None:
        step = spec.step or (1 if spec.type is int else (spec.high - spec.low) / 100)
        low = spec.low + step if spec.positive else spec.low  # the slider cannot reach a refused bound
        return gr.Slider(low, spec.high, value=spec.default, step=step, label=label)
    return gr.Number(spec.default, precision=0 if spec.type is int else None, label=label)


def generation_models(model: str = DEFAULT_MODEL, allow_hub: bool = False) -> list[str]:
    """``model`` first, then the other generation models of ``models.txt`` (text-to-image, class-conditional):
    the embedded demo models only, unless ``allow_hub`` (hub models are downloaded on first use)."""
    listed = [name for name, role in listed_models() if "text-to-image" in role or "class-conditional" in role]
    return [model, *(name for name in listed if name != model and (allow_hub or name.startswith("demo/")))]


def generate_tab(
    model: str = DEFAULT_MODEL, device: str | None = None, limits: Limits | None = None, costs: Costs | None = None
) -> None:
    """The Generate tab (``/generate``) of the open ``gr.Blocks``, generating with ``model`` by default, within
    ``limits`` (refused above ``limits.max_seconds`` by the unit costs measured in ``costs``)."""
    import gradio as gr

    limits = limits or Limits()
    offered = generation_models(model, limits.allow_hub)

    specs = options()
    api = {API_NAMES.get(name, name): name for name in specs}  # API parameter -> option
    parameters = [*API_HEAD, *(name for name in api if name not in API_HEAD)]
    fields = {f.name for f in dataclasses.fields(Request)}

    def generate(*values: Any) -> tuple[Any, str]:
        """Generate images with guidance (CFG or Adaptive Projected Guidance, optionally with PAG, SoftPAG or TPG
        and a Langevin corrector); returns a labelled image grid and its caption.

        Args:
            subject: a class name (class-conditional models such as the demo DiT) or a prompt.
            method: "none", "cfg" or "apg".
            scale: guidance scale w, 1 to 20.
            eta: APG's weight of the parallel component, 0 to 1.
            threshold: APG's norm threshold r > 0; empty (None) for the model family's default.
            momentum: APG's momentum beta, -0.9 to 0.9.
            perturbation: weak-model guidance on top: "none", "pag", "softpag" or "tpg".
            perturbation_scale: its scale s, 0 to 10.
            corrector_steps: Langevin corrector steps per noise level, 0 to 5.
            steps: denoising steps, 1 to 100.
            seed: seed of the first image (image i uses seed + i).
            num_images: images per row, 1 to 8.
            compare: also generate without CFG, with CFG and with default APG, one labelled row each.
            sampler: "default" or another scheduler the model allows (ddim, dpm++, unipc, euler).
            model_name: one of the models this server offers.
            no_threshold: APG without a norm threshold (overrides threshold).
        """
        *values, progress = values  # Gradio passes the gr.Progress of the signature below last
        given = dict(zip(parameters, values))
        model_name, threshold, no_threshold = given["model_name"], given["threshold"], given["no_threshold"]
        if model_name and model_name not in offered:
            raise gr.Error(f"model {model_name!r} is not offered by this server; choose one of {offered}")
        if threshold is not None and not no_threshold and float(threshold) <= 0:
            raise gr.Error(
                "norm threshold r must be > 0; leave it empty for the family default, or tick 'no norm threshold'"
            )
        try:
            named, extra = {}, []
            for parameter, value in given.items():
                option = api.get(parameter)
                if option is None:
                    continue
                if option == "norm_threshold" and no_threshold:
                    value = "off"
                value = None if value is None or value == "" else specs[option].spec.check(value)
                if option in fields:
                    named[option] = value
                elif value is not None:
                    extra.append((option, value))
            base = dict(
                subject=given["subject"],
                steps=int(given["steps"]),
                seed=int(given["seed"]),
                num_images=int(given["num_images"]),
                perturbation=given["perturbation"],
                corrector_steps=int(given["corrector_steps"]),
                sampler=given["sampler"] or "default",
                extra=tuple(extra),
                **{k: v for k, v in named.items() if v is not None},
            )
            chosen = Request(method=given["method"], **base)
            requests = showcase(chosen) if given["compare"] else [chosen]
        except (TypeError, ValueError) as error:
            raise gr.Error(str(error)) from None
        model_name = model_name or model
        job = Job("generate", time_limit=limits.time_limit, alive=gradio_alive(), progress=progress)
        job.start(f"loading {model_name}")
        try:
            p = services.load_pipeline(model_name, device)
        except Exception as error:  # a hub model offline, missing weights, no disk space: say so, keep serving
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300].rstrip(".")
            raise gr.Error(
                f"could not load the model {model_name!r}: {reason}. Hub models are downloaded on first use and "
                f"need network access; `{model}` is always available."
            ) from None
        if costs is not None:
            with memory_errors(f"measuring {model_name}'s cost"):  # a first call of a large model
                unit = services.calibrate_generation(costs, model_name, p)
            seconds = sum(
                generate_seconds(costs, model_name, 1, r.num_images, r.evaluations(), r.branches()) for r in requests
            )
            try:
                check_budget(
                    seconds,
                    limits.max_seconds,
                    f"generating {len(requests)} row(s) of {chosen.num_images} image(s), "
                    f"{chosen.evaluations()} denoiser evaluations each ({unit:.3g} s per image and evaluation "
                    "measured on this server)",
                    "ask for fewer images, steps or rows",
                )
            except ValueError as error:
                raise gr.Error(str(error)) from None
        rows = []
        for i, request in enumerate(requests):
            try:
                job.start(f"generating row {i + 1}/{len(requests)}: {request.describe()}", i / len(requests))
                with memory_errors(f"generating row {i + 1}"):
                    rows.extend(services.generate_images(p, request, on_step=job))
            except (ValueError, Cancelled) as error:
                raise gr.Error(str(error)) from None
        scale_up = max(1, 256 // rows[0].width)
        labels = [r.describe() for r in requests]
        caption = " | ".join(f"row {i + 1}: {label}" for i, label in enumerate(labels))
        sheet = grid(
            rows, columns=len(rows) // len(requests), scale=scale_up, labels=labels if given["compare"] else None
        )
        return sheet, caption

    defaults = {"sampler": "default", "model_name": model, "no_threshold": False}
    defaults |= {p: specs[o].spec.default for p, o in api.items()}
    positional, empty = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty
    generate.__signature__ = inspect.Signature(  # what Gradio reads: the API's parameters, then the progress
        [
            inspect.Parameter(n, positional, default=defaults[n] if i >= REQUIRED else empty)
            for i, n in enumerate(parameters)
        ]
        + [inspect.Parameter("progress", positional, default=gr.Progress())]
    )
    generate.__doc__ += "".join(  # the registry's other options, for the API page and MCP clients
        f"            {p}: {specs[o].spec.help or o} (for {', '.join(specs[o].users)}).\n"
        for p, o in api.items()
        if p not in API_HEAD
    )

    def group(prefix: str) -> list[str]:
        """The option names of one kind ("": guidance, "perturbation_", "sampler_"), in registry order."""
        return [name for name, option in specs.items() if option.prefix == prefix]

    def clear():
        return None, ""

    pipe = services.load_pipeline(model, device)
    names = class_names(pipe)
    samplers = samplers_for(pipe)
    with gr.Tab("Generate"):
        g: dict[str, Any] = {}  # the controls, by generate's parameter names
        with gr.Row():
            with gr.Column():
                g["model_name"] = gr.Dropdown(
                    offered,
                    value=model,
                    label="model" + (" (hub models are downloaded on first use)" if limits.allow_hub else ""),
                )
                if names:
                    g["subject"] = gr.Dropdown(
                        names, value=names[0], allow_custom_value=True, label="class (or a prompt: text models)"
                    )
                else:
                    g["subject"] = gr.Textbox("a lighthouse at dusk", label="prompt")
                g["method"] = gr.Radio(list(methods()), value="apg", label="guidance", elem_id="generate-method")
                every = set(registry.names("guidance"))
                for name in group(""):  # the inputs every method takes (the scale) in view, the others folded
                    if set(specs[name].users) == every:
                        g[API_NAMES.get(name, name)] = control(gr, name, *specs[name])
                with gr.Accordion("guidance options", open=False):
                    for name in group(""):
                        if API_NAMES.get(name, name) not in g:
                            g[API_NAMES.get(name, name)] = control(gr, name, *specs[name])
                        if name == "norm_threshold":  # its "off" keyword
                            g["no_threshold"] = gr.Checkbox(
                                False, label="no norm threshold", elem_id="generate-no-threshold"
                            )
                g["perturbation"] = gr.Radio(
                    list(perturbations()),
                    value="none",
                    label="weak-model guidance",
                    info="; ".join(f"{e.name}: {e.help}" for e in registry.entries("perturbation")),
                )
                for name in group("perturbation_"):
                    g[API_NAMES.get(name, name)] = control(gr, name, *specs[name])
                g["corrector_steps"] = gr.Slider(0, 5, value=0, step=1, label="Langevin corrector steps per level")
                with gr.Row():
                    g["sampler"] = gr.Radio(samplers, value="default", label="sampler", elem_id="generate-sampler")
                    g["steps"] = gr.Slider(1, 100, value=25, step=1, label="steps (score samplers: noise levels)")
                with gr.Accordion("sampler options", open=False):
                    for name in group("sampler_"):
                        g[API_NAMES.get(name, name)] = control(gr, name, *specs[name])
                g["seed"] = gr.Number(0, precision=0, label="seed")
                g["num_images"] = gr.Slider(1, 8, value=4, step=1, label="images")
                g["compare"] = gr.Checkbox(
                    False, label="compare with none / CFG / APG on the same seeds", elem_id="generate-compare"
                )
                with gr.Row():
                    button = gr.Button("Generate", variant="primary", elem_id="generate-button")
                    stop = gr.Button("Stop", variant="stop", elem_id="generate-stop")
            with gr.Column():
                image = gr.Image(label="images", type="pil", format="png", elem_id="generate-image")
                caption = gr.Markdown(elem_id="generate-caption")
        running = button.click(clear, None, [image, caption], queue=False, api_visibility="private").then(
            generate, [g[name] for name in parameters], [image, caption], api_name="generate", **LANES["generate"]
        )
        stop.click(None, None, None, cancels=[running], api_visibility="private")
        if names:
            # CFG 8 clips and oversaturates the demo DiT; APG 8 without a threshold keeps the guidance without it,
            # where the family default r caps the update near no guidance (benchmarks/RESULTS.md, DiT sweeps)
            example = dict(
                subject=names[0], method="apg", scale=8, eta=0, threshold=None, momentum=-0.5,
                perturbation="none", perturbation_scale=2, corrector_steps=0, sampler="default", steps=20,
                seed=0, num_images=4, compare=True, no_threshold=True,
            )  # fmt: skip
            gr.Examples(
                [list(example.values())],
                [g[name] for name in example],
                example_labels=[f"{names[0]}, 4 seeds: none / CFG 8 / APG 8 / APG 8 without a norm threshold"],
                cache_examples=False,
                elem_id="generate-examples",
            )
