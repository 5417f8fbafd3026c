"""Step time and memory of perturbation guidance, side by side in one run.

Peers: diffusers' ``StableDiffusionXLPAGPipeline`` for CFG + PAG (same weights,
same layers), and plain CFG for each method (target: <= 1.5x, the cost of the
extra batch branch). All settings share one random-weight SDXL-architecture UNet.

    python benchmarks/bench_perturbation.py --arch small
    python benchmarks/bench_perturbation.py --arch sdxl --size 1024 --device cuda --dtype float16
"""

from __future__ import annotations

from diffusers import StableDiffusionXLPAGPipeline

from common import header, print_table, setup, side_by_side, timer
from guidance import CFG, PAG, TPG, SoftPAG


def main() -> None:
    args, pipe, embeds, size = setup(__doc__, steps=6, repeats=5)
    theirs = StableDiffusionXLPAGPipeline(**pipe.components, pag_applied_layers=["mid"])
    theirs.set_progress_bar_config(disable=True)
    call = dict(embeds, height=size, width=size, num_inference_steps=args.steps, output_type="latent")
    timed = timer(args, pipe, call)
    pag = (CFG(5.0), PAG(3.0, layers=("mid",)))
    settings = {
        "plain CFG (peer)": timed(pipe, guidance_scale=5.0),
        "diffusers PAG pipeline, CFG + PAG mid": timed(theirs, guidance_scale=5.0, pag_scale=3.0),
        "ours CFG + PAG mid": timed(pipe, pag),
        "ours CFG + PAG mid, sequential": timed(pipe, pag, sequential=True),
        "ours CFG + SoftPAG 4 mid heads": timed(pipe, (CFG(5.0), SoftPAG(3.0, heads=[("mid", h) for h in range(4)]))),
        "ours CFG + TPG down_blocks.2": timed(pipe, (CFG(5.0), TPG(3.0, layers=("down_blocks.2",)))),
    }
    results = side_by_side(settings, args.repeats, args.device)
    print(header("perturbation guidance per step", args, pipe, size))
    print_table(results, "plain CFG (peer)")
    ours, peer = results["ours CFG + PAG mid"]["median"], results["diffusers PAG pipeline, CFG + PAG mid"]["median"]
    print(f"\nours / diffusers PAG pipeline: {ours / peer:.3f}x")


if __name__ == "__main__":
    main()
