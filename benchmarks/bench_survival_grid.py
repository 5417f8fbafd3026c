"""Is the survival report optimistic because it measures on the tiles PGD attacked? Side by side in one run:
``protect.survival.report``'s ratio to same-budget random noise (unpurified, after JPEG q75, after noisy
upscaling) measured on the PGD tile grid (what the app and ``steerguard protect`` report), on a grid shifted by
half a tile (its crops straddle the attacked tiles' seams) and on the whole image (what a mimic's encoder sees;
its cost grows with the square of the pixels, hence the tiles). Protections: PhotoGuard PGD on ``--tile`` px
tiles (the app's default) and the amortized protector (no tiles), on native crops of the **held-out** photos.
The ratio printed is the PGD grid's vs-noise ratio over the whole image's (above 1: the report flatters).

    OMP_NUM_THREADS=1 python -m benchmarks.bench_survival_grid --json benchmarks/results/survival_grid.json
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch

from apps.evaluation import default_photo_protector, photo_crops
from apps.models import load_vae, resolve
from benchmarks.common import machine
from protect import AmortizedProtector, protect
from protect.survival import report


def vs_noise(vae, clean: torch.Tensor, protected: torch.Tensor, tile: int | None) -> dict[str, list[float]]:
    """Per image: the latent distortion over same-budget random noise's, unpurified ("none") and after each of
    the survival report's purifications."""
    entries = report(vae, clean, protected, tile=tile)
    ratios = {"none": [e["latent_distortion"] / e["noise_latent_distortion"] for e in entries]}
    for name in entries[0]["purifications"]:
        ratios[name] = [e["purifications"][name]["vs_noise"] for e in entries]
    return ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", default="demo/photo_vae")
    parser.add_argument("--protector", default=None, help="default: the photo protector")
    parser.add_argument("-n", type=int, default=4, help="crops (cycling through the held-out photos)")
    parser.add_argument("--size", type=int, default=384, help="crop side (px)")
    parser.add_argument("--tile", type=int, default=128, help="PGD and survival tile (px; the app's PGD_TILE)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.size < 2 * args.tile:
        parser.error("--size must be at least twice --tile (else there is no seam to straddle)")
    vae = load_vae(args.vae, "cpu")
    protector = AmortizedProtector.from_pretrained(resolve(args.protector or default_photo_protector()))
    images, boxes = photo_crops(args.n, args.size, seed=args.seed)
    gens = [torch.Generator().manual_seed(i) for i in range(args.n)]
    protected = {
        "photoguard@1": protect(images, "photoguard", vae=vae, steps=1, generator=gens, tile=args.tile)[0],
        "amortized": protect(images, "amortized", vae=vae, protector=protector)[0],
    }
    half = args.tile // 2
    rows = []
    for name, x in protected.items():
        grids = {
            "pgd grid": vs_noise(vae, images, x, args.tile),
            "shifted half a tile": vs_noise(vae, images[..., half:, half:], x[..., half:, half:], args.tile),
            "whole image": vs_noise(vae, images, x, None),
        }
        for grid, ratios in grids.items():
            rows.append({"protection": name, "grid": grid, **ratios})
        flatter = {k: sum(grids["pgd grid"][k]) / sum(grids["whole image"][k]) for k in grids["pgd grid"]}
        print(f"{name}: PGD grid / whole image vs-noise ratio " + ", ".join(f"{k} {v:.3f}" for k, v in flatter.items()))
    for row in rows:
        cells = ", ".join(f"{k} {' '.join(f'{v:.2f}' for v in row[k])}" for k in row if k not in ("protection", "grid"))
        print(f"  {row['protection']:13s} {row['grid']:20s} {cells}")
    if args.json:
        record = {
            "date": datetime.date.today().isoformat(),
            "machine": machine(),
            "settings": {**{k: v for k, v in vars(args).items() if k != "json"}, "crops": boxes},
            "rows": rows,
        }
        args.json.write_text(json.dumps(record, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
