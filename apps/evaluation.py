"""The protection evaluation on the embedded demo models, shared by ``steerguard evaluate`` and the benchmark.

Held-out demo images are protected by each method (PGD against the demo VAE, or the committed amortized
protector), purified (JPEG q75, resize x0.5, noise, blur), then mimicked by SDEdit with the demo DiT at several
strengths and by a LoRA fine-tune of the demo DiT (peft); :func:`protect.evaluate.evaluate` measures the damage.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from protect.protect import METHODS

from .device import best_device

# protect()'s methods, the amortized protector with the full budget on flat regions, and the naive baseline
PROTECTIONS = (*METHODS, "amortized-full", "noise")
EVAL_SEED = 3_000_017  # held-out images: a stream neither the demo models nor the protector trained on


def dit_denoiser(pipe):
    """The demo DiT as an unconditional (null-class) latent denoiser ``eps(z_t, t)`` for Mist / SDS.

    The DiT works on square latents whose side is a multiple of its patch: other latents are replicate-padded to
    that square and the prediction is cropped back.
    """
    from protect.evaluate import null_class

    transformer = pipe.transformer
    patch, label = transformer.config.patch_size, null_class(transformer)

    def eps(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        height, width = z_t.shape[-2:]
        side = max(height, width)
        side += -side % patch
        z = torch.nn.functional.pad(z_t, (0, side - width, 0, side - height), mode="replicate")
        null = torch.full((len(z_t),), label, device=z_t.device, dtype=torch.long)
        out = transformer(z, timestep=t, class_labels=null).sample
        return out[:, : z_t.shape[1], :height, :width]

    return eps


def protect_all(
    images: torch.Tensor,
    methods: Sequence[str],
    *,
    pipe,
    protector=None,
    eps: float = 8 / 255,
    steps: int = 100,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Protect ``images`` with each method; returns the protected images and the seconds per image."""
    from protect import protect

    out, seconds = {}, {}
    gens = lambda: [torch.Generator().manual_seed(seed + i) for i in range(len(images))]
    alphas = pipe.scheduler.alphas_cumprod
    for method in methods:
        name, _, count = method.partition("@")  # "photoguard@10": 10 PGD steps
        n_steps = int(count) if count else steps
        start = time.perf_counter()
        if name == "noise":  # the naive baseline: random signs at the full budget
            signs = torch.cat([torch.randint(0, 2, (1, *images.shape[1:]), generator=g) for g in gens()]) * 2 - 1
            out[method] = (images + eps * signs.to(images)).clamp(0, 1)
        elif name.startswith("amortized"):  # "amortized-full": the full budget on flat regions too
            floor = 1.0 if name == "amortized-full" else None
            out[method], _ = protect(
                images, "amortized", vae=pipe.vae, protector=protector, eps=eps, min_strength=floor
            )
        else:
            extra = {"denoiser": dit_denoiser(pipe), "alphas_cumprod": alphas} if name in ("mist", "sds") else {}
            out[method], _ = protect(images, name, vae=pipe.vae, eps=eps, steps=n_steps, generator=gens(), **extra)
        seconds[method] = (time.perf_counter() - start) / len(images)
    return out, seconds


def run(
    methods: Sequence[str] = ("photoguard", "amortized", "noise"),
    *,
    n: int = 64,
    eps: float = 8 / 255,
    steps: int = 100,
    strengths: Sequence[float] = (0.2, 0.4),
    lora_steps: int = 100,
    purifications: Sequence[str] = ("none", "jpeg75", "resize0.5", "noise4", "blur1"),
    lora_purifications: Sequence[str] = ("none", "jpeg75"),
    protector: str | Path | None = None,
    device: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Protect ``n`` held-out demo images with ``methods`` and evaluate them; returns rows + timing + settings."""
    from protect import AmortizedProtector
    from protect.evaluate import evaluate, lora_mimic, sdedit
    from protect.train import load_vae

    from .demo import DEMO_DIR, generate, load_classifier, load_dit_pipeline

    device = device or str(best_device()[0])
    pipe = load_dit_pipeline(device)
    classifier = load_classifier(device)
    vaes = {"A": pipe.vae}
    if (DEMO_DIR / "vae_b").is_dir():
        vaes["B"] = load_vae(str(DEMO_DIR / "vae_b"), device)
    model = None
    if any(m.startswith("amortized") for m in methods):
        model = AmortizedProtector.from_pretrained(str(protector or DEMO_DIR / "protector")).to(device)
    images, labels = generate(n, torch.Generator().manual_seed(EVAL_SEED + seed))
    images, labels = ((images + 1) / 2).to(device), labels.to(device)
    protected, seconds = protect_all(images, methods, pipe=pipe, protector=model, eps=eps, steps=steps, seed=seed)

    def gens(count: int) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(seed + 50_000 + i) for i in range(count)]

    mimics = {
        f"sdedit{s:g}": (lambda x, s=s: sdedit(pipe, x, labels, strength=s, steps=20, generator=gens(len(x))))
        for s in strengths
    }
    rows = evaluate(
        images, protected, labels, mimics=mimics, classifier=classifier, vaes=vaes, purifications=purifications
    )
    if lora_steps:
        lora = {"lora": partial(lora_mimic, pipe, labels=labels, steps=lora_steps, seed=seed)}
        lora_rows = evaluate(
            images, protected, labels, mimics=lora, classifier=classifier, purifications=lora_purifications
        )
        keyed = {(r["protection"], r["purification"]): r for r in lora_rows}
        for row in rows:
            extra = keyed.get((row["protection"], row["purification"]), {})
            row.update({k: v for k, v in extra.items() if k.startswith("lora")})
    settings = {
        "n": n,
        "eps_255": eps * 255,
        "pgd_steps": steps,
        "strengths": list(strengths),
        "lora_steps": lora_steps,
    }
    return {"settings": settings, "seconds_per_image": seconds, "rows": rows, "device": device}


def markdown(result: dict[str, Any], columns: Sequence[str] | None = None) -> str:
    """The rows of :func:`run` as a Markdown table."""
    rows = result["rows"]
    keys = columns or [k for k in rows[0] if k not in ("protection", "purification", "linf_255")]
    lines = ["| protection | purification | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for row in rows:
        cells = [f"{row[k]:.3g}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys]
        lines.append(f"| {row['protection']} | {row['purification']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
