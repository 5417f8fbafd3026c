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

import statistics

import torch

from common import header, now, print_table, setup, side_by_side, timer
from guidance import APG, CFG
from guidance import prediction as P


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
    shape = (1, 4, size // 8, size // 8)
    step = results["pipeline CFG (peer)"]["min"]
    print(f"\nthe guidance math alone per step, on {shape} latents (robust to other load on the machine):")
    for name, method in (("CFG", CFG(5.0)), ("APG x0", APG(5.0)), ("APG model", APG(5.0, space="model"))):
        seconds = math_time(method, shape, args.device, getattr(torch, args.dtype))
        print(f"- {name}: {1e3 * seconds:.3f} ms = {100 * seconds / step:.2f} % of a pipeline CFG step")


def math_time(method, shape, device: str, dtype: torch.dtype, repeats: int = 200) -> float:
    """Median time of one guided combination: x0 conversions of both branches, the update, the way back."""
    g = torch.Generator().manual_seed(0)
    x, cond, uncond = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(3))
    a, b = torch.full((shape[0],), 1.3, device=device), torch.full((shape[0],), -0.8, device=device)
    state = method.new_state("sdxl")
    times = []
    for _ in range(repeats):
        start = now(device)
        x32, c32, u32 = x.float(), cond.float(), uncond.float()
        if method.space == "x0":
            aa, bb = P.broadcast(a, x32), P.broadcast(b, x32)
            update = method.update(aa * x32 + bb * c32, aa * x32 + bb * u32, state) / bb
        else:
            update = method.update(c32, u32, state)
        (c32 + update).to(dtype)
        times.append(now(device) - start)
    return statistics.median(times)


if __name__ == "__main__":
    main()
