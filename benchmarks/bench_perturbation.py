"""Step time and memory of perturbation guidance, side by side in one run.

Peers: diffusers' ``StableDiffusionXLPAGPipeline`` for CFG + PAG (same weights,
same layers), and plain CFG for each method (target: <= 1.5x, the cost of the
extra batch branch). All settings share one random-weight SDXL-architecture UNet.

    python benchmarks/bench_perturbation.py --arch small
    python benchmarks/bench_perturbation.py --arch sdxl --size 1024 --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable

import torch
from diffusers import StableDiffusionXLPAGPipeline

from common import build, device_name, now, print_table, side_by_side
from guidance import CFG, PAG, TPG, SoftPAG, guide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["small", "sdxl"], default="small")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    size = args.size or (1024 if args.arch == "sdxl" else 256)
    pipe, embeds = build(args.arch, args.device, dtype)
    theirs = StableDiffusionXLPAGPipeline(**pipe.components, pag_applied_layers=["mid"])
    theirs.set_progress_bar_config(disable=True)
    call = dict(embeds, height=size, width=size, num_inference_steps=args.steps, output_type="latent")
    heads = [("mid", h) for h in range(4)]

    def timed(target, methods=(), sequential=False, **extra) -> Callable[[], float]:
        def once() -> float:
            generator = torch.Generator(args.device).manual_seed(0)
            with guide(pipe, *methods, sequential=sequential) if methods else contextlib.nullcontext():
                start = now(args.device)
                target(**call, **extra, generator=generator)
                return (now(args.device) - start) / args.steps

        return once

    settings = {
        "plain CFG (peer)": timed(pipe, guidance_scale=5.0),
        "diffusers PAG pipeline, CFG + PAG mid": timed(theirs, guidance_scale=5.0, pag_scale=3.0),
        "ours CFG + PAG mid": timed(pipe, (CFG(5.0), PAG(3.0, layers=("mid",)))),
        "ours CFG + PAG mid, sequential": timed(pipe, (CFG(5.0), PAG(3.0, layers=("mid",))), sequential=True),
        "ours CFG + SoftPAG 4 mid heads": timed(pipe, (CFG(5.0), SoftPAG(3.0, heads=heads, strength=0.5))),
        "ours CFG + TPG down_blocks.2": timed(pipe, (CFG(5.0), TPG(3.0, layers=("down_blocks.2",)))),
    }
    results = side_by_side(settings, args.repeats, args.device)
    params = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    print(
        f"# perturbation guidance per step: {args.arch} UNet ({params:.0f} M params), {size}x{size}, batch 1, "
        f"{args.dtype}, {args.steps} steps, {args.repeats} repeats, {device_name(args.device)}, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print_table(results, "plain CFG (peer)")
    ours, peer = results["ours CFG + PAG mid"]["median"], results["diffusers PAG pipeline, CFG + PAG mid"]["median"]
    print(f"\nours / diffusers PAG pipeline: {ours / peer:.3f}x")


if __name__ == "__main__":
    main()
