"""The detector's score model in bfloat16 against float32, side by side: speed, and whether the verdicts change.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_detect_dtype --n 8 --size 256

Loads a saved native-resolution detector (default ``demo_models/photo_detector``) twice, through the app's
``apps.services.load_detector``: its score model in float32 (the precision it was fitted and calibrated in) and in
``--dtype`` (default bfloat16). Both score the same held-out photo crops (``apps.demo.photos.HELD_OUT``, never
used to fit or calibrate; ``--size`` px, native resolution), clean, JPEG q75, and after one FGSM step up the score
model's loss at 4/255 and 8/255 (``protect.patches.score_fgsm``, a detector-aware worst case for the agreement).
Prints the seconds per image of each (best of ``--repeats`` timed passes after a warm-up) and their ratio, the
largest score difference against the threshold, and how many verdicts differ. ``--json`` writes the report.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from .bench_detect_photos import benign, crops, signed
from .common import machine


def timed(function, repeats: int) -> tuple[float, object]:
    """The result of ``function()`` and the best of ``repeats`` wall times after one warm-up call."""
    result = function()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--detector", type=Path, default=None, help="saved detector (default: the demo one)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=8, help="held-out crops per kind")
    parser.add_argument("--size", type=int, default=256, help="crop side in pixels")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes over the clean crops")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    from apps.demo.photos import HELD_OUT
    from apps.services import detect_images, load_detector
    from protect.patches import score_fgsm

    reference = load_detector(args.detector, args.device, "float32")
    fast = load_detector(args.detector, args.device, args.dtype)
    arrays = crops(list(HELD_OUT), args.n, args.size, seed=300)
    with tempfile.TemporaryDirectory() as folder:
        jpeg = benign(arrays, "jpeg75", Path(folder))
    clean = [Image.fromarray(a) for a in arrays]
    kinds = {"clean": clean, "jpeg75": [Image.fromarray(a) for a in jpeg]}
    for budget in (4, 8):
        attacked = [
            score_fgsm(reference.denoiser, x, budget / 255, patch_size=reference.patch_size, seed=i)
            for i, x in enumerate(signed(arrays))
        ]
        kinds[f"fgsm{budget}"] = [
            Image.fromarray(((x + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()) for x in attacked
        ]
    seconds = {}
    for name, detector in (("float32", reference), (args.dtype, fast)):
        seconds[name], _ = timed(lambda d=detector: detect_images(d, clean), args.repeats)
        seconds[name] /= len(clean)
    rows = []
    threshold = float(reference.threshold)
    for kind, images in kinds.items():
        a, b = detect_images(reference, images), detect_images(fast, images)
        diff = torch.tensor([x["score"] - y["score"] for x, y in zip(a, b)]).abs()
        margin = torch.tensor([abs(x["score"] - threshold) for x in a])
        rows.append(
            {
                "kind": kind,
                "n": len(images),
                "flagged_float32": sum(x["verdict"] == "adversarial" for x in a),
                f"flagged_{args.dtype}": sum(y["verdict"] == "adversarial" for y in b),
                "verdicts_differ": sum(x["verdict"] != y["verdict"] for x, y in zip(a, b)),
                "max_abs_score_diff": float(diff.max()),
                "max_diff_over_threshold": float(diff.max()) / threshold,
                "min_margin_to_threshold": float(margin.min()),
            }
        )
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{machine()}, device {args.device}",
        "detector": str(args.detector or "demo_models/photo_detector"),
        "threshold": threshold,
        "size": args.size,
        "seconds_per_image": seconds,
        "speedup": seconds["float32"] / seconds[args.dtype],
        "rows": rows,
    }
    print(f"{report['date']}: {report['machine']}; {args.n} held-out {args.size} px crops per kind")
    print(
        f"seconds per image: float32 {seconds['float32']:.3f}, {args.dtype} {seconds[args.dtype]:.3f}, "
        f"speed-up {report['speedup']:.2f}x (threshold {threshold:.4g})"
    )
    print(f"| kind | n | flagged float32 | flagged {args.dtype} | verdicts differ | max abs score diff "
          "| / threshold | min margin to threshold |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['kind']} | {r['n']} | {r['flagged_float32']} | {r[f'flagged_{args.dtype}']} | "
            f"{r['verdicts_differ']} | {r['max_abs_score_diff']:.2e} | {r['max_diff_over_threshold']:.2%} | "
            f"{r['min_margin_to_threshold']:.3g} |"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
