"""Seconds per 512x512 image for each protection method, side by side in one run, and their ratio to the
amortized protector.

Two encoders: the demo VAE the protections are trained and evaluated against, and the full-size Stable
Diffusion VAE architecture (random weights, built from its config: only speed is measured there). The images
are scikit-image's astronaut and coffee photos resized to 512x512. A PGD step costs the same at every
iteration, so PGD methods run ``--measured-steps`` steps (after one warm-up step) and the time is scaled to the
``--steps`` the method would run (stated in the output; ``--measured-steps 100`` measures them all). Mist and
SDS need a latent denoiser: the demo DiT on the demo VAE's latents.

    OMP_NUM_THREADS=2 python -m benchmarks.bench_protect [--steps 100 --measured-steps 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from apps.demo import DEMO_DIR, load_dit_pipeline
from apps.evaluation import dit_denoiser
from benchmarks.common import machine
from protect import AmortizedProtector, protect


def photos(size: int = 512) -> torch.Tensor:
    """scikit-image's astronaut and coffee photos as a (2, 3, size, size) batch in [0, 1]."""
    from skimage import data

    out = []
    for picture in (data.astronaut(), data.coffee()):
        x = torch.from_numpy(np.ascontiguousarray(picture)).permute(2, 0, 1).float()[None] / 255
        out.append(F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
    return torch.cat(out).clamp(0, 1)


def sd_vae() -> AutoencoderKL:
    """The Stable Diffusion 1.x/2.x VAE architecture (83 M parameters) with random weights."""
    torch.manual_seed(0)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
        scaling_factor=0.18215,
    ).eval()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--measured-steps", type=int, default=2, help="PGD steps actually timed")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--protector", default=str(DEMO_DIR / "protector"))
    parser.add_argument("--skip-semantic", action="store_true", help="leave out Mist and SDS (DiT at 512^2)")
    args = parser.parse_args()
    images = photos(args.size)
    n = len(images)
    pipe = load_dit_pipeline()
    protector = AmortizedProtector.from_pretrained(args.protector)
    gen = lambda: [torch.Generator().manual_seed(i) for i in range(n)]
    rows = []

    def run(encoder: str, vae, steps_run: int, steps_reported: int, methods) -> None:
        protect(images[:1, :, :64, :64], "amortized", vae=vae, protector=protector)  # warm-up
        protect(images[:1, :, :64, :64], "photoguard", vae=vae, steps=1)
        amortized = timed(lambda: protect(images, "amortized", vae=vae, protector=protector)) / n
        rows.append((encoder, "amortized (one pass)", amortized, 1.0, "measured"))
        for method in methods:
            extra = {}
            if method in ("mist", "sds"):
                extra = {"denoiser": dit_denoiser(pipe), "alphas_cumprod": pipe.scheduler.alphas_cumprod}
            seconds = timed(partial(protect, images, method, vae=vae, steps=steps_run, generator=gen(), **extra)) / n
            seconds *= steps_reported / steps_run
            how = "measured" if steps_run == steps_reported else f"{steps_run} steps measured, scaled"
            rows.append((encoder, f"{method} ({steps_reported} PGD steps)", seconds, seconds / amortized, how))
            print(rows[-1], flush=True)

    semantic = () if args.skip_semantic else ("mist", "sds")
    run("demo VAE", pipe.vae, args.measured_steps, args.steps, ("photoguard", *semantic))
    run("SD VAE architecture", sd_vae(), args.measured_steps, args.steps, ("photoguard",))
    print(f"\n{datetime.date.today()}, {machine()}, images {n} x {args.size}x{args.size}\n")
    print("| encoder | method | seconds / image | x amortized | how |\n|---|---|---|---|---|")
    for encoder, method, seconds, ratio, how in rows:
        print(f"| {encoder} | {method} | {seconds:.3f} | {ratio:.0f}x | {how} |")
    print(json.dumps([dict(zip(("encoder", "method", "seconds", "ratio", "how"), r)) for r in rows]))


if __name__ == "__main__":
    main()
