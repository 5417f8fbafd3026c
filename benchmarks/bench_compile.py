"""Per-step time of a compiled guided step against a compiled plain CFG step, side by side in one run.

One compiled UNet serves every setting: the pipeline's own CFG (the peer, no hooks), ``guide(pipe, CFG(w))``
and ``guide(pipe, APG(w))``. ``guide()`` intercepts the denoiser's calls outside the compiled region, so the
guided settings run the same compiled graph (same batch of 2) plus the guidance arithmetic in eager mode.
The run also reports how many graphs dynamo compiled and how many times it recompiled after the warm-up
(expected: none).

    python benchmarks/bench_compile.py                                  # CPU, small SD-style UNet, inductor
    python benchmarks/bench_compile.py --compile module                 # unet.compile() in place
    python benchmarks/bench_compile.py --arch sdxl --size 1024 --device cuda --dtype float16
"""

from __future__ import annotations

import argparse

import torch

from common import header, print_table, setup, side_by_side, timer
from guidance import APG, CFG


def main() -> None:
    args, pipe, embeds, size = setup(__doc__, steps=6, repeats=7, options=compile_options)
    from torch._dynamo.utils import counters

    torch.compiler.reset()
    if args.compile == "wrap":
        pipe.unet = torch.compile(pipe.unet, backend=args.backend)
    else:
        pipe.unet.compile(backend=args.backend)
    call = dict(embeds, height=size, width=size, num_inference_steps=args.steps, output_type="latent")
    timed = timer(args, pipe, call)
    settings = {
        "compiled pipeline CFG (peer)": timed(pipe, guidance_scale=5.0),
        "compiled guide CFG": timed(pipe, (CFG(5.0),)),
        "compiled guide APG x0": timed(pipe, (APG(5.0),)),
    }
    for once in settings.values():  # warm-up: compile once for the batch of 2
        once()
    graphs = counters["stats"]["unique_graphs"]
    results = side_by_side(settings, args.repeats, args.device)
    recompiled = counters["stats"]["unique_graphs"] - graphs
    title = f"compiled guided step vs compiled pipeline CFG (torch.compile {args.compile}, backend {args.backend})"
    print(header(title, args, pipe, size))
    print_table(results, "compiled pipeline CFG (peer)")
    print(f"\ngraphs compiled in the warm-up: {graphs}; new graphs during the timed runs: {recompiled}")


def compile_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compile", choices=["wrap", "module"], default="wrap", help="torch.compile(unet) or unet.compile()"
    )
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (eager: dynamo only)")


if __name__ == "__main__":
    main()
