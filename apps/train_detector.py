"""``steerguard train detector``: fit and calibrate a native-resolution EPS-AD detector
(:class:`protect.PatchEPSDetector`) for any unconditional diffusers pixel model, and ``save_pretrained`` it.

    steerguard train detector --score-model google/ddpm-cifar10-32 --clean photos/ --out my_detector
    steerguard train detector --score-model demo/unet_eps --clean clean/ --attacked protected/ --out my_detector

The clean images are split: ``--calibration-fraction`` of them (whole images) set the threshold at ``--fpr``,
the rest train the kernel and give the reference set. Without ``--attacked`` the kernel is trained against a
default attack on the training images: one FGSM step up the score model's denoising loss
(:func:`protect.patches.score_fgsm`), budgets cycling through ``--attack-eps`` (4, 8, 16 /255).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from .files import FORMATS, open_upload
from .models import load_score_model

SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def read_folder(folder: Path, channels: int = 3) -> list[torch.Tensor]:
    """Every image file in ``folder`` (sorted by name) as a ``(C, H, W)`` tensor in ``[0, 1]``."""
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no image files ({', '.join(FORMATS)})")
    images = []
    for path in files:
        image = open_upload(path, purpose="detect").image
        if channels == 1:
            image = image.convert("L")
        array = np.asarray(image, dtype=np.float32).copy() / 255
        images.append(torch.from_numpy(array).reshape(*array.shape[:2], -1).permute(2, 0, 1))
    return images


def main(argv: list[str] | None = None) -> int:
    from protect import PatchEPSDetector
    from protect.patches import score_fgsm

    parser = argparse.ArgumentParser(prog="steerguard train detector", description=__doc__.split("\n\n")[0])
    parser.add_argument("--score-model", required=True, help="diffusers UNet pipeline: hub id, folder or demo/<name>")
    parser.add_argument("--clean", type=Path, required=True, help="folder of clean images (any sizes)")
    parser.add_argument("--attacked", type=Path, default=None, help="folder of attacked images (default: FGSM)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (save_pretrained)")
    parser.add_argument("--fpr", type=float, default=0.05, help="false-positive rate of the threshold")
    parser.add_argument("--calibration-fraction", type=float, default=0.25)
    parser.add_argument("--timesteps", type=int, default=20, help="EPS levels t_k = k/1000, k = 1..T")
    parser.add_argument("--max-patches", type=int, default=256, help="patches scored per image at most")
    parser.add_argument("--fit-patches", type=int, default=32, help="patches per training image")
    parser.add_argument("--reference-size", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=256, help="model evaluations per forward pass")
    parser.add_argument("--attack-eps", type=float, nargs="+", default=[4.0, 8.0, 16.0], help="FGSM budgets /255")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        raise ValueError(f"{args.out} exists and is not empty: choose a new output folder")
    if any(not 0 < e <= 64 for e in args.attack_eps):
        raise ValueError("--attack-eps budgets must lie in (0, 64] (1/255 units)")
    start = time.perf_counter()
    unet, scheduler = load_score_model(args.score_model, args.device)
    detector = PatchEPSDetector(
        unet,
        scheduler,
        timesteps=args.timesteps,
        fpr=args.fpr,
        calibration_fraction=args.calibration_fraction,
        max_patches=args.max_patches,
        fit_patches=args.fit_patches,
        reference_size=args.reference_size,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    channels = unet.config.in_channels
    clean = [x.to(args.device) * 2 - 1 for x in read_folder(args.clean, channels)]
    if args.attacked is not None:
        attacked = [x.to(args.device) * 2 - 1 for x in read_folder(args.attacked, channels)]
        attack = f"given ({args.attacked})"
    else:
        budgets = [e / 255 for e in args.attack_eps]
        attacked = [
            score_fgsm(detector.denoiser, x, budgets[i % len(budgets)], patch_size=detector.patch_size, seed=i)
            for i, x in enumerate(clean)
        ]
        attack = f"FGSM on the score model's denoising loss, {'/'.join(f'{e:g}' for e in args.attack_eps)} /255"
    generator = torch.Generator().manual_seed(args.seed)
    detector.fit(clean, attacked, generator=generator, value_range=(-1, 1))
    detector.save_pretrained(args.out, diffusion_model=args.score_model)
    summary = {
        **detector.describe(),
        "score_model": args.score_model,
        "clean_images": len(clean),
        "attacked": attack,
        "seconds": round(time.perf_counter() - start, 2),
    }
    (args.out / "training.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0
