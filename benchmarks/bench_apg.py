"""Per-step time of APG against CFG on the same pipeline, measured side by side in one run.

Peer: the pipeline's own CFG (no hooks). Also timed: ``guide(pipe, CFG(w))``
(the cost of the hooks alone) and APG in x0 and model space. Each repeat runs
every setting once, in a rotating order, and the medians are compared.

    python benchmarks/bench_apg.py --arch small            # CPU, a small SD-style UNet
    python benchmarks/bench_apg.py --arch sdxl --size 1024 --device cuda --dtype float16

``--arch sdxl`` builds the full-size SDXL UNet with random weights (no
download; prompt embeddings are random tensors, the VAE is not run).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable

import torch

from common import build, device_name, now, print_table, side_by_side
from guidance import APG, CFG, guide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["small", "sdxl"], default="small")
    parser.add_argument("--size", type=int, default=None, help="image size in pixels (latents are size/8)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    size = args.size or (1024 if args.arch == "sdxl" else 256)
    pipe, embeds = build(args.arch, args.device, dtype)
    call = dict(
        embeds, height=size, width=size, num_inference_steps=args.steps, output_type="latent", guidance_scale=5.0
    )
    settings = {
        "pipeline CFG (peer)": (),
        "guide CFG": (CFG(5.0),),
        "guide APG x0": (APG(5.0),),
        "guide APG model": (APG(5.0, space="model"),),
    }

    def timed(methods) -> Callable[[], float]:
        def once() -> float:
            generator = torch.Generator(args.device).manual_seed(0)
            with guide(pipe, *methods) if methods else contextlib.nullcontext():
                start = now(args.device)
                pipe(**call, generator=generator)
                return (now(args.device) - start) / args.steps

        return once

    results = side_by_side({name: timed(m) for name, m in settings.items()}, args.repeats, args.device)
    params = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    print(
        f"# APG vs CFG per step: {args.arch} UNet ({params:.0f} M params), {size}x{size}, batch 1 (+uncond), "
        f"{args.dtype}, {args.steps} steps, {args.repeats} repeats, {device_name(args.device)}, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print_table(results, "pipeline CFG (peer)")


if __name__ == "__main__":
    main()
