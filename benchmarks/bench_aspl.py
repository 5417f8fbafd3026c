"""Does a protection stop a fine-tune from learning the images? ASPL (Anti-DreamBooth) against PhotoGuard, SDS+ and
same-budget random noise, each fine-tuned on by a DreamBooth-style attacker, side by side in one run.

The attacker fine-tunes a fresh copy of the photo latent model (``demo/photo_ldm`` on ``demo/photo_vae``) on the
(protected) crops, every crop in every step, with its own seeded draws: ``full`` (every weight, AdamW) and
``lora`` (rank 4 on the attention projections; ASPL's surrogate fine-tunes every weight, so this attacker is one
it did not model). Then, per fine-tuned model:

* ``clean loss``: its denoising loss on the *clean* crops' latents (fixed draws: 32 timesteps and noises per
  crop, the same for every model); ``learned``: the share of the clean-trained model's drop of that loss
  (from the untuned model's) that the protected-trained model achieves (1: it learned the images as well as
  from the clean files; lower: the protection kept it from them);
* ``SDEdit PSNR``: SDEdit of the clean crops at strength 0.5 through the fine-tuned model, PSNR to the crops
  (a model that learned the images reconstructs them better);
* ``sample PSNR``: 8 samples, each one's PSNR to its nearest clean crop (memorisation of the set).

Data: ``-n`` seeded native-resolution crops of the **held-out** photos (never trained or tuned on). The ASPL
settings are the paper's schedule scaled to ``--steps`` (rounds of 6 PGD and 3 fine-tune steps at the full
attacker's learning rate), fixed before the run. Printed: each protection's learned share per attacker (mean and
spread over ``--seeds`` attack seeds) and ASPL's over PhotoGuard's.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_aspl --json benchmarks/results/aspl.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
from pathlib import Path

import torch

from apps.evaluation import photo_crops
from apps.models import load_latent_model, load_vae
from benchmarks.common import machine
from protect import Finetune, protect
from protect.aspl import add_lora
from protect.evaluate import sdedit_unconditional
from protect.losses import denoising_loss, latent
from protect.metrics import psnr

ATTACKERS = {"full": {"rank": None, "lr": 1e-4}, "lora": {"rank": 4, "lr": 1e-3}}


def attack(unet, latents: torch.Tensor, alphas: torch.Tensor, *, rank: int | None, lr: float, steps: int, seed: int):
    """A DreamBooth-style fine-tune of a copy of ``unet`` on ``latents`` (every latent in every step)."""
    model = copy.deepcopy(unet).eval().requires_grad_(False)
    if rank is None:
        params = list(model.requires_grad_(True).parameters())
    else:
        model, params = add_lora(model, rank, seed=seed)
    optimizer = torch.optim.AdamW(params, lr=lr)
    generator = torch.Generator().manual_seed(10_000 + seed)
    with torch.enable_grad():
        for _ in range(steps):
            loss = denoising_loss(model, latents, alphas_cumprod=alphas, generator=generator).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.requires_grad_(False)


@torch.no_grad()
def clean_loss(model, latents: torch.Tensor, alphas: torch.Tensor, draws: int = 32) -> float:
    """The denoising loss on ``latents`` over fixed draws (the same for every model)."""
    generator = torch.Generator().manual_seed(123)
    return statistics.fmean(
        denoising_loss(model, latents, alphas_cumprod=alphas, generator=generator).mean().item() for _ in range(draws)
    )


@torch.no_grad()
def mimicry(model, vae, scheduler, clean: torch.Tensor, samples: int = 8) -> dict[str, float]:
    """SDEdit of the clean crops at 0.5 through ``model`` (PSNR to them) and ``samples`` samples' PSNR to their
    nearest clean crop."""
    gens = [torch.Generator().manual_seed(500 + i) for i in range(len(clean))]
    edits = sdedit_unconditional(vae, model, scheduler, clean, strength=0.5, generator=gens)
    blank = torch.zeros(samples, *clean.shape[1:])
    gens = [torch.Generator().manual_seed(900 + i) for i in range(samples)]
    drawn = sdedit_unconditional(vae, model, scheduler, blank, strength=1.0, generator=gens)
    nearest = [max(psnr(s[None].expand_as(clean), clean).tolist()) for s in drawn]
    return {"sdedit_psnr": psnr(edits, clean).mean().item(), "sample_psnr": statistics.fmean(nearest)}


def equal_psnr_photoguard(clean, vae, target: float, eps: float, steps: int, gens) -> tuple[float, torch.Tensor]:
    """PhotoGuard at the budget (bisected in (eps / 2, eps], 6 halvings) whose mean PSNR is ``target``'s."""
    low, high, best = eps / 2, eps, None
    for _ in range(6):
        middle = (low + high) / 2
        out = protect(clean, "photoguard", vae=vae, eps=middle, steps=steps, generator=gens())[0]
        quality = psnr(out, clean).mean().item()
        if best is None or abs(quality - target) < abs(best[2] - target):
            best = (middle, out, quality)
        low, high = (low, middle) if quality < target else (middle, high)  # too visible: a smaller budget
    return best[0], best[1]


def protections(
    clean,
    vae,
    unet,
    scheduler,
    *,
    eps: float,
    steps: int,
    attacker_lr: float,
    equal_psnr: bool = False,
    aspl_tile: int | None = None,
    per_image: bool = False,
) -> dict[str, torch.Tensor]:
    """The protected crops per protection (PGD on whole crops, seeded per crop); ``equal_psnr``: PhotoGuard at
    ASPL's PSNR too; ``aspl_tile``: ASPL on ``aspl_tile`` px tiles too (fine-tunes on the tiles); ``per_image``:
    ASPL (on those tiles, if given) on each crop alone too, its surrogate fine-tuned on that crop only."""
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(len(clean))]
    alphas = scheduler.alphas_cumprod
    signs = torch.cat([torch.randint(0, 2, (1, *clean.shape[1:]), generator=g) for g in gens()]) * 2 - 1
    out = {"clean": clean, "random noise": (clean + eps * signs).clamp(0, 1)}
    out["photoguard"] = protect(clean, "photoguard", vae=vae, eps=eps, steps=steps, generator=gens())[0]
    semantic = {"denoiser": unet, "alphas_cumprod": alphas}
    out["sds"] = protect(clean, "sds", vae=vae, eps=eps, steps=steps, generator=gens(), **semantic)[0]
    finetune = Finetune(steps=3, pgd_steps=6, lr=attacker_lr)
    out["aspl"] = protect(
        clean, "aspl", vae=vae, eps=eps, steps=steps, generator=torch.Generator().manual_seed(0), finetune=finetune,
        **semantic,
    )[0]  # fmt: skip
    if aspl_tile is not None:
        out[tiled_name(aspl_tile)] = protect(
            clean, "aspl", vae=vae, eps=eps, steps=steps, generator=torch.Generator().manual_seed(0),
            finetune=finetune, tile=aspl_tile, **semantic,
        )[0]  # fmt: skip
    if per_image:
        alone = [
            protect(
                clean[i : i + 1], "aspl", vae=vae, eps=eps, steps=steps, generator=torch.Generator().manual_seed(i),
                finetune=finetune, tile=aspl_tile, **semantic,
            )[0]
            for i in range(len(clean))
        ]  # fmt: skip
        out[PER_IMAGE] = torch.cat(alone)
    if equal_psnr:
        target = psnr(out["aspl"], clean).mean().item()
        budget, out["photoguard at ASPL's PSNR"] = equal_psnr_photoguard(clean, vae, target, eps, steps, gens)
        print(f"PhotoGuard at ASPL's PSNR ({target:.2f} dB): eps {255 * budget:.2f}/255")
    return out


PER_IMAGE = "aspl, each crop alone"


def tiled_name(tile: int) -> str:
    return f"aspl, {tile} px tiles"


def _summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ldm", default="demo/photo_ldm", help="the latent model (and its VAE) attacked")
    parser.add_argument("-n", type=int, default=4, help="crops of the held-out photos (the instance set)")
    parser.add_argument("--size", type=int, default=256, help="crop side (px)")
    parser.add_argument("--eps", type=float, default=8.0, help="L-infinity budget in 1/255")
    parser.add_argument("--steps", type=int, default=60, help="PGD steps of every PGD protection")
    parser.add_argument("--attack-steps", type=int, default=200, help="the attacker's fine-tune steps")
    parser.add_argument("--seeds", type=int, default=3, help="attack seeds")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--equal-psnr", action="store_true", help="add PhotoGuard at ASPL's PSNR (smaller budget)")
    parser.add_argument("--aspl-tile", type=int, default=None, help="add ASPL on tiles of this side (px)")
    parser.add_argument(
        "--per-image",
        action="store_true",
        help="add ASPL on each crop alone (as the app protects each upload), on --aspl-tile tiles if given",
    )
    parser.add_argument(
        "--only", nargs="+", default=None, help="attack only these protections (and the clean crops), by name"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    unet, scheduler, vae_name = load_latent_model(args.ldm, device="cpu")
    vae = load_vae(vae_name, "cpu")
    clean, boxes = photo_crops(args.n, args.size)
    eps = args.eps / 255
    lr = ATTACKERS["full"]["lr"]
    protected = protections(
        clean,
        vae,
        unet,
        scheduler,
        eps=eps,
        steps=args.steps,
        attacker_lr=lr,
        equal_psnr=args.equal_psnr,
        aspl_tile=args.aspl_tile,
        per_image=args.per_image,
    )
    if args.only is not None:
        unknown = set(args.only) - set(protected)
        if unknown:
            parser.error(f"--only: no protection named {sorted(unknown)}; there are {sorted(protected)}")
        protected = {name: images for name, images in protected.items() if name == "clean" or name in args.only}
    alphas = scheduler.alphas_cumprod
    with torch.no_grad():
        clean_latents = latent(vae, clean)
        latents = {name: latent(vae, images) for name, images in protected.items()}
    untuned = clean_loss(unet, clean_latents, alphas)
    rows = []
    for attacker, settings in ATTACKERS.items():
        per_seed: dict[str, list[dict[str, float]]] = {name: [] for name in protected}
        for seed in range(args.seeds):
            for name, z in latents.items():
                model = attack(unet, z, alphas, steps=args.attack_steps, seed=seed, **settings)
                per_seed[name].append({"clean_loss": clean_loss(model, clean_latents, alphas)})
                per_seed[name][-1] |= mimicry(model, vae, scheduler, clean, args.samples)
        drop = [untuned - r["clean_loss"] for r in per_seed["clean"]]
        for name, records in per_seed.items():
            learned = [(untuned - r["clean_loss"]) / d for r, d in zip(records, drop)]  # paired by attack seed
            row = {"attacker": attacker, "protection": name, "learned": _summary(learned), "per_seed": records}
            row["learned"]["per_seed"] = learned
            for key in ("clean_loss", "sdedit_psnr", "sample_psnr"):
                row[key] = _summary([r[key] for r in records])
            row["psnr"] = psnr(protected[name], clean).mean().item() if name != "clean" else float("inf")
            rows.append(row)
    print(f"untuned clean loss {untuned:.4f}")
    print("| attacker | protection | PSNR | clean loss | learned | SDEdit PSNR | sample PSNR |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [
            f"{r[k]['mean']:.4g} ± {r[k]['sd']:.2g}" for k in ("clean_loss", "learned", "sdedit_psnr", "sample_psnr")
        ]
        print(f"| {r['attacker']} | {r['protection']} | {r['psnr']:.1f} | " + " | ".join(cells) + " |")
    for attacker in ATTACKERS:
        share = {r["protection"]: r["learned"] for r in rows if r["attacker"] == attacker}
        pairs = [("aspl", "photoguard"), ("aspl", "photoguard at ASPL's PSNR")]
        if args.aspl_tile is not None:
            pairs += [(tiled_name(args.aspl_tile), "aspl"), (tiled_name(args.aspl_tile), "photoguard")]
        if args.per_image:
            pairs += [(PER_IMAGE, tiled_name(args.aspl_tile) if args.aspl_tile is not None else "aspl")]
        for ours, peer in pairs:
            if ours not in share or peer not in share:
                continue
            ratio = share[ours]["mean"] / share[peer]["mean"]
            gaps = [a - p for a, p in zip(share[ours]["per_seed"], share[peer]["per_seed"])]
            print(
                f"{attacker} attacker: {ours} / {peer} learned share = {ratio:.3f} (paired gap per attack seed: "
                + ", ".join(f"{g:+.3f}" for g in gaps)
                + ")"
            )
    if args.json is not None:
        record = {
            "benchmark": "bench_aspl",
            "date": datetime.date.today().isoformat(),
            "machine": machine(),
            "settings": vars(args) | {"json": str(args.json), "attackers": ATTACKERS, "crops": boxes},
            "untuned_clean_loss": untuned,
            "rows": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
