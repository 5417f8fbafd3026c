"""Scale sweeps of every guidance method on a demo DiT, with the spread over seeds.

Suites (``--suite``, default ``all``):

- ``cfg-apg``: no guidance, CFG and APG over ``w`` in {1.5, 2, 3, 4, 6, 8, 12}; APG with the "auto" norm
  threshold, without one, and with the threshold scaled by 4 and 16 (to revisit the per-family default);
- ``perturbation``: PAG, SoftPAG (every head of PAG's layer, u = 0.5) and TPG over ``s`` in {0.5, 1, 2, 3, 5},
  unconditional (the null label) and on top of CFG at ``--cfg``; a layer sweep of PAG and TPG over every block
  at ``s`` = ``--layer-scale``;
- ``headhunter``: HeadHunter on unconditional samples with an objective that does not saturate (the demo
  classifier's logit margin, top-1 minus top-2) on seeds disjoint from the sweep's; then SoftPAG on the heads
  it picked against as many random heads and against every head (the held-out check);
- ``slg``: skip-layer guidance on each transformer block with CFG at ``--cfg``: at every ``--s`` over the whole
  run and at 2.8 in SD 3.5's window (0.01-0.2 of the steps);
- ``baselines``: the equal-NFE peers: no guidance with twice the steps (2 evaluations per step, like
  unconditional PAG/TPG or CFG) and CFG with 1.5x the steps (3 per step, like CFG + PAG/TPG).

Every setting runs on ``--seeds`` seeds (sample ``i`` of seed ``s`` gets the noise of ``s * 100000 + i``); the
metrics (FD, precision, recall, accuracy, saturation, clipped fraction in the demo classifier's space, see
``benchmarks/quality.py``) are reported as mean and standard deviation over seeds. Results are appended to
``--json`` after each setting, and a rerun skips the settings already there, so a long CPU sweep can resume.
The summary compares each method's best setting (lowest mean FD) with its baseline at equal NFE; "beats"
means the FD gap exceeds the sum of the two standard deviations.

    OMP_NUM_THREADS=1 python -m benchmarks.sweep_dit --model demo/dit --json benchmarks/results/sweep_dit.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from apps.demo import CLASS_NAMES, generate, load_classifier
from apps.device import best_device
from apps.services import load_pipeline
from benchmarks.bench_quality_dit import sample
from benchmarks.quality import contact_sheet, measure
from guidance import APG, CFG, PAG, SLG, TPG, SoftPAG
from guidance.apg import NORM_THRESHOLD_RMS
from guidance.layers import self_attention_layers, transformer_blocks
from guidance.search import headhunter, save_heads
from protect.detector import model_fingerprint
from protect.evaluate import null_class

SCALES_W = (1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)
SCALES_S = (0.5, 1.0, 2.0, 3.0, 5.0)
METRICS = ("fd", "precision", "recall", "accuracy", "saturation", "clipped")
SUITES = ("baselines", "cfg-apg", "perturbation", "headhunter", "slg")


@dataclass
class Setting:
    """One row of the sweep: the methods, whether it is class-conditional, its steps and its family."""

    name: str
    methods: tuple = ()
    conditional: bool = True
    family: str = "none"
    steps_factor: float = 1.0
    nfe_per_step: int = 1
    options: dict[str, Any] = field(default_factory=dict)


def cfg_apg(pipe, args) -> list[Setting]:
    rows = [Setting(f"CFG {w:g}", (CFG(w),), family="cfg", nfe_per_step=2, options={"w": w}) for w in args.w]
    for w in args.w:
        rows.append(Setting(f"APG {w:g} auto r", (APG(w),), family="apg", nfe_per_step=2, options={"w": w}))
        rows.append(
            Setting(f"APG {w:g} no r", (APG(w, norm_threshold=None),), family="apg", nfe_per_step=2, options={"w": w})
        )
    auto = auto_threshold(pipe)
    for w in [w for w in args.w if w in (4.0, 8.0)]:  # the threshold revisited at a moderate and a high scale
        for factor in (4, 16):
            apg = APG(w, norm_threshold=auto * factor)
            rows.append(
                Setting(f"APG {w:g} auto r x{factor}", (apg,), family="apg", nfe_per_step=2,
                        options={"w": w, "norm_threshold": auto * factor})
            )  # fmt: skip
    return rows


def auto_threshold(pipe) -> float:
    """The norm threshold ``r`` APG's "auto" uses on this DiT: the per-element DiT default of
    :data:`guidance.apg.NORM_THRESHOLD_RMS` times the square root of one latent's size (an absolute L2 norm)."""
    config = pipe.transformer.config
    return NORM_THRESHOLD_RMS["dit"] * math.sqrt(config.in_channels * config.sample_size**2)


def weak_methods(pipe, s: float, layers: tuple | str = "auto") -> dict[str, Any]:
    """PAG, SoftPAG (every head of the PAG layer, u = 0.5) and TPG at scale ``s``."""
    pag = PAG(s, layers=layers)
    heads = [(name, h) for name in pag_layer_names(pipe, layers) for h in range(heads_of(pipe))]
    return {"PAG": pag, "SoftPAG": SoftPAG(s, heads=heads, strength=0.5), "TPG": TPG(s, layers=layers)}


def heads_of(pipe) -> int:
    return pipe.transformer.config.num_attention_heads


def pag_layer_names(pipe, layers: tuple | str) -> list[str]:
    """The self-attention layers PAG(layers=...) perturbs on this DiT (by name)."""
    attention = self_attention_layers(pipe.transformer)
    if layers == "auto":
        blocks = list(transformer_blocks(pipe.transformer))
        middle = blocks[len(blocks) // 2]
        return [name for name in attention if name.startswith(middle + ".")]
    return [name for name in attention if any(name.startswith(f"{layer}.") for layer in layers)]


def perturbation(pipe, args) -> list[Setting]:
    rows = []
    for s in args.s:
        for kind, method in weak_methods(pipe, s).items():
            family = kind.lower()
            rows.append(Setting(f"uncond {kind} {s:g}", (method,), False, f"uncond-{family}", 1.0, 2, {"s": s}))
            rows.append(
                Setting(f"CFG {args.cfg:g} + {kind} {s:g}", (CFG(args.cfg), method), True, f"cfg-{family}", 1.0, 3,
                        {"s": s})
            )  # fmt: skip
    for block in transformer_blocks(pipe.transformer) if args.layer_sweep else ():
        for kind, method in weak_methods(pipe, args.layer_scale, (block,)).items():
            if kind == "SoftPAG":
                continue
            name = f"uncond {kind} {args.layer_scale:g} on {block}"
            rows.append(Setting(name, (method,), False, f"uncond-{kind.lower()}-layer", 1.0, 2, {"layer": block}))
    return rows


def skip_layers(pipe, args) -> list[Setting]:
    """SLG on each transformer block with CFG at ``--cfg``: at every ``--s`` over the whole run, and at 2.8 in the
    SD 3.5 window (0.01-0.2 of the steps, diffusers' SD3 defaults)."""
    rows = []
    for index, block in enumerate(transformer_blocks(pipe.transformer)):
        variants = [(f"{s:g}", SLG(s, layers=(block,), start=0.0, stop=1.0)) for s in args.s]
        variants.append(("2.8 in 0.01-0.2", SLG(2.8, layers=(block,))))
        for label, method in variants:
            name = f"CFG {args.cfg:g} + SLG {label} on block {index}"
            rows.append(Setting(name, (CFG(args.cfg), method), True, "cfg-slg", 1.0, 3, {"block": block}))
    return rows


def baselines(args) -> list[Setting]:
    return [
        Setting("no guidance", family="none"),
        Setting("uncond, no guidance", conditional=False, family="uncond-none"),
        Setting("uncond, no guidance, 2x steps", conditional=False, family="uncond-none-2x", steps_factor=2.0),
        Setting("no guidance, 2x steps", family="none-2x", steps_factor=2.0),
        Setting(f"CFG {args.cfg:g}, 1.5x steps", (CFG(args.cfg),), family="cfg-1.5x", steps_factor=1.5,
                nfe_per_step=2),
    ]  # fmt: skip


def margin_objective(classifier):
    """HeadHunter's objective: the classifier's top-1 minus top-2 logit (it does not saturate like softmax)."""

    @torch.no_grad()
    def margin(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        logits = classifier((images * 2 - 1).to(next(classifier.parameters()).device))
        top = logits.topk(2, dim=1).values
        return (top[:, 0] - top[:, 1]).cpu()

    return margin


def hunted(pipe, classifier, args) -> list[Setting]:
    """HeadHunter (seeds 0-15, disjoint from the sweep's) and the held-out check against random heads; when no
    head raises the objective above unguided sampling, HeadHunter picks none (``sweep_headhunter.json`` is
    empty) and only SoftPAG on every head is run."""
    null = null_class(pipe.transformer)
    ranked = headhunter(
        pipe,
        [str(i) for i in range(args.hunt_samples)],
        margin_objective(classifier),
        scale=args.layer_scale,
        strength=1.0,
        rounds=args.hunt_rounds,
        heads_per_round=2,
        num_inference_steps=args.hunt_steps,
        batch_size=args.hunt_samples,
        progress=False,
        call_kwargs=lambda pipe, prompts: {"class_labels": [null] * len(prompts)},
    )
    args.figures.mkdir(parents=True, exist_ok=True)
    save_heads(args.figures / "sweep_headhunter.json", ranked)
    heads = [(h.layer, h.head) for h in ranked]
    every = [(name, h) for name in self_attention_layers(pipe.transformer) for h in range(heads_of(pipe))]
    rng = random.Random(0)
    shuffled = rng.sample([h for h in every if h not in heads], k=min(len(heads), len(every) - len(heads)))
    rows = []
    # no head that beats unguided sampling on the objective: HeadHunter returns none, and only "all" is run
    groups = (("HeadHunter", heads), ("random", shuffled), ("all", every)) if heads else (("all", every),)
    for s in (1.0, args.layer_scale):
        for label, chosen in groups:
            method = SoftPAG(s, heads=chosen, strength=0.5)
            rows.append(
                Setting(f"uncond SoftPAG {s:g} on {len(chosen)} {label} heads", (method,), False,
                        f"uncond-softpag-{label.lower()}", 1.0, 2, {"s": s, "heads": [list(h) for h in chosen]})
            )  # fmt: skip
    return rows


def run_setting(pipe, setting: Setting, args, labels, real_features, classifier) -> dict[str, Any]:
    """The setting on every seed: per-seed metrics, their mean and standard deviation, a contact sheet."""
    requested = labels if setting.conditional else torch.full_like(labels, null_class(pipe.transformer))
    steps = round(args.steps * setting.steps_factor)
    per_seed = []
    start = time.perf_counter()
    for seed in range(1, args.seeds + 1):
        images = sample(pipe, requested, setting.methods, steps, seed=seed)
        per_seed.append(measure(images, requested if setting.conditional else None, real_features, classifier))
        if seed == 1:
            save_sheet(images, setting, args)
    summary = {}
    for key in METRICS:
        values = [m[key] for m in per_seed if key in m]
        if values:
            summary[key] = statistics.mean(values)
            summary[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return {
        "name": setting.name,
        "family": setting.family,
        "options": setting.options,
        "steps": steps,
        "nfe": steps * setting.nfe_per_step,
        "seconds": time.perf_counter() - start,
        "per_seed": per_seed,
        **summary,
    }


def save_sheet(images: torch.Tensor, setting: Setting, args) -> Path:
    """The contact sheet of a setting's seed-1 samples: one row per class, its first 8 samples."""
    columns = min(8, args.per_class)
    grid = images.view(len(CLASS_NAMES), args.per_class, *images.shape[1:])[:, :columns].flatten(0, 1)
    path = args.figures / f"sweep_{slug(setting.name)}.png"
    contact_sheet(grid, columns).save(path)
    return path


def sheets_only(pipe, args, labels) -> None:
    """``--sheets``: redraw the contact sheets of named settings (seed 1, the same samples the sweep measured)."""
    every = [*baselines(args), *cfg_apg(pipe, args), *perturbation(pipe, args), *skip_layers(pipe, args)]
    settings = {s.name: s for s in every}
    unknown = [name for name in args.sheets if name not in settings]
    if unknown:
        raise SystemExit(f"unknown settings {unknown} (HeadHunter rows are not redrawn); known: {sorted(settings)}")
    for name in args.sheets:
        setting = settings[name]
        requested = labels if setting.conditional else torch.full_like(labels, null_class(pipe.transformer))
        images = sample(pipe, requested, setting.methods, round(args.steps * setting.steps_factor), seed=1)
        print(save_sheet(images, setting, args), flush=True)


def slug(name: str) -> str:
    keep = [c if c.isalnum() or c == "." else "_" for c in name.lower()]
    return "".join(keep).strip("_")


BASELINE_OF = {  # family -> its peer at equal NFE per image
    "apg": "cfg",
    "cfg": "none-2x",
    "uncond-pag": "uncond-none-2x",
    "uncond-softpag": "uncond-none-2x",
    "uncond-tpg": "uncond-none-2x",
    "uncond-softpag-headhunter": "uncond-softpag-random",
    "cfg-pag": "cfg-1.5x",
    "cfg-softpag": "cfg-1.5x",
    "cfg-tpg": "cfg-1.5x",
    "cfg-slg": "cfg-1.5x",
}


def best_by_family(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["family"] not in best or row["fd"] < best[row["family"]]["fd"]:
            best[row["family"]] = row
    return best


def check_resumable(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume ``path`` with other settings: its rows would be mixed with rows measured differently.
    The model is compared by the fingerprint of its transformer's weights (by name for files without one)."""
    keys = ["per_class", "steps", "seeds"] + (["fingerprint"] if "fingerprint" in saved else ["model"])
    differ = [f"{k} {saved.get(k)!r} there, {current[k]!r} now" for k in keys if saved.get(k) != current[k]]
    if differ:
        raise SystemExit(f"sweep_dit: {path} was measured with other settings ({'; '.join(differ)}): "
                         "pass another --json, or the same settings to resume it")  # fmt: skip


#: two-sided 95 % critical values of Student's t by degrees of freedom (seeds - 1)
T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def paired_gaps(a: dict[str, Any], b: dict[str, Any], key: str = "fd") -> list[float]:
    """``b - a`` seed by seed: every setting runs on the same seeds (sample i of seed s gets the same noise), so
    the comparison is paired and the seed-to-seed variation common to both cancels."""
    return [pb[key] - pa[key] for pa, pb in zip(a.get("per_seed", []), b.get("per_seed", []))]


def paired_verdict(gaps: list[float]) -> str:
    """A paired t-test at 95 % on the per-seed gaps: "yes" (lower FD), "worse", or "no difference"."""
    if len(gaps) < 2 or len(gaps) - 1 not in T_95:
        return "n/a"
    mean, sd = statistics.mean(gaps), statistics.stdev(gaps)
    if sd == 0:
        return "yes" if mean > 0 else ("worse" if mean < 0 else "no difference")
    t = mean / (sd / len(gaps) ** 0.5)
    return "yes" if t > T_95[len(gaps) - 1] else ("worse" if -t > T_95[len(gaps) - 1] else "no difference")


def summary_table(rows: list[dict[str, Any]]) -> str:
    """Each method's best setting (lowest mean FD) against its baseline's best at equal NFE: "beats" when the FD
    gap exceeds the sum of the two standard deviations, and (the settings share their seeds) by a paired t-test
    on the per-seed gaps. The best setting is picked on the same seeds, which favours it."""
    best = best_by_family(rows)
    lines = [
        "| method (best setting) | FD | baseline at equal NFE | its FD | precision vs baseline | beats on FD? "
        "| FD gap per seed | paired t-test |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for family, peer in BASELINE_OF.items():
        if family not in best or peer not in best:
            continue
        a, b = best[family], best[peer]
        gap, spread = b["fd"] - a["fd"], a["fd_sd"] + b["fd_sd"]
        verdict = "yes" if gap > spread else ("worse" if -gap > spread else "within spread")
        gaps = paired_gaps(a, b)
        lines.append(
            f"| {a['name']} | {a['fd']:.2f} ± {a['fd_sd']:.2f} | {b['name']} | {b['fd']:.2f} ± {b['fd_sd']:.2f} | "
            f"{a['precision']:.3f} vs {b['precision']:.3f} | {verdict} | {' / '.join(f'{g:.2f}' for g in gaps)} "
            f"| {paired_verdict(gaps)} |"
        )
    return "\n".join(lines)


def rows_table(rows: list[dict[str, Any]]) -> str:
    head = "| setting | NFE | " + " | ".join(METRICS) + " |"
    lines = [head, "|---|---|" + "---|" * len(METRICS)]
    for row in rows:
        cells = [f"{row[k]:.3f} ± {row[k + '_sd']:.3f}" if k in row else "" for k in METRICS]
        lines.append(f"| {row['name']} | {row['nfe']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo/dit", help="a DiTPipeline: demo/<name>, a folder or a hub id")
    parser.add_argument("--suite", nargs="+", choices=(*SUITES, "all"), default=["all"])
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--w", type=float, nargs="+", default=list(SCALES_W), help="CFG/APG scales")
    parser.add_argument("--s", type=float, nargs="+", default=list(SCALES_S), help="perturbation scales")
    parser.add_argument("--cfg", type=float, default=3.0, help="the CFG scale perturbation guidance is added to")
    parser.add_argument(
        "--layer-sweep",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="perturbation suite: also PAG and TPG on every block at --layer-scale (default on)",
    )
    parser.add_argument("--layer-scale", type=float, default=2.0, help="scale of the layer sweep and HeadHunter")
    parser.add_argument("--hunt-samples", type=int, default=16)
    parser.add_argument("--hunt-rounds", type=int, default=2)
    parser.add_argument("--hunt-steps", type=int, default=10)
    parser.add_argument("--real", type=int, default=4000, help="real images for the reference features")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/sweep_dit.json"))
    parser.add_argument("--figures", type=Path, default=Path("benchmarks/figures/sweep"))
    parser.add_argument("--device", default=str(best_device()[0]))
    parser.add_argument(
        "--sheets", nargs="+", default=None, help="only redraw the contact sheets of these settings (by name)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    suites = SUITES if "all" in args.suite else tuple(args.suite)
    pipe = load_pipeline(args.model, args.device, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    meta = {
        "model": args.model,
        "fingerprint": model_fingerprint(pipe.transformer),
        "per_class": args.per_class,
        "steps": args.steps,
        "seeds": args.seeds,
    }
    labels = torch.arange(len(CLASS_NAMES)).repeat_interleave(args.per_class)
    if args.sheets:
        args.figures.mkdir(parents=True, exist_ok=True)
        sheets_only(pipe, args, labels)
        return []
    saved = json.loads(args.json.read_text()) if args.json.is_file() else {"settings": meta, "rows": []}
    check_resumable(saved["settings"], meta, args.json)
    done: list[dict[str, Any]] = saved["rows"]
    classifier = load_classifier(args.device)
    real, _ = generate(args.real, torch.Generator().manual_seed(12345))
    real_features = torch.cat([classifier.features(x.to(args.device)).cpu() for x in real.split(500)])
    args.figures.mkdir(parents=True, exist_ok=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    finished = {row["name"] for row in done}
    settings: list[Setting] = []
    builders = {
        "baselines": lambda: baselines(args),
        "cfg-apg": lambda: cfg_apg(pipe, args),
        "perturbation": lambda: perturbation(pipe, args),
        "headhunter": lambda: hunted(pipe, classifier, args),
        "slg": lambda: skip_layers(pipe, args),
    }
    for suite in suites:
        if suite == "headhunter" and any(row["family"].startswith("uncond-softpag-") for row in done):
            continue  # the search ran already; its rows are in the JSON
        settings += builders[suite]()
    for setting in settings:
        if setting.name in finished:
            continue
        done.append(run_setting(pipe, setting, args, labels, real_features, classifier))
        row = done[-1]
        print(f"{setting.name}: FD {row['fd']:.2f} ± {row['fd_sd']:.2f} ({row['seconds']:.0f} s)", flush=True)
        args.json.write_text(json.dumps({"settings": meta, "rows": done}, indent=1))
    print(rows_table(done))
    print()
    print(summary_table(done))
    return done


if __name__ == "__main__":
    main()
