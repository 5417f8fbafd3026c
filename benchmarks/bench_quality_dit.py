"""Guidance quality on the demo DiT, every setting on the same seeds.

``--suite apg``: no guidance, CFG and APG at the same scales (class-conditional).
``--suite perturbation``: unconditional (the null label) with no guidance, PAG,
SoftPAG on heads found by HeadHunter (objective: the demo classifier's
confidence in its top class) and TPG; then class-conditional CFG against
CFG + each of them.

Prints Markdown tables (FD, precision, recall, accuracy, saturation, clipped)
and writes a contact sheet per setting to ``--figures``.

    python -m benchmarks.bench_quality_dit --suite apg --per-class 20 --steps 25
    python -m benchmarks.bench_quality_dit --suite perturbation --per-class 20 --steps 25
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from apps.demo import CLASS_NAMES, generate, load_classifier
from apps.device import best_device
from apps.services import load_pipeline
from benchmarks.quality import contact_sheet, measure, table
from guidance import APG, CFG, PAG, TPG, SoftPAG, guide
from guidance.search import headhunter, save_heads
from protect.evaluate import null_class


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--scales", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    parser.add_argument("--suite", choices=["apg", "perturbation"], default="apg")
    parser.add_argument("--figures", type=Path, default=Path(__file__).resolve().parent / "figures")
    parser.add_argument("--device", default=str(best_device()[0]))
    args = parser.parse_args()
    pipe = load_pipeline("demo/dit", args.device, torch.float32)
    classifier = load_classifier(args.device)
    labels = torch.arange(len(CLASS_NAMES)).repeat_interleave(args.per_class)
    real, _ = generate(4000, torch.Generator().manual_seed(12345))
    real_features = torch.cat([classifier.features(x.to(args.device)).cpu() for x in real.split(500)])

    args.figures.mkdir(parents=True, exist_ok=True)
    if args.suite == "apg":
        settings: list[tuple[str, tuple, torch.Tensor | None]] = [("no guidance", (), labels)]
        settings += [(f"CFG {w:g}", (CFG(w),), labels) for w in args.scales]
        settings += [(f"APG {w:g} (x0, eta 0, auto r, beta -0.5)", (APG(w),), labels) for w in args.scales]
        settings += [
            (f"APG {w:g} (x0, eta 0, no threshold, beta -0.5)", (APG(w, norm_threshold=None),), labels)
            for w in args.scales
        ]
    else:
        heads = search_heads(pipe, classifier, args)
        null = torch.full_like(labels, null_class(pipe.transformer))
        weak = [
            ("PAG 2", PAG(2.0)),
            (f"SoftPAG 2 ({len(heads)} searched heads, u 0.5)", SoftPAG(2.0, heads=heads, strength=0.5)),
            ("TPG 2", TPG(2.0)),
        ]
        settings = [("unconditional, no guidance", (), null)]
        settings += [(f"unconditional, {name}", (method,), null) for name, method in weak]
        settings += [("CFG 3", (CFG(3.0),), labels)]
        settings += [(f"CFG 3 + {name}", (CFG(3.0), method), labels) for name, method in weak]

    held_out, _ = generate(len(labels), torch.Generator().manual_seed(999))
    rows = [("real data (held out)", measure(held_out, None, real_features, classifier))]
    for name, methods, requested in settings:
        start = time.perf_counter()
        images = sample(pipe, requested, methods, args.steps)
        metrics = measure(
            images, requested if requested[0] != null_class(pipe.transformer) else None, real_features, classifier
        )
        metrics["seconds"] = time.perf_counter() - start
        rows.append((name, metrics))
        slug = name.replace(" (x0, eta 0, ", "_").replace(", beta -0.5)", "").replace(",", "").replace("(", "")
        slug = slug.replace(")", "").replace(" ", "_").replace("+", "plus").lower()
        contact_sheet(images.view(len(CLASS_NAMES), args.per_class, *images.shape[1:])[:, :8].flatten(0, 1), 8).save(
            args.figures / f"dit_{slug}.png"
        )
    print(
        f"# demo DiT ({args.suite}), {len(labels)} samples ({args.per_class} per class where conditional), "
        f"{args.steps} steps, same seeds"
    )
    print(table(rows, ["fd", "precision", "recall", "accuracy", "saturation", "clipped", "seconds"]))


def search_heads(pipe, classifier, args) -> list[tuple[str, int]]:
    """HeadHunter on the unconditional DiT: heads whose SoftPAG makes samples the classifier is surest of."""

    @torch.no_grad()
    def confidence(images, prompts):
        logits = classifier((images * 2 - 1).to(classifier.device))
        return logits.softmax(dim=1).amax(dim=1).cpu()

    ranked = headhunter(
        pipe,
        [str(i) for i in range(16)],
        confidence,
        scale=2.0,
        strength=1.0,
        rounds=2,
        heads_per_round=2,
        num_inference_steps=10,
        batch_size=16,
        progress=False,
        call_kwargs=lambda pipe, prompts: {"class_labels": [null_class(pipe.transformer)] * len(prompts)},
    )
    save_heads(args.figures / "dit_headhunter.json", ranked)
    print("HeadHunter:", ", ".join(f"{h.layer}#{h.head} ({h.score:.3f})" for h in ranked))
    return [(h.layer, h.head) for h in ranked]


@torch.no_grad()
def sample(pipe, labels: torch.Tensor, methods: tuple, steps: int, batch: int = 100, seed: int = 0) -> torch.Tensor:
    """Images in [-1, 1]; sample ``i`` always gets the noise of seed ``seed * 100000 + i``."""
    out = []
    for start in range(0, len(labels), batch):
        chunk = labels[start : start + batch].tolist()
        generators = [torch.Generator(pipe.device).manual_seed(seed * 100_000 + start + i) for i in range(len(chunk))]
        # guidance_scale 1: the pipeline's own CFG stays off unless a method asks for the unconditional branch
        call = dict(
            class_labels=chunk, num_inference_steps=steps, generator=generators, output_type="np", guidance_scale=1.0
        )
        if methods:
            with guide(pipe, *methods):
                images = pipe(**call).images
        else:
            images = pipe(**call).images
        out.append(torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1)
    return torch.cat(out)


if __name__ == "__main__":
    main()
