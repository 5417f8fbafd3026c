"""Guidance quality on the demo DiT: no guidance, CFG and APG at the same scales, same seeds.

Prints a Markdown table (FD, precision, recall, accuracy, saturation, clipped)
and writes a contact sheet per setting to ``--figures``.

    python benchmarks/bench_quality_dit.py --per-class 20 --steps 25
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from apps.demo import CLASS_NAMES, generate, load_classifier
from apps.models import load_pipeline
from guidance import APG, CFG, PAG, TPG, guide
from quality import contact_sheet, measure, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--scales", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    parser.add_argument("--perturbation", action="store_true", help="also CFG + PAG / TPG at the middle scale")
    parser.add_argument("--figures", type=Path, default=Path("benchmarks/figures"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    pipe = load_pipeline("demo/dit", args.device, torch.float32)
    classifier = load_classifier(args.device)
    labels = torch.arange(len(CLASS_NAMES)).repeat_interleave(args.per_class)
    real, _ = generate(4000, torch.Generator().manual_seed(12345))
    real_features = torch.cat([classifier.features(x.to(args.device)).cpu() for x in real.split(500)])

    settings: list[tuple[str, tuple]] = [("no guidance", ())]
    settings += [(f"CFG {w:g}", (CFG(w),)) for w in args.scales]
    settings += [(f"APG {w:g} (x0, eta 0, auto r, beta -0.5)", (APG(w),)) for w in args.scales]
    if args.perturbation:
        mid = args.scales[len(args.scales) // 2]
        settings += [(f"CFG {mid:g} + PAG 2", (CFG(mid), PAG(2.0))), (f"CFG {mid:g} + TPG 2", (CFG(mid), TPG(2.0)))]

    held_out, _ = generate(len(labels), torch.Generator().manual_seed(999))
    rows = [("real data (held out)", measure(held_out, None, real_features, classifier))]
    args.figures.mkdir(parents=True, exist_ok=True)
    for name, methods in settings:
        start = time.perf_counter()
        images = sample(pipe, labels, methods, args.steps)
        metrics = measure(images, labels, real_features, classifier)
        metrics["seconds"] = time.perf_counter() - start
        rows.append((name, metrics))
        slug = name.split(" (")[0].replace(" ", "_").replace("+", "plus").lower()
        contact_sheet(images.view(len(CLASS_NAMES), args.per_class, *images.shape[1:])[:, :8].flatten(0, 1), 8).save(
            args.figures / f"dit_{slug}.png"
        )
    print(f"# demo DiT, {len(labels)} samples ({args.per_class} per class), {args.steps} DDIM steps, same seeds")
    print(table(rows, ["fd", "precision", "recall", "accuracy", "saturation", "clipped", "seconds"]))


@torch.no_grad()
def sample(pipe, labels: torch.Tensor, methods: tuple, steps: int, batch: int = 100) -> torch.Tensor:
    """Images in [-1, 1]; sample ``i`` always gets the noise of seed ``i``."""
    out = []
    for start in range(0, len(labels), batch):
        chunk = labels[start : start + batch].tolist()
        generators = [torch.Generator(pipe.device).manual_seed(start + i) for i in range(len(chunk))]
        call = dict(class_labels=chunk, num_inference_steps=steps, generator=generators, output_type="np")
        if methods:
            with guide(pipe, *methods):
                images = pipe(**call).images
        else:
            images = pipe(**call, guidance_scale=1.0).images
        out.append(torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1)
    return torch.cat(out)


if __name__ == "__main__":
    main()
