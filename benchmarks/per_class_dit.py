"""Which classes does a demo DiT draw, and which does it confuse? Per-class accuracy and the confusion matrix of the
demo classifier on DiT samples, unguided and with CFG, over seeds (the sweep's noise: sample ``i`` of seed ``s``
gets ``s * 100000 + i``), beside the classifier's own accuracy on held-out real shapes of each class (its ceiling).

    OMP_NUM_THREADS=1 python -m benchmarks.per_class_dit --model demo/dit --json benchmarks/results/per_class_dit.json
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch

from apps.demo import CLASS_NAMES, generate, load_classifier
from apps.demo.classifier import batched
from apps.services import load_pipeline
from benchmarks.bench_quality_dit import sample
from benchmarks.common import machine
from guidance import CFG


def confusion(classifier, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(K, K) counts: row = requested class, column = the classifier's verdict."""
    verdicts = batched(classifier, images).argmax(1)
    k = len(CLASS_NAMES)
    return torch.bincount(labels * k + verdicts, minlength=k * k).view(k, k)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo/dit")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--cfg", type=float, nargs="*", default=[3.0], help="CFG scales beside no guidance")
    parser.add_argument("--real", type=int, default=1000, help="held-out real shapes for the ceiling")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    pipe = load_pipeline(args.model, "cpu", torch.float32)
    pipe.set_progress_bar_config(disable=True)
    classifier = load_classifier("cpu")
    labels = torch.arange(len(CLASS_NAMES)).repeat_interleave(args.per_class)
    real, real_labels = generate(args.real, torch.Generator().manual_seed(12345))
    settings = {"real shapes (ceiling)": confusion(classifier, real, real_labels)}
    for name, methods in [("no guidance", ()), *[(f"CFG {w:g}", (CFG(w),)) for w in args.cfg]]:
        counts = sum(
            confusion(classifier, sample(pipe, labels, methods, args.steps, seed=seed), labels)
            for seed in range(1, args.seeds + 1)
        )
        settings[name] = counts
    header = "| setting | " + " | ".join(CLASS_NAMES) + " | all |"
    lines = [header, "|---" * (len(CLASS_NAMES) + 2) + "|"]
    for name, counts in settings.items():
        per_class = (counts.diag() / counts.sum(1).clamp_min(1)).tolist()
        overall = (counts.diag().sum() / counts.sum()).item()
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in per_class) + f" | {overall:.3f} |")
    print("\n".join(lines))
    for name, counts in settings.items():
        worst = int((counts.diag() / counts.sum(1).clamp_min(1)).argmin())
        row = counts[worst].clone()
        row[worst] = -1
        print(f"{name}: weakest class {CLASS_NAMES[worst]}, most often taken for {CLASS_NAMES[int(row.argmax())]}")
    record = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "classes": list(CLASS_NAMES),
        "confusion": {name: counts.tolist() for name, counts in settings.items()},
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1, default=str) + "\n")
    return record


if __name__ == "__main__":
    main()
