"""The held-out check of a photo protector (its card's ``held_out_check.json``): each held-out photo whole, at
native resolution, eps 8/255, protected against ``demo/photo_vae``; in each photo VAE the PSNR, the latent
distortion ``d0`` against same-budget random noise and the survival after JPEG q75 and noisy upscaling
(``protect.survival.report``, 128 px tiles); one PGD step of PhotoGuard beside it. One CPU thread, ~1 min.

    python scripts/photo_protector_check.py demo_models/photo_protector out.json
"""

import json
import os
import sys
import time

import torch

from apps.demo.photos import HELD_OUT, photo
from apps.models import load_vae
from protect import AmortizedProtector, protect
from protect.survival import report


def main(protector_dir: str, out_path: str) -> None:
    torch.set_num_threads(1)
    protector = AmortizedProtector.from_pretrained(protector_dir)
    vaes = {name: load_vae(name, "cpu") for name in ("demo/photo_vae", "demo/photo_vae_b")}
    first = vaes["demo/photo_vae"]
    out = {}
    for name in HELD_OUT:
        x = photo(name)[None].add(1).div(2)
        entry = {}
        t = time.perf_counter()
        prot, rep = protect(x, "amortized", vae=first, protector=protector, eps=8 / 255)
        seconds = time.perf_counter() - t
        t = time.perf_counter()
        pg, rep_pg = protect(
            x, "photoguard", vae=first, eps=8 / 255, steps=1, generator=[torch.Generator().manual_seed(0)], tile=128
        )
        seconds_pg = time.perf_counter() - t
        for method, image, r, s in (("amortized", prot, rep, seconds), ("photoguard@1", pg, rep_pg, seconds_pg)):
            entry[method] = {"psnr": round(r.psnr[0], 2), "seconds": round(s, 2)}
            for vname, vae in vaes.items():
                (e,) = report(vae, x, image, tile=128)
                p = e["purifications"]
                entry[method][vname] = {
                    "d0": round(e["latent_distortion"], 4),
                    "noise_d0": round(e["noise_latent_distortion"], 4),
                    "vs_noise": {k: round(v["vs_noise"], 2) for k, v in p.items()},
                    "verdict": e["verdict"],
                }
        out[f"{name} {tuple(x.shape[-2:])}"] = entry
        print(name, json.dumps(entry), flush=True)
    with open(out_path, "w") as file:
        json.dump(out, file, indent=1)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python scripts/photo_protector_check.py PROTECTOR_DIR OUT.json")
    if os.path.exists(sys.argv[2]):
        raise SystemExit(f"{sys.argv[2]} exists: name a new file")
    main(sys.argv[1], sys.argv[2])
