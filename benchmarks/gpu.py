"""Every GPU figure of the project in one run (about 3 minutes on an H200), one JSON and the RESULTS rows.

Sections, each timed side by side against the peer it names (see the other ``bench_*`` scripts for the same
measurements one at a time):

- ``sdxl``: full-size SDXL UNet architecture (random weights) at 1024x1024 in float16: the pipeline's own CFG
  (peer), ``guide`` CFG, APG in x0 and model space, CFG + PAG ours vs diffusers' ``StableDiffusionXLPAGPipeline``,
  per step and peak memory;
- ``sd3``, ``flux``: SD3-medium and FLUX.1-dev transformer architectures (random weights, bfloat16, 1024x1024):
  the pipeline's CFG / true CFG (peer) against ``guide`` CFG, APG and CFG + PAG (SD3: and diffusers' SD3 PAG
  pipeline);
- ``protect``: the photo amortized protector and one PhotoGuard PGD step against the Stable Diffusion VAE
  architecture, seconds per image at 512x512 and 1024x1024 in batches of 4, float32 and float16; one ASPL round
  (every weight, and LoRA) with the Stable Diffusion UNet architecture against 6 PhotoGuard steps at 512x512;
- ``eps``: EPS-AD's expected perturbation score with the noise levels batched vs one level at a time (the demo
  detector and its score model), images per second;
- ``app``: ``steerguard app`` on the device, median latency of ``/generate``, ``/protect`` and ``/detect``;
- ``cuda_tests``: the CUDA-only tests (``pytest -m cuda``: float16/bfloat16 through ``guide()``, protection
  in half precision).

A section that fails is recorded with its error and the run goes on; sections that would start after
``--budget`` seconds are skipped. ``--dry-run`` runs the same code paths at tiny sizes on the CPU (under two
minutes; the suite runs it), so the script cannot rot before a GPU is lent.

    python -m benchmarks.gpu                      # on a CUDA machine: benchmarks/results/gpu-<date>.{json,md}
    python -m benchmarks.gpu --dry-run --out /tmp/gpu-dry
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Context:
    """What every section needs: the device, the sizes of this run, and where to write."""

    device: str
    dry_run: bool
    out: Path
    steps: int
    repeats: int
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def dtype(self, half: torch.dtype) -> torch.dtype:
        """``half`` on a GPU, float32 on the CPU (half-precision kernels are slow or missing there)."""
        return half if self.cuda else torch.float32

    def size(self, full: int, tiny: int = 64) -> int:
        return tiny if self.dry_run else full


# ----------------------------------------------------------------------------- timing


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def side_by_side(ctx: Context, settings: dict[str, Callable[[], None]], per: int = 1) -> dict[str, dict[str, Any]]:
    """Each setting once per repeat in a rotating order (after one warm-up each): median/min seconds per ``per``
    units of work and the peak device memory (GiB, CUDA only)."""
    names = list(settings)
    times: dict[str, list[float]] = {name: [] for name in names}
    peaks: dict[str, float | None] = dict.fromkeys(names)
    for name in names:
        settings[name]()
    for repeat in range(ctx.repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            if ctx.cuda:
                torch.cuda.reset_peak_memory_stats()
            sync(ctx.device)
            start = time.perf_counter()
            settings[name]()
            sync(ctx.device)
            times[name].append((time.perf_counter() - start) / per)
            if ctx.cuda:
                peaks[name] = max(peaks[name] or 0.0, torch.cuda.max_memory_allocated() / 2**30)
    return {
        name: {"median_s": statistics.median(t), "min_s": min(t), "peak_gib": peaks[name]} for name, t in times.items()
    }


def per_step_rows(rows: list[dict[str, Any]], what: str, model, size: int, dtype: torch.dtype) -> list[dict[str, Any]]:
    """``rows`` labelled with the denoiser's size and the call's shape."""
    params = sum(p.numel() for p in model.parameters()) / 1e6
    for row in rows:
        row["shape"] = f"{what} {params:.0f} M params, {size}x{size}, batch 1, {dtype}, per step"
    return rows


def ratios(results: dict[str, dict[str, Any]], peer: str) -> list[dict[str, Any]]:
    """The rows of one side-by-side table, each with its ratio to ``peer``'s median."""
    base = results[peer]["median_s"]
    return [{"setting": name, **r, "ratio": r["median_s"] / base, "peer": peer} for name, r in results.items()]


# ----------------------------------------------------------------------------- guidance sections


def pipeline_call(ctx: Context, pipe, call: dict[str, Any]) -> Callable[..., Callable[[], None]]:
    """``timed(target, methods=(), sequential=False, **extra)``: one seeded call of ``target`` under ``guide``."""
    from guidance import guide

    def timed(target, methods=(), sequential=False, **extra) -> Callable[[], None]:
        def once() -> None:
            generator = torch.Generator(ctx.device).manual_seed(0)
            with guide(pipe, *methods, sequential=sequential) if methods else contextlib.nullcontext():
                target(**call, **extra, generator=generator)

        return once

    return timed


def section_sdxl(ctx: Context) -> list[dict[str, Any]]:
    from diffusers import StableDiffusionXLPAGPipeline

    from benchmarks.common import build
    from guidance import APG, CFG, PAG

    dtype = ctx.dtype(torch.float16)
    pipe, embeds = build("small" if ctx.dry_run else "sdxl", ctx.device, dtype)
    size = ctx.size(1024)
    call = dict(embeds, height=size, width=size, num_inference_steps=ctx.steps, output_type="latent")
    theirs = StableDiffusionXLPAGPipeline(**pipe.components, pag_applied_layers=["mid"])
    theirs.set_progress_bar_config(disable=True)
    timed = pipeline_call(ctx, pipe, call)
    pag = (CFG(5.0), PAG(3.0, layers=("mid",)))
    results = side_by_side(
        ctx,
        {
            "pipeline CFG (peer)": timed(pipe, guidance_scale=5.0),
            "guide CFG": timed(pipe, (CFG(5.0),)),
            "guide APG x0": timed(pipe, (APG(5.0),)),
            "guide APG model": timed(pipe, (APG(5.0, space="model"),)),
            "diffusers SDXL PAG pipeline, CFG + PAG mid": timed(theirs, guidance_scale=5.0, pag_scale=3.0),
            "guide CFG + PAG mid": timed(pipe, pag),
            "guide CFG + PAG mid, sequential": timed(pipe, pag, sequential=True),
        },
        per=ctx.steps,
    )
    rows = ratios(results, "pipeline CFG (peer)")
    peer_pag = results["diffusers SDXL PAG pipeline, CFG + PAG mid"]["median_s"]
    rows.append(
        {
            "setting": "guide CFG + PAG mid over diffusers' PAG pipeline",
            "ratio": results["guide CFG + PAG mid"]["median_s"] / peer_pag,
            "peer": "diffusers SDXL PAG pipeline, CFG + PAG mid",
        }
    )
    return per_step_rows(rows, "UNet", pipe.unet, size, dtype)


SD3_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
)
SD3_TINY = dict(SD3_MEDIUM, sample_size=8, patch_size=1, num_layers=2, attention_head_dim=8, num_attention_heads=2)
SD3_TINY.update(joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16)
FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
SINGLE_BLOCK_0 = "single_transformer_blocks.0"
FLUX_TINY = dict(FLUX_DEV, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2)
FLUX_TINY.update(joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))


def flow_vae(device: str, dtype: torch.dtype):
    """A small 16-channel AutoencoderKL with SD3/FLUX's 8x downsampling (``output_type="latent"`` never runs it)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=16,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    ).to(device, dtype)


def random_transformer(cls, config: dict[str, Any], device: str, dtype: torch.dtype):
    """``cls(**config)`` with seeded random weights, built on ``device`` (a 12 B model never visits the CPU)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(**config)
    return model.to(dtype).eval().requires_grad_(False)


def text_embeddings(ctx: Context, tokens: int, width: int, pooled: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random prompt and negative-prompt embeddings (the text encoders are not part of what is timed)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name in ("", "negative_"):
        out[f"{name}prompt_embeds"] = torch.randn(1, tokens, width, generator=g)
        out[f"{name}pooled_prompt_embeds"] = torch.randn(1, pooled, generator=g)
    return {k: v.to(ctx.device, dtype) for k, v in out.items()}


def section_sd3(ctx: Context) -> list[dict[str, Any]]:
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3PAGPipeline,
        StableDiffusion3Pipeline,
    )

    from guidance import APG, CFG, PAG

    dtype = ctx.dtype(torch.bfloat16)
    config = SD3_TINY if ctx.dry_run else SD3_MEDIUM
    transformer = random_transformer(SD3Transformer2DModel, config, ctx.device, dtype)
    components = dict(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=flow_vae(ctx.device, dtype),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe = StableDiffusion3Pipeline(**components)
    theirs = StableDiffusion3PAGPipeline(**components, pag_applied_layers=["blocks.1"])
    for p in (pipe, theirs):
        p.set_progress_bar_config(disable=True)
    size = ctx.size(1024)
    embeds = text_embeddings(ctx, 333, config["joint_attention_dim"], config["pooled_projection_dim"], dtype)
    call = dict(embeds, height=size, width=size, num_inference_steps=ctx.steps, output_type="latent")
    timed = pipeline_call(ctx, pipe, call)
    pag = PAG(3.0, layers=("blocks.1",), joint="image")  # diffusers' SD3 PAG processor leaves the text tokens alone
    results = side_by_side(
        ctx,
        {
            "pipeline CFG (peer)": timed(pipe, guidance_scale=5.0),
            "guide CFG": timed(pipe, (CFG(5.0),)),
            "guide APG x0": timed(pipe, (APG(5.0),)),
            "diffusers SD3 PAG pipeline, CFG + PAG blocks.1": timed(theirs, guidance_scale=5.0, pag_scale=3.0),
            "guide CFG + PAG blocks.1 (joint=image)": timed(pipe, (CFG(5.0), pag)),
        },
        per=ctx.steps,
    )
    return per_step_rows(ratios(results, "pipeline CFG (peer)"), "SD3 transformer", transformer, size, dtype)


def section_flux(ctx: Context) -> list[dict[str, Any]]:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from guidance import APG, CFG, PAG

    dtype = ctx.dtype(torch.bfloat16)
    config = FLUX_TINY if ctx.dry_run else FLUX_DEV
    transformer = random_transformer(FluxTransformer2DModel, config, ctx.device, dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=flow_vae(ctx.device, dtype),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    size = ctx.size(1024)
    embeds = text_embeddings(ctx, 512, config["joint_attention_dim"], config["pooled_projection_dim"], dtype)
    call = dict(embeds, height=size, width=size, num_inference_steps=ctx.steps, output_type="latent")
    call["guidance_scale"] = 3.5
    timed = pipeline_call(ctx, pipe, call)
    results = side_by_side(
        ctx,
        {
            "pipeline true CFG (peer)": timed(pipe, true_cfg_scale=4.0),
            "guide CFG": timed(pipe, (CFG(4.0),)),
            "guide APG x0": timed(pipe, (APG(4.0),)),
            "guide CFG + PAG single block 0": timed(pipe, (CFG(4.0), PAG(3.0, layers=(SINGLE_BLOCK_0,)))),
        },
        per=ctx.steps,
    )
    return per_step_rows(ratios(results, "pipeline true CFG (peer)"), "FLUX transformer", transformer, size, dtype)


# ----------------------------------------------------------------------------- protection and detection


def sd_vae(ctx: Context, dtype: torch.dtype):
    """The Stable Diffusion 1.x/2.x VAE architecture (83 M parameters; a small one in a dry run), random weights."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    widths = (32, 32) if ctx.dry_run else (128, 256, 512, 512)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths),
        block_out_channels=widths,
        layers_per_block=2,
        latent_channels=4,
        scaling_factor=0.18215,
    )
    return vae.to(ctx.device, dtype).eval().requires_grad_(False)


def photos(n: int, size: int, device: str) -> torch.Tensor:
    """``n`` scikit-image photos (astronaut, coffee, chelsea, rocket, ...) resized to ``size`` in [0, 1]."""
    import torch.nn.functional as F
    from skimage import data

    names = ("astronaut", "coffee", "chelsea", "rocket")
    out = []
    for i in range(n):
        picture = torch.from_numpy(getattr(data, names[i % len(names)])().copy()).permute(2, 0, 1).float()[None] / 255
        out.append(F.interpolate(picture, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
    return torch.cat(out).clamp(0, 1).to(device)


def section_protect(ctx: Context) -> list[dict[str, Any]]:
    from protect import AmortizedProtector

    protector = AmortizedProtector.from_pretrained(str(ROOT / "demo_models" / "photo_protector")).to(ctx.device)
    batch = 2 if ctx.dry_run else 4
    rows = []
    for dtype in (torch.float32, torch.float16) if ctx.cuda else (torch.float32,):
        vae = sd_vae(ctx, dtype)
        for size in (ctx.size(512, 64), ctx.size(1024, 96)):
            rows += protect_rows(ctx, vae, protector, photos(batch, size, ctx.device).to(dtype))
    return rows + aspl_rows(ctx, sd_vae(ctx, torch.float32), photos(batch, ctx.size(512, 64), ctx.device))


class TextConditioned(torch.nn.Module):
    """A text-conditional UNet as ASPL's denoiser ``eps(z_t, t)``, conditioned on an instance prompt's embeddings
    (random here, as the weights)."""

    def __init__(self, unet: torch.nn.Module, context: torch.Tensor) -> None:
        super().__init__()
        self.unet = unet
        self.register_buffer("context", context)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        context = self.context.expand(len(z), -1, -1).to(self.unet.dtype)
        return self.unet(z.to(self.unet.dtype), t, encoder_hidden_states=context).sample


def sd_unet(ctx: Context) -> torch.nn.Module:
    """The Stable Diffusion 1.x UNet architecture (860 M parameters; a small one in a dry run), random weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if ctx.dry_run:
        unet = UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=4,
        )
    else:
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    return unet.to(ctx.device).eval().requires_grad_(False)


def aspl_rows(ctx: Context, vae, images: torch.Tensor) -> list[dict[str, Any]]:
    """One ASPL round (3 + 3 fine-tune steps, 6 PGD steps; every weight, and LoRA rank 8) against the Stable
    Diffusion UNet and VAE architectures, beside 6 PhotoGuard PGD steps (peer), per image of the batch."""
    from protect import Finetune, protect

    unet = sd_unet(ctx)
    prompt = torch.randn(1, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(0))
    denoiser = TextConditioned(unet, prompt.to(ctx.device))
    n = len(images)

    def generator() -> torch.Generator:
        return torch.Generator(ctx.device).manual_seed(0)

    def aspl(rank: int | None) -> None:
        finetune = Finetune(steps=3, pgd_steps=6, lr=5e-6 if rank is None else 1e-4, rank=rank)
        protect(images, "aspl", vae=vae, denoiser=denoiser, steps=6, finetune=finetune, generator=generator())

    peer = "PhotoGuard, 6 PGD steps (peer)"
    settings = {peer: lambda: protect(images, "photoguard", vae=vae, steps=6, generator=generator())}
    settings["ASPL, one round, every weight"] = lambda: aspl(None)
    settings["ASPL, one round, LoRA rank 8"] = lambda: aspl(8)
    rows = ratios(side_by_side(ctx, settings, per=n), peer)
    for row in rows:
        row["shape"] = f"SD UNet and VAE architectures, {images.shape[-1]}x{images.shape[-1]}, batch {n}, per image"
    return rows


def protect_rows(ctx: Context, vae, protector, images: torch.Tensor) -> list[dict[str, Any]]:
    """The amortized protector (peer) against one PhotoGuard step on one batch, per image."""
    from protect import protect

    n, size = len(images), images.shape[-1]

    def photoguard_step() -> None:
        generators = [torch.Generator(ctx.device).manual_seed(i) for i in range(n)]
        protect(images, "photoguard", vae=vae, steps=1, generator=generators)

    settings = {
        "amortized protector (one pass)": lambda: protect(images, "amortized", vae=vae, protector=protector),
        "PhotoGuard, one PGD step": photoguard_step,
    }
    rows = ratios(side_by_side(ctx, settings, per=n), "amortized protector (one pass)")
    for row in rows:
        row["shape"] = f"SD VAE architecture, {size}x{size}, batch {n}, {images.dtype}, per image"
    return rows


def section_eps(ctx: Context) -> list[dict[str, Any]]:
    from apps.models import load_score_model
    from benchmarks.bench_detection import eps_per_level_loop
    from protect import EPSDetector
    from protect.detector import evaluations_per_pass

    unet, scheduler = load_score_model(str(ROOT / "demo_models" / "unet_eps"), ctx.device)
    detector = EPSDetector.from_pretrained(ROOT / "demo_models" / "eps_detector", unet, scheduler)
    size = unet.config.sample_size
    n = 8 if ctx.dry_run else 512
    images = photos(4, size, ctx.device).repeat((n + 3) // 4, 1, 1, 1)[:n] * 2 - 1
    batched = detector.eps(images)
    looped = eps_per_level_loop(detector, images)
    c = detector.config
    settings = {"per-level loop (peer)": lambda: eps_per_level_loop(detector, images)}
    default = evaluations_per_pass(c.batch_size, images.device, size, size)
    settings[f"detector.eps, {default} evaluations per pass (its default here)"] = lambda: detector.eps(images)
    for per_pass in (n, n * c.timesteps // 4):  # the loop's pass size, and a quarter of all N T evaluations
        settings[f"batched, {per_pass} evaluations per pass"] = functools.partial(detector.eps, images, per_pass)
    results = side_by_side(ctx, settings, per=n)
    rows = ratios(results, "per-level loop (peer)")
    for row in rows:
        row["images_per_s"] = 1 / row["median_s"]
        row["shape"] = f"{n} images {size}x{size}, {c.timesteps} levels, per image"
        row["max_abs_difference"] = float((batched - looped).abs().max())
    return rows


# ----------------------------------------------------------------------------- the app and the CUDA tests


GENERATE = dict(  # the README's /generate call: APG 6 with SoftPAG 2 on the demo DiT, 25 DPM++ steps, 4 images
    subject="star",
    method="apg",
    scale=6,
    eta=0,
    threshold=None,
    momentum=-0.5,
    perturbation="softpag",
    perturbation_scale=2,
    corrector_steps=0,
    steps=25,
    seed=0,
    num_images=4,
    compare=False,
)


def section_app(ctx: Context) -> list[dict[str, Any]]:
    from gradio_client import Client, handle_file

    from benchmarks.bench_load import free_port, wait_until_up

    port = free_port()
    log = ctx.out / "gpu-app.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, "-m", "apps.cli", "app", "--port", str(port), "--device", ctx.device]
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        startup = wait_until_up(url, process)
        client = Client(url, verbose=False)
        image = handle_file(str(sorted((ROOT / "apps" / "examples").glob("*.png"))[0]))
        calls = {
            "/generate": lambda: client.predict(**GENERATE, api_name="/generate"),
            "/protect": lambda: client.predict(files=[image], method="amortized", api_name="/protect"),
            "/detect": lambda: client.predict(files=[image], api_name="/detect"),
        }
        rows = []
        for name, call in calls.items():
            call()  # warm-up (first model load)
            times = []
            for _ in range(ctx.repeats):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            rows.append({"setting": name, "median_s": statistics.median(times), "min_s": min(times)})
        for row in rows:
            row["shape"] = f"demo models, one call at a time, app startup {startup:.1f} s"
        return rows
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def section_cuda_tests(ctx: Context) -> list[dict[str, Any]]:
    # the marked tests live in their own files: collecting the whole suite would import the app's dependencies
    where = sorted(
        str(path.relative_to(ROOT)) for path in (ROOT / "tests").glob("test_*.py") if "mark.cuda" in path.read_text()
    )
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", *where]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    summary = (done.stdout.strip().splitlines() or [""])[-1]
    if done.returncode not in (0, 5) or ("skipped" not in summary and "passed" not in summary):
        raise RuntimeError(f"pytest -m cuda exited {done.returncode}: {done.stdout[-2000:]}{done.stderr[-1000:]}")
    return [{"setting": "pytest -m cuda", "summary": summary, "median_s": time.perf_counter() - start}]


SECTIONS: dict[str, Callable[[Context], list[dict[str, Any]]]] = {
    "sdxl": section_sdxl,
    "sd3": section_sd3,
    "flux": section_flux,
    "protect": section_protect,
    "eps": section_eps,
    "app": section_app,
    "cuda_tests": section_cuda_tests,
}


# ----------------------------------------------------------------------------- report


def describe_machine(device: str) -> str:
    from benchmarks.common import cpu_model

    name = torch.cuda.get_device_name() if device.startswith("cuda") else cpu_model()
    return f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}"


def cell(row: dict[str, Any], key: str, fmt: str) -> str:
    return format(row[key], fmt) if row.get(key) is not None else ""


def markdown(report: dict[str, Any]) -> str:
    """The RESULTS rows: one table per section."""
    lines = [f"## GPU run {report['date']} ({'dry run, CPU' if report['dry_run'] else report['machine']})", ""]
    for name, section in report["sections"].items():
        lines.append(f"### {name} ({section['status']}, {section['seconds']:.0f} s)")
        if section["status"] != "ok":
            lines += ["", f"`{section.get('error', '')}`", ""]
            continue
        rows = section["rows"]
        if rows and "shape" in rows[0]:
            lines.append(f"{rows[0]['shape']}")
        lines += ["", "| setting | median s | min s | ratio | peak GiB | notes |", "|---|---|---|---|---|---|"]
        for row in rows:
            notes = ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in row.items()
                if k in ("images_per_s", "max_abs_difference", "summary")
            )
            cells = [cell(row, "median_s", ".4f"), cell(row, "min_s", ".4f"), cell(row, "ratio", ".3f")]
            lines.append(f"| {row['setting']} | {' | '.join(cells)} | {cell(row, 'peak_gib', '.2f')} | {notes} |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: the same code paths")
    parser.add_argument("--device", default=None, help="default: cuda when available (cpu for --dry-run)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--budget", type=float, default=480.0, help="no section starts after this many seconds")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per timed call (default 4; 1 dry)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per setting (default 3; 1 dry)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from apps.device import best_device

    args = parse_args(argv)
    device = args.device or ("cpu" if args.dry_run else str(best_device()[0]))
    args.out.mkdir(parents=True, exist_ok=True)
    ctx = Context(
        device=device,
        dry_run=args.dry_run,
        out=args.out,
        steps=args.steps or (1 if args.dry_run else 4),
        repeats=args.repeats or (1 if args.dry_run else 3),
    )
    if not ctx.cuda and not args.dry_run:
        print("warning: no CUDA device; running the full sizes on the CPU will take very long", file=sys.stderr)
    date = datetime.date.today().isoformat()
    report: dict[str, Any] = {
        "date": date,
        "machine": describe_machine(device),
        "device": device,
        "dry_run": args.dry_run,
        "steps": ctx.steps,
        "repeats": ctx.repeats,
        "sections": {},
    }
    started = time.perf_counter()
    for name in args.sections:
        if time.perf_counter() - started > args.budget:
            report["sections"][name] = {"status": "skipped (budget)", "seconds": 0.0, "rows": []}
            continue
        section_start = time.perf_counter()
        try:
            rows = SECTIONS[name](ctx)
            entry: dict[str, Any] = {"status": "ok", "rows": rows}
        except Exception as error:  # one failing section must not lose the others' figures
            traceback.print_exc()
            entry = {"status": "failed", "error": f"{type(error).__name__}: {error}", "rows": []}
        finally:
            gc.collect()  # the section's models (held in reference cycles by hooks) must not count in the next one
            if ctx.cuda:
                torch.cuda.empty_cache()
        entry["seconds"] = time.perf_counter() - section_start
        report["sections"][name] = entry
        print(f"{name}: {entry['status']} in {entry['seconds']:.1f} s", file=sys.stderr, flush=True)
    report["seconds"] = time.perf_counter() - started
    stem = f"gpu-{date}" + ("-dry" if args.dry_run else "")
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
