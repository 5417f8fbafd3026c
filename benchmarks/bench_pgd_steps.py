"""How many PGD steps are worth their cost? PhotoGuard (and Mist with ``--ldm``) at several step counts, side by side
in one run, on native-resolution crops of the **training** photos (the default is chosen here, never on the
held-out photos the evaluation reports).

For each step count: seconds per image, the latent distortion ``d_0`` in the VAE, with ``--ldm`` the damage to an
SDEdit mimicry through that latent model (PSNR of the protected image's edit to the clean image's edit, the same
noise; random noise of the budget beside it), and what survives JPEG q75 and noisy upscaling
(``protect.survival.report``: the latent distortion after the purification, against same-budget random noise
after it). The recommended default is the fewest steps whose worst case over the two purifications
reaches ``--share`` (default 90 %) of the most steps' worst case; the ratio printed is its speed-up over the most
steps.

    OMP_NUM_THREADS=2 python -m benchmarks.bench_pgd_steps --vae demo/photo_vae --steps 1 2 5 10 20 50 100 \\
        --json benchmarks/results/pgd_steps.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from apps.models import load_latent_model, load_vae
from benchmarks.common import machine
from protect import protect
from protect.evaluate import sdedit_unconditional, semantic_part
from protect.metrics import psnr
from protect.purify import sign_noise
from protect.survival import report


def training_crops(n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` native-resolution ``size`` px crops of the training photos (no resizing, no augmentation), in [0, 1]."""
    from apps.demo.photos import PhotoStream

    return (PhotoStream(size, seed=seed, max_scale=1, augment=False, split="train").sample(n) + 1) / 2


class Mimic:
    """SDEdit (strength 0.3, 20 DDIM steps, seeded per image) through a latent model; the clean edits once."""

    def __init__(self, vae, unet, scheduler, clean: torch.Tensor):
        self.vae, self.unet, self.scheduler = vae, unet, scheduler
        self.clean_edits = self(clean)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(1000 + i) for i in range(len(x))]
        return sdedit_unconditional(self.vae, self.unet, self.scheduler, x, strength=0.3, generator=generators)

    def psnr_to_clean(self, x: torch.Tensor) -> float:
        """Mean PSNR (dB) of the edits of ``x`` to the clean images' edits: lower, more damage."""
        return psnr(self(x), self.clean_edits).mean().item()


def measure(
    method: str, images: torch.Tensor, steps: int, eps: float, tile: int, mimic: Mimic | None = None, **extra
) -> dict:
    """Protect ``images`` with ``steps`` PGD steps (one generator per image) and measure survival (and, with
    ``mimic``, the damage to its SDEdit)."""
    generators = [torch.Generator().manual_seed(i) for i in range(len(images))]
    start = time.perf_counter()
    protected, _ = protect(images, method, eps=eps, steps=steps, generator=generators, tile=tile, **extra)
    seconds = (time.perf_counter() - start) / len(images)
    entries = report(extra["vae"], images, protected, tile=tile)
    d0 = [e["latent_distortion"] for e in entries]
    worst = [min(p["latent_distortion"] for p in e["purifications"].values()) for e in entries]
    vs_noise = [min(p["vs_noise"] for p in e["purifications"].values()) for e in entries]
    survives = sum(e["verdict"] == "survives" for e in entries)
    damage = {"sdedit_psnr_to_clean": mimic.psnr_to_clean(protected)} if mimic is not None else {}
    return {
        **damage,
        "method": method,
        "steps": steps,
        "seconds_per_image": seconds,
        "latent_distortion": sum(d0) / len(d0),
        "worst_purified_distortion": sum(worst) / len(worst),
        "worst_vs_noise": sum(vs_noise) / len(vs_noise),
        "survives": survives,
        "n": len(images),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vae", default="demo/photo_vae")
    parser.add_argument("--ldm", default=None, help="latent model for Mist (e.g. demo/photo_ldm); none: no Mist")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 5, 10, 20, 50, 100])
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=("photoguard", "mist"),
        default=None,
        help="default: both with --ldm, else photoguard",
    )
    parser.add_argument("-n", "--num-images", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--eps", type=float, default=8.0, help="budget in 1/255")
    parser.add_argument("--tile", type=int, default=128, help="PGD tile (the app's)")
    parser.add_argument("--share", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.methods is None:
        args.methods = ["photoguard", "mist"] if args.ldm else ["photoguard"]
    if "mist" in args.methods and not args.ldm:
        parser.error("mist needs a latent diffusion model as its semantic part (--ldm, e.g. demo/photo_ldm)")
    vae = load_vae(args.vae, "cpu")
    images = training_crops(args.num_images, args.size, args.seed)
    methods = {"photoguard": {"vae": vae}}
    mimic, baseline = None, {}
    if args.ldm:
        unet, scheduler, _ = load_latent_model(args.ldm, args.vae, "cpu")
        if "mist" in args.methods:
            methods["mist"] = {"vae": vae, **semantic_part(unet, scheduler)}
        mimic = Mimic(vae, unet, scheduler, images)
        noise = torch.cat([sign_noise(x[None], args.eps / 255, i) for i, x in enumerate(images)])
        baseline = {"random_noise_sdedit_psnr_to_clean": mimic.psnr_to_clean(noise)}
        print(json.dumps(baseline), flush=True)
    methods = {name: extra for name, extra in methods.items() if name in args.methods}
    rows, best = [], {}
    for method, extra in methods.items():
        for steps in sorted(args.steps):
            row = measure(method, images, steps, args.eps / 255, args.tile, mimic, **extra)
            rows.append(row)
            print(json.dumps(row), flush=True)
        mine = [r for r in rows if r["method"] == method]
        top = mine[-1]
        goal = args.share * top["worst_purified_distortion"]
        chosen = next(r for r in mine if r["worst_purified_distortion"] >= goal)
        best[method] = {
            "steps": chosen["steps"],
            "share_of_most_steps": chosen["worst_purified_distortion"] / top["worst_purified_distortion"],
            "speedup_vs_most_steps": top["seconds_per_image"] / chosen["seconds_per_image"],
        }
        print(
            f"{method}: {chosen['steps']} steps reach {best[method]['share_of_most_steps']:.0%} of {top['steps']} "
            f"steps' worst case after purification at {best[method]['speedup_vs_most_steps']:.1f}x its speed",
            flush=True,
        )
    if args.json:
        record = {
            "date": datetime.date.today().isoformat(),
            "machine": machine(),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "data": f"{args.num_images} native {args.size} px crops of the training photos (apps.demo.photos.TRAIN)",
            "rows": rows,
            **baseline,
            "recommended": best,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
