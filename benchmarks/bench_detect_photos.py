"""Native-resolution EPS-AD on held-out photos: what it detects, what it must not flag, and what it costs.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_detect_photos --score-model demo/unet_eps --json out.json

1. A :class:`protect.PatchEPSDetector` on ``--score-model`` (default ``demo/unet_eps``; ``demo/photo_unet`` once
   trained), fitted like ``steerguard train detector`` does by default: seeded native-resolution crops of the
   *training* photos (``apps.demo.photos.TRAIN``) against one FGSM step up the score model's denoising loss at
   4/8/16 /255 (``--detector DIR`` loads a saved one instead);
2. its threshold recalibrated at ``--fpr`` on ``--n-cal`` crops of one half of each *held-out* photo
   (``apps.demo.photos.HELD_OUT``: astronaut, coffee, china, camera), the same for the two naive baselines: the
   mean ``||EPS||`` of the same patches and the image's high-frequency (Laplacian) energy;
3. crops of the other half of each held-out photo (``--size`` px, native resolution, never resized; no pixel
   and no benign noise draw in common with the calibration crops): clean, protected (PhotoGuard, Mist, SDS
   with ``--steps`` PGD steps against the app's photo VAE, ``demo/photo_vae``, with the photo latent model
   ``demo/photo_ldm`` as the semantic part of Mist and SDS, on 128 px tiles as the app runs them, and the photo
   amortized protector, at ``--budgets``), and
   after benign changes (the pixel changes JPEG q90/75/50, resize x0.5 and back, Gaussian noise 2/255 and blur
   from the one table of purifications, :data:`protect.purify.PURIFICATIONS`; the file re-encodings PNG, WebP,
   a 16-bit grey PNG source, a CMYK JPEG source and an EXIF-rotated JPEG), each decoded the way the app decodes
   uploads (``apps.files.open_upload``);
   and classifier attacks on the demo victim (``--attacks``, :func:`protect.testbed.attack`, 10 steps, untargeted
   away from the victim's own answer) at native resolution;
4. AUROC, TPR at 5 % FPR and FPR at 95 % TPR against the clean test crops, and the flag rate at the calibrated
   threshold, for EPS-AD and both baselines; the operating points (:func:`operating_points`: worst benign flag
   rate against detection at 8/255 as the threshold moves); seconds per 512x512 and 1024x1024 image with the
   patch count. The score model is fitted in float32 and scores in ``--dtype`` (default ``auto``, as the app).

Writes a JSON report (``--json``), prints Markdown tables, and with ``--save DIR`` saves the calibrated detector.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from protect.metrics import auroc, flag_rate, threshold_at_fpr, tpr_at_fpr
from protect.purify import PURIFICATIONS
from protect.testbed import high_frequency_energy

PIXEL_CHANGES = ("jpeg90", "jpeg75", "jpeg50", "resize0.5_pil", "noise2_8bit", "blur1_pil")  # PURIFICATIONS names
REENCODINGS = ("png", "webp", "16bit", "cmyk", "exif")  # the same pixels in another file format or layout
BENIGN = PIXEL_CHANGES + REENCODINGS
PROTECTIONS = ("photoguard", "mist", "sds", "amortized")
# Calibration and test crops come from opposite halves of each held-out photo, and their benign noise from seeds
# of their own (the fit's augmentation draws from 10_000 + ...): no test crop shares a pixel or a noise draw with
# a crop its threshold was set on.
CALIBRATION_HALF, TEST_HALF = 0, 1
CALIBRATION_NOISE_SEED, TEST_NOISE_SEED = 20_000, 30_000
CLASSIFIER_ATTACKS = ("fgsm", "pgd")  # on the demo victim (the shapes classifier: convolutional, any input size)


def fpr_at_tpr(negative: torch.Tensor, positive: torch.Tensor, tpr: float = 0.95) -> float:
    """False-positive rate at the largest threshold that still flags ``tpr`` of the positives."""
    threshold = float(torch.quantile(positive.double(), 1 - tpr, interpolation="lower"))
    return (negative.double() >= threshold).double().mean().item()


def crops(names: list[str], n: int, size: int, seed: int, half: int | None = None) -> list[np.ndarray]:
    """``n`` seeded ``size`` px square crops (uint8 HxWx3), cycling through the photos ``names``.

    ``half`` (0 or 1) draws them from that half of each photo only, split across its longer side, so crops of
    half 0 (calibration) and half 1 (test) never share a pixel; the side is then at most the half's shorter side.
    """
    from apps.demo.photos import photo_uint8

    if half not in (None, 0, 1):
        raise ValueError(f"half must be None, 0 or 1, not {half!r}")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        array = photo_uint8(names[i % len(names)])
        if half is not None:
            h, w = array.shape[:2]
            if w >= h:
                array = array[:, : w // 2] if half == 0 else array[:, w // 2 :]
            else:
                array = array[: h // 2] if half == 0 else array[h // 2 :]
        h, w = array.shape[:2]
        side = min(size, h, w)
        r, c = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        out.append(np.ascontiguousarray(array[r : r + side, c : c + side]))
    return out


def benign(arrays: list[np.ndarray], change: str, folder: Path, seed: int = 0) -> list[np.ndarray]:
    """``arrays`` (uint8 RGB, of one size) after a benign change, each decoded as the app decodes an upload: a
    pixel change of :data:`PIXEL_CHANGES` (on the batch; the noise of image ``i`` is drawn from seed
    ``seed + i``) saved as PNG, or a file re-encoding of :data:`REENCODINGS`."""
    from apps.files import open_upload

    if change in PIXEL_CHANGES:
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
        # the table's entry, with its own noise seeds for noise (the entry holds seed 0)
        changed = (
            PURIFICATIONS[change].fn(batch, seed=seed) if change == "noise2_8bit" else PURIFICATIONS[change](batch)
        )
        arrays = [(x * 255).round().byte().permute(1, 2, 0).numpy() for x in changed]
    out = []
    for i, array in enumerate(arrays):
        path = folder / f"{change}-{i}.bin"
        reencode(Image.fromarray(array), "png" if change in PIXEL_CHANGES else change, path)
        out.append(np.asarray(open_upload(path, purpose="detect").image))
    return out


def reencode(image: Image.Image, change: str, path: Path) -> None:
    """Save ``image`` to ``path`` with the file-level change ``change`` of :data:`REENCODINGS`."""
    if change == "png":
        image.save(path, format="PNG", optimize=True)
    elif change == "webp":
        image.save(path, format="WEBP", quality=90)
    elif change == "16bit":  # a 16-bit grey PNG source (the luma at 16 bits)
        grey = np.asarray(image.convert("L"), dtype=np.float64) / 255 * 65535
        Image.fromarray(grey.round().astype(np.uint16)).save(path, format="PNG")
    elif change == "cmyk":
        image.convert("CMYK").save(path, format="JPEG", quality=95)
    elif change == "exif":  # stored rotated, with the EXIF orientation that turns it back
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 CW to display
        image.transpose(Image.Transpose.ROTATE_90).save(path, format="JPEG", quality=95, exif=exif)
    else:
        raise ValueError(f"unknown benign change {change!r}")


def augment(images: list[torch.Tensor], change: str, seed: int) -> list[torch.Tensor]:
    """Signed images after the benign pixel change ``change`` of :data:`PIXEL_CHANGES`, one at a time (their sizes
    differ); noise is drawn from seeds ``10_000 + 100 seed + i``, never the calibration or test crops' seeds."""
    out = []
    for i, x in enumerate(images):
        x01 = x[None].add(1).div(2)
        if change == "noise2_8bit":
            changed = PURIFICATIONS[change].fn(x01, seed=10_000 + 100 * seed + i)
        else:
            changed = PURIFICATIONS[change](x01)
        out.append(changed[0].mul(2).sub(1))
    return out


def signed(arrays: list[np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(a.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1 for a in arrays]


def scores(detector, images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """EPS-AD, mean ||EPS|| over the same patches, and HF energy, per image (one EPS pass)."""
    from protect.mmd import mmd2_to_reference

    c = detector.config
    parts = detector.patch_eps(images, [c.max_patches] * len(images), [c.seed] * len(images))
    eps_ad, norm = [], []
    with torch.no_grad():
        for eps, _, _ in parts:
            kernel, e = detector.kernel_and(eps)
            eps_ad.append(float(mmd2_to_reference(detector.reference.to(e), e, kernel)[0]))
            norm.append(float(eps.flatten(1).norm(dim=1).mean()))
    hf = [float(high_frequency_energy(x[None])[0]) for x in images]
    return {"eps_ad": torch.tensor(eps_ad), "eps_norm": torch.tensor(norm), "hf_energy": torch.tensor(hf)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--score-model", default="demo/unet_eps")
    parser.add_argument("--detector", type=Path, default=None, help="a saved PatchEPSDetector (default: fit one)")
    parser.add_argument("--n-fit", type=int, default=34, help="training-photo crops to fit on (FGSM attacked)")
    parser.add_argument(
        "--clean-augment",
        nargs="*",
        default=[],
        choices=PIXEL_CHANGES,
        help="also fit on the training crops after these benign pixel changes, as clean (e.g. noise2_8bit)",
    )
    parser.add_argument(
        "--fit-budgets",
        type=int,
        nargs="+",
        default=[4, 8, 16],
        help="FGSM budgets (1/255) of the attacked fit crops, in turn (default 4 8 16)",
    )
    parser.add_argument(
        "--calibrate-benign",
        nargs="*",
        default=[],
        choices=BENIGN,
        help="also calibrate every threshold on the calibration crops after these benign changes: the threshold "
        "is the highest of the clean and the per-change --fpr quantiles",
    )
    parser.add_argument("--n-cal", type=int, default=8, help="held-out crops to calibrate the thresholds on")
    parser.add_argument("--n-test", type=int, default=4, help="held-out test crops, protected")
    parser.add_argument("--n-benign", type=int, default=8, help="held-out test crops, benign changes")
    parser.add_argument("--size", type=int, default=256, help="crop side (native resolution)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--protections", nargs="*", default=list(PROTECTIONS))
    parser.add_argument("--benign", nargs="*", default=list(BENIGN), choices=BENIGN, help="benign-change rows")
    parser.add_argument(
        "--attacks",
        nargs="*",
        default=list(CLASSIFIER_ATTACKS),
        help="attacks on the demo victim classifier at native resolution (protect.testbed.attack names), at --budgets",
    )
    parser.add_argument(
        "--dtype", default="auto", help="score model precision when scoring (as the app: auto, float32, bfloat16, ...)"
    )
    parser.add_argument("--steps", type=int, default=1, help="PGD steps of PhotoGuard / Mist / SDS")
    parser.add_argument("--mist-sds-budgets", type=int, nargs="+", default=[8], help="Mist/SDS budgets (cost)")
    parser.add_argument("--max-patches", type=int, default=64)
    parser.add_argument("--timesteps", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--fpr", type=float, default=0.05)
    parser.add_argument("--timing-patches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--save", type=Path, default=None, help="save the calibrated detector here")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    from apps.demo.photos import HELD_OUT, TRAIN
    from apps.device import score_dtype
    from apps.models import load_score_model
    from protect import PatchEPSDetector
    from protect.patches import score_fgsm

    start = time.perf_counter()
    unet, scheduler = load_score_model(args.score_model)
    if args.detector is not None:
        detector = PatchEPSDetector.from_pretrained(args.detector, unet, scheduler)
        fit = f"loaded from {args.detector}"
    else:
        detector = PatchEPSDetector(
            unet,
            scheduler,
            timesteps=args.timesteps,
            max_patches=args.max_patches,
            fit_patches=24,
            reference_size=256,
            epochs=args.epochs,
            lr=2e-3,
            fpr=args.fpr,
            seed=args.seed,
        )
        rng = np.random.default_rng(args.seed + 1)
        fit_crops = [crops([name], 1, int(rng.integers(96, 193)), args.seed + 7 + i)[0] for i, name in
                     enumerate([TRAIN[i % len(TRAIN)] for i in range(args.n_fit)])]  # fmt: skip
        clean_fit = signed(fit_crops)
        augmented = [augment(clean_fit[i::len(args.clean_augment)], change, seed=i)
                     for i, change in enumerate(args.clean_augment)]  # fmt: skip
        budgets = [b / 255 for b in args.fit_budgets]
        attacked = [
            score_fgsm(detector.denoiser, x, budgets[i % len(budgets)], patch_size=detector.patch_size, seed=i)
            for i, x in enumerate(clean_fit)
        ]
        detector.fit(clean_fit + [x for part in augmented for x in part], attacked, value_range=(-1, 1))
        fit = (
            f"{len(clean_fit)} training-photo crops (96-192 px) vs FGSM on the score model "
            f"{'/'.join(map(str, args.fit_budgets))} /255"
        )
        if args.clean_augment:
            fit += f"; clean also: a share of those crops after {', '.join(args.clean_augment)}"
    detector.config = detector.config.from_dict({**detector.config.to_dict(), "max_patches": args.max_patches})
    dtype = score_dtype("cpu", args.dtype)
    unet.to(dtype)  # fitted in float32 (as `train detector`); scored in the app's precision
    fit_seconds = time.perf_counter() - start
    print(f"detector: {fit} ({fit_seconds:.0f} s)", flush=True)

    held = list(HELD_OUT)
    calibration_arrays = crops(held, args.n_cal, args.size, args.seed + 100, half=CALIBRATION_HALF)
    cal = scores(detector, signed(calibration_arrays))
    benign_cal = {}
    with tempfile.TemporaryDirectory() as tmp:
        for change in args.calibrate_benign:
            changed = benign(calibration_arrays, change, Path(tmp), seed=CALIBRATION_NOISE_SEED)
            benign_cal[change] = scores(detector, signed(changed))
    thresholds = {
        k: max([threshold_at_fpr(v, args.fpr)] + [threshold_at_fpr(b[k], args.fpr) for b in benign_cal.values()])
        for k, v in cal.items()
    }
    detector.set_threshold(cal["eps_ad"], {change: found["eps_ad"] for change, found in benign_cal.items()})
    test_arrays = crops(held, max(args.n_test, args.n_benign), args.size, args.seed + 200, half=TEST_HALF)
    clean = scores(detector, signed(test_arrays[: args.n_benign]))
    print(f"calibrated on {args.n_cal} held-out crops ({time.perf_counter() - start:.0f} s)", flush=True)

    rows = []

    def row(kind: str, name: str, budget: str, found: dict[str, torch.Tensor]) -> None:
        entry = {"kind": kind, "name": name, "budget": budget, "n": len(found["eps_ad"])}
        entry["scores"] = {key: values.tolist() for key, values in found.items()}
        for key, values in found.items():
            reference = clean[key][: args.n_test] if kind == "attack" else clean[key]
            entry[key] = {
                "auroc": auroc(reference, values),
                "tpr_at_5fpr": tpr_at_fpr(reference, values, 0.05),
                "fpr_at_95tpr": fpr_at_tpr(reference, values),
                "flag_rate": flag_rate(values, thresholds[key]),
            }
        rows.append(entry)
        print(json.dumps(entry), flush=True)

    row("clean", "clean (held-out test crops)", "-", clean)
    with tempfile.TemporaryDirectory() as tmp:
        for change in args.benign:
            changed = benign(test_arrays[: args.n_benign], change, Path(tmp), seed=TEST_NOISE_SEED)
            row("benign", change, "-", scores(detector, signed(changed)))

    protection_seconds = {}
    if args.protections:
        from apps.evaluation import default_photo_protector, protect_photos
        from apps.models import load_latent_model, load_vae, resolve
        from apps.services import PGD_TILE, PROTECT_LDM, PROTECT_VAE
        from protect import AmortizedProtector

        vae = load_vae(PROTECT_VAE, "cpu")  # the app's protection targets: the photo VAE and latent model
        latent_model = load_latent_model(PROTECT_LDM, PROTECT_VAE, "cpu")[:2]
        protector = AmortizedProtector.from_pretrained(resolve(default_photo_protector()))
        images01 = torch.stack(signed(test_arrays[: args.n_test])).add(1).div(2)
        for method in args.protections:
            budgets = args.mist_sds_budgets if method in ("mist", "sds") else args.budgets
            name = method if method == "amortized" else f"{method}@{args.steps}"
            for budget in budgets:
                out, seconds = protect_photos(
                    images01, [name], vae=vae, eps=budget / 255, latent_model=latent_model, protector=protector,
                    seed=args.seed, tile=PGD_TILE,
                )  # fmt: skip
                protection_seconds[f"{name} {budget}/255"] = seconds[name]
                arrays = [(x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for x in out[name]]
                row("attack", name, f"{budget}/255", scores(detector, signed(arrays)))

    if args.attacks:
        from apps.demo import load_classifier
        from protect.testbed import attack, frozen_victim

        victim = frozen_victim(load_classifier("cpu"))
        images01 = torch.stack(signed(test_arrays[: args.n_test])).add(1).div(2)
        with torch.no_grad():
            labels = victim(images01).argmax(1)  # untargeted: away from the victim's own answer
        for name in args.attacks:
            for budget in args.budgets:
                t0 = time.perf_counter()
                adversarial = attack(name, victim, images01, labels, budget / 255, steps=10, seed=args.seed)
                protection_seconds[f"classifier {name} {budget}/255"] = (time.perf_counter() - t0) / len(images01)
                arrays = [(x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for x in adversarial]
                row("attack", f"classifier {name}", f"{budget}/255", scores(detector, signed(arrays)))

    timing = []
    from apps.demo.photos import photo_uint8

    base = photo_uint8("astronaut")
    for side in (512, 1024):
        array = base if side == 512 else np.asarray(Image.fromarray(base).resize((1024, 1024), Image.BICUBIC))
        for cap in args.timing_patches:
            detector.config = detector.config.from_dict({**detector.config.to_dict(), "max_patches": cap})
            t0 = time.perf_counter()
            (result,) = detector.analyse(signed([array]), value_range=(-1, 1))
            timing.append({"side": side, "patches": result.patches, "tiles": result.tiles,
                           "seconds": time.perf_counter() - t0})  # fmt: skip
            print(json.dumps(timing[-1]), flush=True)
    detector.config = detector.config.from_dict({**detector.config.to_dict(), "max_patches": args.max_patches})

    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)",
        "score_model": args.score_model,
        "score_dtype": str(dtype).removeprefix("torch."),
        "patch_size": detector.patch_size,
        "fit": fit,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "thresholds": thresholds,
        "calibration": {k: v.tolist() for k, v in cal.items()},
        "benign_calibration": {c: {k: v.tolist() for k, v in found.items()} for c, found in benign_cal.items()},
        "rows": rows,
        "operating_points": operating_points(rows, thresholds["eps_ad"], "8/255"),
        "protection_seconds_per_image": protection_seconds,
        "timing": timing,
        "seconds": time.perf_counter() - start,
    }
    print(markdown(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    if args.save is not None:
        detector.save_pretrained(args.save, diffusion_model=args.score_model)
    return 0


def operating_points(rows: list[dict], calibrated: float, budget: str, key: str = "eps_ad") -> list[dict]:
    """The trade-off between false alarms on benign changes and detection at ``budget``, over thresholds.

    Candidate thresholds: the calibrated one, and for each benign or clean row the smallest threshold that flags
    at most 5 % of it (so the largest candidate keeps every benign change at <= 5 %). For each: the clean and the
    worst benign flag rate (and which change), and the detection rate of every attack row at ``budget``."""
    negatives = [r for r in rows if r["kind"] in ("clean", "benign")]
    positives = [r for r in rows if r["kind"] == "attack" and r["budget"] == budget]
    candidates = {("calibrated on held-out crops", calibrated)}
    for r in negatives:
        values = torch.tensor(r["scores"][key], dtype=torch.float64)
        candidates.add((f"<= 5 % on {r['name']}", threshold_at_fpr(values, 0.05)))

    def rate(r: dict, threshold: float) -> float:
        return flag_rate(torch.tensor(r["scores"][key], dtype=torch.float64), threshold)

    points = []
    for label, threshold in sorted(candidates, key=lambda c: c[1]):
        flags = {r["name"]: rate(r, threshold) for r in negatives}
        worst = max((n for n in flags if n != "clean (held-out test crops)"), key=flags.get, default=None)
        points.append({
            "label": label,
            "threshold": threshold,
            "clean": flags.get("clean (held-out test crops)", float("nan")),
            "worst_benign": flags[worst] if worst else float("nan"),
            "worst_benign_change": worst,
            "detected": {r["name"]: rate(r, threshold) for r in positives},
        })  # fmt: skip
    return points


def markdown(report: dict) -> str:
    keys = ("eps_ad", "eps_norm", "hf_energy")
    lines = [
        "| kind | change / protection | budget | n | " + " | ".join(
            f"{k}: AUROC | {k}: TPR@5%FPR | {k}: FPR@95%TPR | {k}: flagged at the calibrated threshold" for k in keys
        ) + " |",
        "|---|---|---|---|" + "---|" * (4 * len(keys)),
    ]  # fmt: skip
    for r in report["rows"]:
        cells = []
        for k in keys:
            m = r[k]
            cells += [
                f"{m['auroc']:.3f}",
                f"{m['tpr_at_5fpr']:.3f}",
                f"{m['fpr_at_95tpr']:.3f}",
                f"{m['flag_rate']:.3f}",
            ]
        lines.append(f"| {r['kind']} | {r['name']} | {r['budget']} | {r['n']} | " + " | ".join(cells) + " |")
    points = report.get("operating_points") or []
    if points:
        names = list(points[0]["detected"])
        lines += ["", "| threshold | from | clean flagged | worst benign flagged (change) | " + " | ".join(
            f"{n} detected" for n in names) + " |", "|---|---|---|---|" + "---|" * len(names)]  # fmt: skip
        for p in points:
            cells = " | ".join(f"{p['detected'][n]:.3f}" for n in names)
            lines.append(
                f"| {p['threshold']:.4g} | {p['label']} | {p['clean']:.3f} | {p['worst_benign']:.3f} "
                f"({p['worst_benign_change'] if p['worst_benign'] > 0 else '-'}) | {cells} |"
            )
    lines.append("")
    lines.append("| image | patches scored / tiles | seconds |")
    lines.append("|---|---|---|")
    for t in report["timing"]:
        lines.append(f"| {t['side']}x{t['side']} | {t['patches']} / {t['tiles']} | {t['seconds']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
