"""The ``steerguard`` command line: ``app``, ``generate``, ``protect``, ``detect``, ``evaluate`` and ``train``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from protect import AMORTIZED_BUDGETS

from . import generate as generation
from .device import SCORE_DTYPES
from .jobs import Limits
from .services import (
    DEFAULT_ASPL_STEPS,
    DEFAULT_PGD_STEPS,
    LATENT_METHODS,
    PROTECT_LDM,
    PROTECT_METHODS,
    PROTECT_VAE,
    PROTECTOR_NAME,
    default_steps,
)

DTYPE_OPTION = {
    "choices": ["auto", *SCORE_DTYPES],
    "default": "auto",
    "help": "precision of the detector's score model (default auto: bfloat16 on GPUs and on CPUs with bfloat16 "
    "matrix units, ~1.8x faster there, scores within 1%% of float32's; float32 elsewhere)",
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return RUNNERS[args.command](args)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"steerguard {args.command}: error: {error}", file=sys.stderr)
        return 2
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Destroy the process group ``accelerate launch`` / torchrun made, if any: left to the interpreter's exit, its
    communication threads are torn down unjoined, and the process aborts ("terminate called without an active
    exception") now and then after its work is done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def build_parser() -> argparse.ArgumentParser:
    """The ``steerguard`` parser: one subcommand per entry of :data:`RUNNERS`, each added by its own function."""
    parser = argparse.ArgumentParser(prog="steerguard", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_app, _add_generate, _add_protect, _add_detect, _add_train, _add_evaluate):
        add(commands)
    return parser


def _add_app(commands: argparse._SubParsersAction) -> None:
    """``steerguard app``: the Gradio app and its limits."""
    app = commands.add_parser("app", help="start the Gradio app (default: the embedded demo models)")
    app.add_argument("--model", default="demo/dit", help="hub id, local folder or demo/<name> (see models.txt)")
    app.add_argument("--host", default="127.0.0.1")
    app.add_argument("--port", type=int, default=7860)
    app.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: the GPU when there is one)")
    app.add_argument("--detector", type=Path, default=None, help="saved EPS-AD detector (default: the demo one)")
    app.add_argument("--detect-dtype", **DTYPE_OPTION)
    limits = Limits()
    app.add_argument(
        "--max-seconds",
        type=float,
        default=limits.max_seconds,
        help="refuse a request whose estimated time (measured unit costs x pixels x steps) exceeds this "
        f"(default {limits.max_seconds:g}; 0: no budget)",
    )
    app.add_argument(
        "--time-limit",
        type=float,
        default=limits.time_limit,
        help=f"stop a running request at its next step after this many seconds (default {limits.time_limit:g}; "
        "0: no limit)",
    )
    app.add_argument(
        "--max-pixels",
        type=int,
        default=limits.max_pixels,
        help=f"decoded pixels per request, all images together (default {limits.max_pixels}, 2048x2048)",
    )
    app.add_argument("--max-files", type=int, default=limits.max_files, help="images per request and per upload")
    app.add_argument(
        "--output-age",
        type=float,
        default=limits.output_age,
        help=f"delete outputs and cached uploads after this many seconds (default {limits.output_age:g})",
    )
    app.add_argument(
        "--max-pipelines", type=int, default=limits.max_pipelines, help="generation pipelines kept loaded at once"
    )
    app.add_argument(
        "--allow-hub",
        action="store_true",
        help="offer the hub models of models.txt in the model picker (downloaded on first use); by default only "
        "the demo models and --model are offered",
    )
    app.add_argument(
        "--mcp", action="store_true", help="also serve the API as an MCP server at /gradio_api/mcp/ (gradio[mcp])"
    )


def _add_generate(commands: argparse._SubParsersAction) -> None:
    """``steerguard generate``: one option per registry input (guidance.registry)."""
    gen = commands.add_parser(
        "generate",
        help="generate images to PNG files",
        description="Generate with a guidance method, weak-model guidance and a sampler chosen from the registry "
        "(guidance.registry); each option below says which entries take it. Unconditional UNets (demo/unet) "
        "take --method none and, besides their scheduler, the score samplers (langevin, pc).",
    )
    gen.add_argument("subject", help="a class name (class-conditional models) or a prompt (ignored: unconditional)")
    gen.add_argument("--model", default="demo/dit")
    gen.add_argument("--method", choices=generation.methods(), default="apg", help="CFG-type guidance")
    gen.add_argument("--perturbation", choices=generation.perturbations(), default="none", help="weak-model guidance")
    gen.add_argument("--sampler", choices=generation.samplers(), default="default", help="scheduler or score sampler")
    for name, (spec, users, _) in generation.options().items():
        low, high = ("" if v is None else f"{v:g}" for v in (spec.low, spec.high))
        bounds = f" in [{low or '-inf'}, {high or 'inf'}]" if low or high else ""
        gen.add_argument(
            "--" + name.replace("_", "-"),
            **_argument_type(spec),
            choices=spec.choices,
            default=None,
            help=f"{spec.help or name}{bounds} (default {spec.default}; for {', '.join(users)})",
        )
    gen.add_argument("--corrector-steps", type=int, default=0, help="Langevin corrector steps per noise level")
    gen.add_argument("--steps", type=int, default=25, help="denoising steps (score samplers: noise levels)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--num-images", type=int, default=4)
    gen.add_argument("--out", type=Path, default=Path("out"), help="output folder (files are never overwritten)")
    gen.add_argument("--device", default=None)


def _add_protect(commands: argparse._SubParsersAction) -> None:
    """``steerguard protect``: image files -> protected PNG files and a JSON report."""
    prot = commands.add_parser(
        "protect",
        help="protect image files against mimicry (PNG outputs next to a JSON report)",
        description="Protect images at their native resolution against the photo demo VAE (demo/photo_vae): "
        "'amortized' (the default) runs the photo amortized protector (one forward pass per image, less of the "
        "budget on flat regions), 'amortized-full' the same at the full budget everywhere (as visible as PGD, and "
        "as damaging), 'photoguard', 'mist' and 'sds' an L-infinity PGD attack (Mist's semantic part and "
        "Diff-Protect's SDS+: the photo latent model demo/photo_ldm), 'aspl' Anti-DreamBooth (PGD against a copy of "
        "that model fine-tuned on each image's 128 px crops as it goes, against DreamBooth / LoRA fine-tuning)."
        " Outputs are PNG files of the same size and mode (RGB, RGBA, L, LA; other modes become RGB/RGBA) in "
        "--out, with a JSON report; no existing file is ever overwritten (a numbered suffix is added). The "
        "report and the output say per file whether the protection survives JPEG q75 and noisy upscaling "
        "(protect.survival). Exit code 2 if any input failed (the others are still protected).",
    )
    prot.add_argument("inputs", nargs="+", type=Path, help="image files (PNG, JPEG, WebP, BMP, TIFF)")
    prot.add_argument("--out", type=Path, required=True, help="output folder")
    prot.add_argument("--method", choices=PROTECT_METHODS, default="amortized")
    prot.add_argument("--eps", type=float, default=8.0, help="L-infinity budget in 1/255 units (default 8)")
    prot.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"PGD steps of photoguard, mist, sds and aspl (default {DEFAULT_PGD_STEPS}, aspl {DEFAULT_ASPL_STEPS}: "
        "see benchmarks/RESULTS.md)",
    )
    prot.add_argument("--seed", type=int, default=0, help="seed of the PGD start (image i uses seed + i)")
    prot.add_argument("--device", default=None)


def _add_detect(commands: argparse._SubParsersAction) -> None:
    """``steerguard detect``: image files -> one verdict per file."""
    det = commands.add_parser(
        "detect",
        help="flag adversarial (protected) images with the EPS-AD detector",
        description="Score images with a saved native-resolution EPS-AD detector: each image on its own pixels, "
        "as patches of the score model's size (all tiles, or a seeded sample past the detector's cap; never "
        "resized), and print one verdict per file with what was scored. Exit code 2 if any input failed or no "
        "detector is available.",
    )
    det.add_argument("inputs", nargs="+", type=Path, help="image files (PNG, JPEG, WebP, BMP, TIFF)")
    det.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per line: file, score, threshold, verdict, resolution, patch_size, patches, tiles, "
        "score_model, score_dtype, calibrated_fpr (--patches adds the per-patch scores and positions)",
    )
    det.add_argument("--patches", action="store_true", help="with --json: include the per-patch scores")
    det.add_argument("--detector", type=Path, default=None, help="saved detector folder (default: the demo one)")
    det.add_argument("--device", default=None)
    det.add_argument("--dtype", **DTYPE_OPTION)


def _add_train(commands: argparse._SubParsersAction) -> None:
    """``steerguard train [photo | protector | detector] ...``: the training commands."""
    train = commands.add_parser(
        "train",
        help="train the embedded demo models (python -m apps.demo.train), with 'photo' the photo demo models "
        "(python -m apps.demo.train_photo), with 'protector' an amortized protector (python -m "
        "apps.train_protector; accelerate launch -m apps.train_protector for several GPUs), or with 'detector' a "
        "native-resolution EPS-AD detector for any unconditional diffusers pixel model "
        "(steerguard train detector --score-model ID --clean DIR [--attacked DIR] --out DIR)",
    )
    train.add_argument(
        "args",
        nargs=argparse.REMAINDER,
        help="arguments for apps.demo.train, apps.demo.train_photo or apps.train_protector",
    )


def _add_evaluate(commands: argparse._SubParsersAction) -> None:
    """``steerguard evaluate``: protections against mimicry on the demo models."""
    ev = commands.add_parser(
        "evaluate",
        help="evaluate protections against mimicry on the demo models (SDEdit, LoRA; JPEG, resize, noise, blur, "
        "noisy upscaling, DiffPure, IMPRESS; the worst case per method)",
        description="Protect held-out demo images with each method, purify them, mimic them with SDEdit and a "
        "LoRA fine-tune of the demo DiT, and report invisibility against the damage to the mimicry. Methods: "
        "photoguard, mist, sds (SDS+), sds- (SDS-), aspl (Anti-DreamBooth, fine-tuning the demo DiT on the images' "
        "classes), amortized, amortized-full (full budget on flat regions too), "
        "noise (random "
        "signs, the naive baseline); 'photoguard@10' sets the "
        "PGD steps. Random noise of the same budget is always a row (random_noise). Writes a JSON report (never "
        "overwriting a file) and prints a Markdown table and the worst case over purifications per method.",
    )
    ev.add_argument("--methods", nargs="+", default=None, help="default: photoguard amortized noise (photos: no noise)")
    ev.add_argument("-n", "--num-images", type=int, default=None, help="images (default 64; --photos: 4 crops)")
    ev.add_argument("--eps", type=float, default=8.0, help="L-infinity budget in 1/255 (default 8)")
    ev.add_argument("--steps", type=int, default=None, help="PGD steps (default 100; --photos: 20)")
    ev.add_argument(
        "--photos",
        action="store_true",
        help="evaluate on native-resolution crops of the held-out photos (apps.demo.photos.HELD_OUT) against each "
        "--vae: PSNR/SSIM, latent distortion per VAE and SDEdit mimicry through --ldm after each purification; "
        "methods photoguard, mist, sds, sds-, aspl (PGD on the first --vae; mist, sds/sds- and aspl need --ldm, "
        "which aspl fine-tunes), amortized, "
        "amortized-full",
    )
    ev.add_argument(
        "--vae",
        action="append",
        default=None,
        help="with --photos, repeatable: demo/<name>, a local AutoencoderKL folder or a hub id such as "
        "stabilityai/sd-vae-ft-mse (safetensors only; default the photo VAEs demo/photo_vae demo/photo_vae_b)",
    )
    ev.add_argument(
        "--ldm",
        default=None,
        help="with --photos: unconditional latent diffusion model of the first --vae (demo/<name>, a folder with "
        "unet/ scheduler/ latent_vae.json, or a hub id): Mist/SDS's semantic part and the SDEdit mimicry "
        "(default demo/photo_ldm when committed and the first --vae is demo/photo_vae; 'none': no mimicry)",
    )
    ev.add_argument("--size", type=int, default=None, help="with --photos: crop side in pixels (default 256, max 400)")
    ev.add_argument("--tile", type=int, default=None, help="with --photos: PGD tile side (default 128; 0: whole crop)")
    ev.add_argument(
        "--strengths",
        type=float,
        nargs="+",
        default=None,
        help="SDEdit strengths (default 0.2 0.4; --photos: one strength, default 0.3)",
    )
    ev.add_argument(
        "--lora-steps", type=int, default=None, help="LoRA fine-tuning steps (default 100, 0: no LoRA; not --photos)"
    )
    ev.add_argument("--protector", type=Path, default=None, help="amortized protector folder (default: demo)")
    ev.add_argument(
        "--purifications",
        nargs="+",
        default=None,
        help="purifications applied before mimicry (default: none jpeg90 jpeg75 jpeg50 resize0.5 noise4 blur1 "
        "noisy_upscale diffpure impress; diffpure uses --pixel-model, impress the demo VAE)",
    )
    ev.add_argument(
        "--pixel-model",
        default=None,
        help="unconditional pixel diffusion model of the diffpure purification (demo/<name>, folder or hub id; "
        "default demo/unet, with --photos demo/photo_unet, trained on photos)",
    )
    ev.add_argument("--json", type=Path, default=None, help="write the full report here")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--device", default=None)


def _app(args: argparse.Namespace) -> int:
    from .app import build_app, launch_options

    limits = Limits(
        max_seconds=args.max_seconds or None,
        time_limit=args.time_limit or None,
        max_pixels=args.max_pixels,
        max_files=args.max_files,
        output_age=args.output_age,
        max_pipelines=args.max_pipelines,
        allow_hub=args.allow_hub,
    )
    app = build_app(args.model, args.device, detector=args.detector, limits=limits, detect_dtype=args.detect_dtype)
    app.launch(server_name=args.host, server_port=args.port, **launch_options(limits, mcp=args.mcp))
    return 0


def _train(args: argparse.Namespace) -> int:
    if args.args[:1] == ["protector"]:
        from .train_protector import main as train_protector

        return train_protector(args.args[1:])
    if args.args[:1] == ["photo"]:
        from .demo.train_photo import main as train_photo

        train_photo(args.args[1:])
        return 0
    if args.args[:1] == ["detector"]:
        from .train_detector import main as train_detector

        return train_detector(args.args[1:])
    from .demo.train import main as train_main

    train_main(args.args)
    return 0


def _check_out(folder: Path) -> None:
    """Refuse an ``--out`` that cannot be an output folder before any work is done."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {folder} exists and is not a folder; name a folder (it is created if missing)")
    for parent in folder.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out {folder}: {parent} is a file, not a folder")
            break


def _argument_type(spec) -> dict:
    """argparse options for a registry input: its type (a number input also takes its keywords, e.g. "off")."""
    if spec.type is bool:
        return {"action": argparse.BooleanOptionalAction}

    def convert(text: str):
        return text if text in spec.keywords else spec.type(text)

    convert.__name__ = spec.type.__name__  # argparse names the type in its error messages
    return {"type": convert}


def _generate(args: argparse.Namespace) -> int:
    import dataclasses

    from .files import save_new
    from .generate import Request
    from .services import generate_images, load_pipeline

    _check_out(args.out)
    fields = {f.name for f in dataclasses.fields(Request)}
    values = {name: getattr(args, name) for name in generation.options() if getattr(args, name) is not None}
    request = Request(
        args.subject,
        method=args.method,
        perturbation=args.perturbation,
        sampler=args.sampler,
        steps=args.steps,
        seed=args.seed,
        num_images=args.num_images,
        corrector_steps=args.corrector_steps,
        **{k: v for k, v in values.items() if k in fields},
        extra=tuple((k, v) for k, v in values.items() if k not in fields),
    )
    images = generate_images(load_pipeline(args.model, args.device), request)
    stem = f"{args.subject[:40].replace(' ', '_').replace('/', '_')}-{args.method}-s{request.scale:g}-seed{args.seed}"
    for i, image in enumerate(images):
        print(save_new(image, args.out, f"{stem}-{i}"))
    return 0


def _evaluate(args: argparse.Namespace) -> int:

    from . import evaluation

    if args.photos:
        return _evaluate_photos(args)
    photo_only = [
        flag
        for flag, value in (("--vae", args.vae), ("--size", args.size), ("--tile", args.tile), ("--ldm", args.ldm))
        if value is not None
    ]
    if photo_only:
        raise ValueError(f"{', '.join(photo_only)} apply to --photos only (the shapes evaluation uses the demo VAEs)")
    args.strengths = [0.2, 0.4] if args.strengths is None else args.strengths
    args.lora_steps = 100 if args.lora_steps is None else args.lora_steps
    args.methods = args.methods or ["photoguard", "amortized", "noise"]
    args.num_images = 64 if args.num_images is None else args.num_images
    args.steps = 100 if args.steps is None else args.steps
    unknown = [m for m in args.methods if m.partition("@")[0] not in evaluation.PROTECTIONS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {evaluation.PROTECTIONS}")
    if not 2 <= args.num_images <= 4096 or not 0 < args.eps <= 64 or args.steps < 1 or args.lora_steps < 0:
        raise ValueError("need 2 <= -n <= 4096, 0 < --eps <= 64, --steps >= 1 and --lora-steps >= 0")
    if any(not 0 < s <= 1 for s in args.strengths):
        raise ValueError("SDEdit strengths must lie in (0, 1]")
    result = evaluation.run(
        args.methods,
        n=args.num_images,
        eps=args.eps / 255,
        steps=args.steps,
        strengths=args.strengths,
        lora_steps=args.lora_steps,
        protector=args.protector,
        device=args.device,
        seed=args.seed,
        **({"pixel_model": args.pixel_model} if args.pixel_model else {}),
        **({"purifications": args.purifications} if args.purifications else {}),
    )
    _report(args, result)
    return 0


def _evaluate_photos(args: argparse.Namespace) -> int:
    from protect.purify import EVALUATION

    from . import evaluation

    if args.lora_steps is not None:
        raise ValueError("--lora-steps does not apply to --photos (its mimicry is SDEdit through --ldm)")
    vaes = args.vae or evaluation.default_photo_vaes()
    if args.ldm is None:  # the photo latent model when the attacked VAE is the one it was trained on
        ldm = evaluation.default_photo_ldm() if vaes[0] == "demo/photo_vae" else None
    else:
        ldm = None if args.ldm == "none" else args.ldm
    if args.strengths is not None and (ldm is None or len(args.strengths) != 1):
        raise ValueError("with --photos, --strengths takes one SDEdit strength and needs a latent model (--ldm)")
    strength = 0.3 if args.strengths is None else args.strengths[0]
    n = 4 if args.num_images is None else args.num_images
    steps = 20 if args.steps is None else args.steps
    size = 256 if args.size is None else args.size
    tile = 128 if args.tile is None else args.tile
    if not 1 <= n <= 256 or not 0 < args.eps <= 64 or not 1 <= steps <= 1000 or tile < 0:
        raise ValueError("need 1 <= -n <= 256, 0 < --eps <= 64, 1 <= --steps <= 1000 and --tile >= 0")
    result = evaluation.run_photos(
        args.methods or ["photoguard", "amortized"],
        vaes=vaes,
        n=n,
        size=size,
        eps=args.eps / 255,
        steps=steps,
        tile=tile or None,
        purifications=args.purifications or EVALUATION,
        protector=args.protector,
        **({"pixel_model": args.pixel_model} if args.pixel_model else {}),
        ldm=ldm,
        sdedit_strength=strength,
        device=args.device,
        seed=args.seed,
    )
    print(evaluation.PHOTO_NOTE + "\n")
    _report(args, result)
    return 0


def _report(args: argparse.Namespace, result: dict) -> None:
    """Print an evaluation's rows and worst case as Markdown; write the JSON report to a new file (``--json``)."""
    from . import evaluation
    from .files import write_new

    print(evaluation.markdown(result))
    print("\nworst case over purifications (the purification under which the protection does the least damage):")
    print(evaluation.markdown_worst_case(result))
    print("seconds per image: " + ", ".join(f"{k} {v:.4f}" for k, v in result["seconds_per_image"].items()))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        path = write_new(json.dumps(result, indent=1), args.json.parent, args.json.stem, args.json.suffix or ".json")
        print(f"report: {path}")


def _distributed(device: str | None):
    """``accelerate``'s process state and this process's device (``accelerate launch`` splits the files)."""
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu")
    return state, device if device is not None else str(state.device)


def _gathered(state, items: list) -> list:
    """Every process's items, in process order (a no-op with one process)."""
    if state.num_processes == 1:
        return items
    from accelerate.utils import gather_object

    return gather_object(items)


def _protect(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from protect.survival import MARGIN

    from .files import write_new
    from .services import check_protect_options

    _check_out(args.out)
    args.steps = default_steps(args.method) if args.steps is None else args.steps
    check_protect_options(args.method, args.eps, args.steps, args.seed)
    state, device = _distributed(args.device)
    done, failed = [], []
    with state.split_between_processes(list(enumerate(args.inputs))) as mine:
        work = tqdm(
            mine,
            desc=f"protect ({args.method})",
            unit="image",
            file=sys.stderr,
            disable=not state.is_local_main_process,
        )
        for i, path in work:  # image i always gets seed + i, whatever the number of processes
            _protect_one(args, i, path, device, done, failed)
    done, failed = _gathered(state, done), _gathered(state, failed)
    if not state.is_main_process:
        state.wait_for_everyone()  # until the main process has written the report (a non-zero exit ends them all)
        return 0
    report = {
        "method": args.method,
        "eps_255": args.eps,
        "steps": None if args.method in AMORTIZED_BUDGETS else args.steps,  # the amortized protector: one pass
        "seed": None if args.method in AMORTIZED_BUDGETS else args.seed,
        "model": PROTECT_VAE
        + (f", amortized protector demo/{PROTECTOR_NAME}" if args.method in AMORTIZED_BUDGETS else "")
        + (f", latent model {PROTECT_LDM}" if args.method in LATENT_METHODS else ""),
        "processes": state.num_processes,
        "survival_rule": "per file, 'survival': the latent distortion in the photo VAE after JPEG q75 and noisy "
        "upscaling (bicubic), against same-budget random noise after the same purification; 'survives' when it is "
        f">= {MARGIN:g}x the noise's (protect.survival)",
        "files": done,
        "failed": failed,
    }
    print(write_new(json.dumps(report, indent=2), args.out, "report"))
    state.wait_for_everyone()  # a no-op with one process
    if failed:
        names = ", ".join(f["input"] for f in failed)
        print(f"steerguard protect: {len(failed)} of {len(args.inputs)} input(s) failed: {names}", file=sys.stderr)
        return 2
    return 0


def _message(error: Exception) -> str:
    """A per-file error for the user: running out of memory says what to do about it."""
    if isinstance(error, torch.OutOfMemoryError):
        return "out of memory: process it alone, on a larger device, or at a smaller size"
    return str(error)


def _protect_one(args: argparse.Namespace, i: int, path: str, device: str, done: list, failed: list) -> None:
    from tqdm.auto import tqdm

    from .files import open_upload, save_new
    from .services import protect_image

    try:
        upload = open_upload(path)
        protected, metrics = protect_image(
            upload.image,
            method=args.method,
            eps=args.eps / 255,
            steps=args.steps,
            seed=args.seed + i,
            device=device,
            mode=upload.mode,
            icc_profile=upload.icc_profile,
        )
    except (ValueError, OSError, torch.OutOfMemoryError) as error:  # one file's failure, the batch goes on
        failed.append({"input": str(path), "error": _message(error)})
        tqdm.write(f"steerguard protect: error: {_message(error)}", file=sys.stderr)
        return
    output = save_new(protected, args.out, f"{upload.name}-protected")
    w, h = upload.size
    done.append(
        {
            "input": str(path),
            "output": str(output),
            "size": [w, h],
            "mode": upload.mode,
            "output_mode": protected.mode,
            **metrics,
        }
    )
    print(output)
    if "survival" in metrics:
        from protect.survival import describe

        print(f"  survival: {describe(metrics['survival'])}")


def _detect(args: argparse.Namespace) -> int:
    from .files import open_upload
    from .services import describe_result, detect_images, load_detector

    state, device = _distributed(args.device)
    detector = load_detector(args.detector, device, args.dtype)
    lines = []  # (input index, stream, text): printed by the main process in input order
    with state.split_between_processes(list(enumerate(args.inputs))) as mine:
        for i, path in mine:
            try:
                (result,) = detect_images(detector, [open_upload(path, purpose="detect").image])
            except (ValueError, OSError, torch.OutOfMemoryError) as error:  # one file's failure, the rest goes on
                if args.json:
                    lines.append((i, "out", json.dumps({"file": str(path), "error": _message(error)})))
                lines.append((i, "err", f"steerguard detect: error: {_message(error)}"))
                continue
            if args.json:
                if not args.patches:
                    result = {k: v for k, v in result.items() if k not in ("patch_scores", "patch_positions")}
                lines.append((i, "out", json.dumps({"file": str(path), **result})))
            else:
                lines.append((i, "out", f"{path}: {describe_result(result)}"))
    lines = _gathered(state, lines)  # every process's, so that a failure in one share stops none of the others
    if not state.is_main_process:
        state.wait_for_everyone()
        return 0
    for _, stream, text in sorted(lines, key=lambda line: line[0]):
        print(text, file=sys.stdout if stream == "out" else sys.stderr, flush=True)
    failed = len({i for i, stream, _ in lines if stream == "err"})
    state.wait_for_everyone()  # a no-op with one process
    if failed:
        print(f"steerguard detect: {failed} of {len(args.inputs)} input(s) failed", file=sys.stderr)
        return 2
    return 0


RUNNERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "app": _app,
    "generate": _generate,
    "protect": _protect,
    "detect": _detect,
    "train": _train,
    "evaluate": _evaluate,
}


if __name__ == "__main__":
    sys.exit(main())
