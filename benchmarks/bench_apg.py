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

from common import header, print_table, setup, side_by_side, timer
from guidance import APG, CFG


def main() -> None:
    args, pipe, embeds, size = setup(__doc__, steps=8, repeats=7)
    call = dict(embeds, height=size, width=size, num_inference_steps=args.steps, output_type="latent")
    timed = timer(args, pipe, call)
    settings = {
        "pipeline CFG (peer)": timed(pipe, guidance_scale=5.0),
        "guide CFG": timed(pipe, (CFG(5.0),)),
        "guide APG x0": timed(pipe, (APG(5.0),)),
        "guide APG model": timed(pipe, (APG(5.0, space="model"),)),
    }
    results = side_by_side(settings, args.repeats, args.device)
    print(header("APG vs CFG per step (+ the unconditional branch)", args, pipe, size))
    print_table(results, "pipeline CFG (peer)")


if __name__ == "__main__":
    main()
