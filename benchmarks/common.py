"""Shared pieces of the benchmarks: random-weight SDXL-architecture pipelines and a side-by-side timer."""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from apps.device import best_device
from guidance import guide

SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SMALL_UNET = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    block_out_channels=(64, 128, 256),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 8),
    cross_attention_dim=256,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=32,
    projection_class_embeddings_input_dim=6 * 32 + 128,
)


def build(arch: str, device: str, dtype: torch.dtype):
    """An SDXL pipeline around a random-weight UNet; text encoders replaced by random embeddings."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    config = SDXL_UNET if arch == "sdxl" else SMALL_UNET
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).to(device).eval()
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
    ).to(device)
    if dtype != torch.float32:
        unet, vae = unet.to(dtype=dtype), vae.to(dtype=dtype)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    hidden, pooled = (
        config["cross_attention_dim"],
        config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"],
    )
    embeds = {
        "prompt_embeds": torch.randn(1, 77, hidden, generator=g),
        "negative_prompt_embeds": torch.randn(1, 77, hidden, generator=g),
        "pooled_prompt_embeds": torch.randn(1, pooled, generator=g),
        "negative_pooled_prompt_embeds": torch.randn(1, pooled, generator=g),
    }
    return pipe, {k: v.to(device, dtype) for k, v in embeds.items()}


def setup(
    doc: str, steps: int, repeats: int, options: Callable[[argparse.ArgumentParser], None] | None = None
) -> tuple[argparse.Namespace, object, dict, int]:
    """Parse the shared options (and a benchmark's own, added by ``options``) and build the pipeline:
    ``(args, pipe, embeddings, image size)``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if options is not None:
        options(parser)
    parser.add_argument("--arch", choices=["small", "sdxl"], default="small")
    parser.add_argument("--size", type=int, default=None, help="image size in pixels (latents are size/8)")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--device", default=str(best_device()[0]))
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    pipe, embeds = build(args.arch, args.device, getattr(torch, args.dtype))
    return args, pipe, embeds, args.size or (1024 if args.arch == "sdxl" else 256)


def timer(args: argparse.Namespace, pipe, call: dict) -> Callable[..., Callable[[], float]]:
    """``timed(target, methods=(), sequential=False, **extra)``: a function timing one call per step."""

    def timed(target, methods=(), sequential=False, **extra) -> Callable[[], float]:
        def once() -> float:
            generator = torch.Generator(args.device).manual_seed(0)
            with guide(pipe, *methods, sequential=sequential) if methods else contextlib.nullcontext():
                start = now(args.device)
                target(**call, **extra, generator=generator)
                return (now(args.device) - start) / args.steps

        return once

    return timed


def header(title: str, args: argparse.Namespace, pipe, size: int) -> str:
    params = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    return (
        f"# {title}: {args.arch} UNet ({params:.0f} M params), {size}x{size}, batch 1, {args.dtype}, "
        f"{args.steps} steps, {args.repeats} repeats, {device_name(args.device)}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}"
    )


def now(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """CPU model, torch threads and versions, for the header of a CPU benchmark."""
    return f"{cpu_model()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, {platform.python_version()}"


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else cpu_model()


def side_by_side(settings: dict[str, Callable[[], float]], repeats: int, device: str) -> dict[str, dict]:
    """Run every setting once per repeat in a rotating order (after one warm-up each); medians and peak memory.

    Each callable returns its own per-step time in seconds.
    """
    names = list(settings)
    for name in names:
        settings[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    peaks: dict[str, float] = {}
    for repeat in range(repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            times[name].append(settings[name]())
            if device.startswith("cuda"):
                peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**30)
    return {n: {"median": statistics.median(t), "min": min(t), "peak_gib": peaks.get(n)} for n, t in times.items()}


def print_table(results: dict[str, dict], peer: str) -> None:
    base = results[peer]["median"]
    print("| setting | median ms/step | min ms/step | ratio to " + peer + " | peak GiB |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a (CPU)"
        print(f"| {name} | {1e3 * r['median']:.2f} | {1e3 * r['min']:.2f} | {r['median'] / base:.3f}x | {peak} |")
