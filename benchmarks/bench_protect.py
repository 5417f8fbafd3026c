"""Seconds per image at 512x512 and 1024x1024 for each protection method, side by side in one run, and their
ratio to the amortized protector.

The encoder is the photo demo VAE the app and the CLI protect against (``--vae``, default ``demo/photo_vae``),
with Mist and SDS through the photo latent model (``--ldm``, default ``demo/photo_ldm``) and the photo amortized
protector (``--protector``); ``--sd-vae`` adds the full-size Stable Diffusion VAE architecture (random weights,
built from its config: only speed is measured there). PGD runs on 128 px tiles, as the app runs it. The images
are scikit-image's astronaut and coffee photos resized to each size, each protected in a call of its own (as the
app protects each upload). A PGD step costs the same at every iteration, so PGD methods run ``--measured-steps``
steps and twice as many (after a warm-up): the difference is the cost of the added steps, the rest of the shorter
run the request's fixed cost (encoding the target, the random start, the metrics), and the time is extrapolated to
the ``--steps`` the method would run (stated in the output; ``--measured-steps 100`` measures them all). ASPL (the
app's settings: :data:`apps.services.ASPL_FINETUNE`, its 60 steps) costs the same in every round of 6 PGD steps and
two fine-tunes: one round and two rounds are timed and extrapolated to its 10. (Before 2026-12-03 the shorter run
alone was scaled, which multiplied the fixed cost too.) ``--estimate`` adds the app's estimate of each request
(:func:`apps.cost.protect_seconds` from unit costs measured by :func:`apps.services.calibrate`, without the survival
report and the preview) beside the measured seconds: the app refuses a request on that estimate.

    OMP_NUM_THREADS=2 python -m benchmarks.bench_protect [--sizes 512 1024 --steps 100 --measured-steps 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from apps import services
from apps.cost import Costs, protect_seconds
from apps.demo import DEMO_DIR
from apps.models import load_latent_model, load_vae
from benchmarks.common import machine
from protect import AmortizedProtector, protect
from protect.evaluate import semantic_part


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


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--measured-steps", type=int, default=2, help="PGD steps actually timed")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--vae", default="demo/photo_vae")
    parser.add_argument("--ldm", default="demo/photo_ldm", help="latent model for Mist and SDS ('none': skip them)")
    parser.add_argument("--protector", default=str(DEMO_DIR / "photo_protector"))
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--sd-vae", action="store_true", help="also time PhotoGuard on the SD VAE architecture")
    parser.add_argument("--estimate", action="store_true", help="add the app's cost estimate of each request")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    vae = load_vae(args.vae, "cpu")
    protector = AmortizedProtector.from_pretrained(args.protector)
    semantic = {}
    if args.ldm != "none":
        unet, scheduler, _ = load_latent_model(args.ldm, args.vae, "cpu")
        semantic = semantic_part(unet, scheduler)
    rows = []
    costs = None
    if args.estimate:
        costs = services.calibrate(Costs("cpu"), device="cpu", tile=args.tile, preview=False)
        costs.unit.pop("survival_pixel", None)  # the request alone: no survival report

    def add(encoder: str, size: int, method: str, seconds: float, ratio: float, how: str, steps: int = 1) -> None:
        name = method.split(" (")[0]
        estimate = None
        if costs is not None and encoder == args.vae:
            sizes = [(size, size)]
            estimate = protect_seconds(costs, sizes, name, steps, args.tile, False, finetune=services.ASPL_FINETUNE)
        row = {"encoder": encoder, "size": size, "method": method, "seconds": seconds, "ratio": ratio, "how": how}
        rows.append(row | {"estimate": estimate})
        print(rows[-1], flush=True)

    def run(encoder: str, model, images: torch.Tensor, methods) -> None:
        n, size = len(images), images.shape[-1]
        protect(images[:1, :, :64, :64], "amortized", vae=model, protector=protector)  # warm-up
        protect(images[:1, :, :64, :64], "photoguard", vae=model, steps=1)
        each = lambda fn: sum(timed(partial(fn, images[i : i + 1], i)) for i in range(n)) / n  # one call per image
        amortized = each(lambda image, i: protect(image, "amortized", vae=model, protector=protector))
        add(encoder, size, "amortized (one pass)", amortized, 1.0, "measured")
        for method in methods:
            extra = semantic if method in ("mist", "sds", "aspl") else {}
            steps, measured = args.steps, args.measured_steps
            if method == "aspl":  # one round and two, extrapolated to the app's rounds
                extra = extra | {"finetune": services.ASPL_FINETUNE}
                steps, measured = services.DEFAULT_ASPL_STEPS, services.ASPL_FINETUNE.pgd_steps

            def run_steps(count: int, image: torch.Tensor, i: int, method: str = method, extra: dict = extra) -> None:
                generator = torch.Generator().manual_seed(i)
                protect(image, method, vae=model, generator=generator, tile=args.tile, steps=count, **extra)

            if measured >= steps:
                seconds, how = each(partial(run_steps, steps)), "measured"
            else:
                short, long = each(partial(run_steps, measured)), each(partial(run_steps, 2 * measured))
                seconds = short + (steps - measured) / measured * max(long - short, 0.0)  # timing noise
                how = f"{measured} and {2 * measured} steps measured, extrapolated"
            add(encoder, size, f"{method} ({steps} PGD steps)", seconds, seconds / amortized, how, steps)

    for size in args.sizes:
        images = photos(size)
        run(args.vae, vae, images, ("photoguard", *(("mist", "sds", "aspl") if semantic else ())))
        if args.sd_vae:
            run("SD VAE architecture", sd_vae(), images, ("photoguard",))
    print(f"\n{datetime.date.today()}, {machine()}, 2 images per size, one call each, PGD on {args.tile} px tiles\n")
    print("| encoder | size | method | seconds / image | x amortized | how | app's estimate |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        estimate = "" if r["estimate"] is None else f"{r['estimate']:.3f}"
        cells = f"{r['seconds']:.3f} | {r['ratio']:.0f}x | {r['how']} | {estimate}"
        print(f"| {r['encoder']} | {r['size']} | {r['method']} | {cells} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"date": datetime.date.today().isoformat(), "machine": machine(), "args": vars(args), "rows": rows}
        args.json.write_text(json.dumps(record, indent=1, default=str) + "\n")
    return rows


if __name__ == "__main__":
    main()
