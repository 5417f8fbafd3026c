"""Which protections damage the SDEdit mimicry, and which only carry their perturbation through it? A tuning probe on
native crops of the **training** photos (never the held-out photos the evaluation reports).

For each amortized protector (``--protector DIR``, run with the full budget everywhere: ``min_strength=1``) and
each PhotoGuard step count (``--pgd-steps``): the protected crop's PSNR, the PSNR of its SDEdit (strength 0.3,
20 DDIM steps through ``--ldm``, the same noise) to the clean crop's edit, the same after IMPRESS, and
:func:`protect.evaluate.carried_over`: the share of the edit's change that is the perturbation carried along and
the PSNR of the rest (the **excess**, lower = more damage). A protection whose edit PSNR is low but whose carried
share is near 1 has not harmed the mimicry: the edit is the clean edit plus its (invisible) perturbation.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_mimicry_probe --protector demo/photo_protector --pgd-steps 1 100
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from apps.models import load_latent_model, load_vae, resolve
from benchmarks.bench_pgd_steps import Mimic, training_crops
from protect import AmortizedProtector, protect
from protect.evaluate import carried_over
from protect.metrics import psnr
from protect.purifiers import impress


def probe(name: str, clean: torch.Tensor, protected: torch.Tensor, mimic: Mimic, purified: Mimic, vae) -> dict:
    """The row of one protection (see the module docstring)."""
    edits = mimic(protected)
    share, excess = carried_over(edits - mimic.clean_edits, protected - clean)
    return {
        "protection": name,
        "psnr": psnr(protected, clean).mean().item(),
        "edit_psnr": psnr(edits, mimic.clean_edits).mean().item(),
        "impress_edit_psnr": purified.psnr_to_clean(impress(protected, vae)),
        "carried_share": share.mean().item(),
        "excess_psnr": excess.mean().item(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vae", default="demo/photo_vae")
    parser.add_argument("--ldm", default="demo/photo_ldm")
    parser.add_argument("--protector", action="append", default=[], help="amortized protector folder (repeat)")
    parser.add_argument("--pgd-steps", type=int, nargs="*", default=[], help="PhotoGuard step counts")
    parser.add_argument("-n", type=int, default=6, help="training-photo crops (default 6)")
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--eps", type=float, default=8.0, help="budget in 1/255 (default 8)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not args.protector and not args.pgd_steps:
        parser.error("nothing to probe: pass --protector DIR and/or --pgd-steps N ...")
    eps = args.eps / 255
    vae = load_vae(args.vae)
    unet, scheduler, _ = load_latent_model(args.ldm, args.vae, "cpu")
    clean = training_crops(args.n, args.size, 5)
    mimic = Mimic(vae, unet, scheduler, clean)
    purified = Mimic(vae, unet, scheduler, impress(clean, vae))
    rows = []
    for folder in args.protector:
        protector = AmortizedProtector.from_pretrained(resolve(folder))
        protected, _ = protect(clean, "amortized", vae=vae, protector=protector, eps=eps, min_strength=1.0)
        rows.append(probe(f"amortized-full {folder}", clean, protected, mimic, purified, vae))
    for steps in args.pgd_steps:
        generators = [torch.Generator().manual_seed(i) for i in range(len(clean))]
        protected, _ = protect(clean, "photoguard", vae=vae, eps=eps, steps=steps, generator=generators, tile=128)
        rows.append(probe(f"photoguard@{steps}", clean, protected, mimic, purified, vae))
    print("| protection | PSNR | edit PSNR | after IMPRESS | carried share | excess PSNR |\n|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['protection']} | {r['psnr']:.1f} | {r['edit_psnr']:.2f} | {r['impress_edit_psnr']:.2f} | "
            f"{r['carried_share']:.2f} | {r['excess_psnr']:.2f} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
