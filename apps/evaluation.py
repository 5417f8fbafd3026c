"""The protection evaluation on the embedded demo models, shared by ``steerguard evaluate`` and the benchmark.

Held-out demo images are protected by each method (PGD against the demo VAE, or the committed amortized
protector), purified (JPEG q90/q75/q50, resize x0.5, noise, blur, noisy upscaling, DiffPure with a pixel
diffusion model, IMPRESS with the demo VAE), then mimicked by SDEdit with the demo DiT at several strengths and by
a LoRA fine-tune of the demo DiT (peft); :func:`protect.evaluate.evaluate` measures the damage and
:func:`protect.evaluate.worst_case` the worst case over purifications per protection, random noise of the same
budget always a row.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from protect import AMORTIZED_BUDGETS
from protect.evaluate import worst_case
from protect.protect import METHODS, SDS_METHODS
from protect.purify import EVALUATION

from .device import best_device

# protect()'s methods, the amortized protector with the full budget on flat regions, and the naive baseline
PROTECTIONS = (*METHODS, "amortized-full", "noise")
PURIFICATIONS = (*EVALUATION, "diffpure", "impress")  # the field's: fixed, then DiffPure and IMPRESS (models)
EVAL_SEED = 3_000_017  # held-out images: a stream neither the demo models nor the protector trained on


class DiTDenoiser(torch.nn.Module):
    """The demo DiT as a latent denoiser ``eps(z_t, t)`` for Mist / SDS / ASPL: of ``labels`` (one per image), or of
    the null class (unconditional) when None. An ``nn.Module``, so ASPL can fine-tune it (on a copy).

    The DiT works on square latents whose side is a multiple of its patch: other latents are replicate-padded to
    that square and the prediction is cropped back.
    """

    def __init__(self, transformer: torch.nn.Module, labels: torch.Tensor | None = None) -> None:
        from protect.evaluate import null_class

        super().__init__()
        self.transformer, self.labels, self.null = transformer, labels, null_class(transformer)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        height, width = z_t.shape[-2:]
        side = max(height, width)
        side += -side % self.transformer.config.patch_size
        z = torch.nn.functional.pad(z_t, (0, side - width, 0, side - height), mode="replicate")
        if self.labels is None:
            labels = torch.full((len(z_t),), self.null, device=z_t.device, dtype=torch.long)
        else:
            labels = self.labels.to(z_t.device)
        out = self.transformer(z, timestep=t, class_labels=labels).sample
        return out[:, : z_t.shape[1], :height, :width]


def dit_denoiser(pipe) -> DiTDenoiser:
    """The demo DiT as an unconditional (null-class) latent denoiser ``eps(z_t, t)`` for Mist / SDS."""
    return DiTDenoiser(pipe.transformer)


def protect_all(
    images: torch.Tensor,
    methods: Sequence[str],
    *,
    pipe,
    protector=None,
    eps: float = 8 / 255,
    steps: int = 100,
    seed: int = 0,
    tile: int | None = None,
    labels: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Protect ``images`` with each method; returns the protected images and the seconds per image. ``tile``: the
    PGD methods attack crops of that side (as the app does, ``apps.services.PGD_TILE``), None the whole image.
    ASPL fine-tunes the demo DiT on the images of their ``labels`` (a DreamBooth attacker's conditioning; the null
    class when None), the set as one, on whole images."""
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
        elif name in AMORTIZED_BUDGETS:  # "amortized-full": the full budget on flat regions too
            out[method], _ = protect(
                images, "amortized", vae=pipe.vae, protector=protector, eps=eps, min_strength=AMORTIZED_BUDGETS[name]
            )
        else:
            if name == "aspl":  # fine-tunes the DiT on the images' classes, on the whole images, as one set
                extra = {"denoiser": DiTDenoiser(pipe.transformer, labels), "alphas_cumprod": alphas}
                extra |= {"generator": gens()[0], "tile": None}
            else:
                semantic = name in ("mist", *SDS_METHODS)
                extra = {"denoiser": dit_denoiser(pipe), "alphas_cumprod": alphas} if semantic else {}
                extra |= {"generator": gens(), "tile": tile}
            out[method], _ = protect(images, name, vae=pipe.vae, eps=eps, steps=n_steps, **extra)
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
    purifications: Sequence[str] = PURIFICATIONS,
    lora_purifications: Sequence[str] = ("none", "jpeg75"),
    protector: str | Path | None = None,
    pixel_model: str = "demo/unet",
    device: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Protect ``n`` held-out demo images with ``methods`` and evaluate them after each purification (DiffPure with
    ``pixel_model``, IMPRESS with the demo VAE); returns rows, the worst case over purifications per protection
    and metric (:func:`protect.evaluate.worst_case`), timing and settings."""
    from protect import AmortizedProtector
    from protect.evaluate import evaluate, lora_mimic, sdedit

    from .demo import DEMO_DIR, generate, load_classifier, load_dit_pipeline
    from .models import load_vae

    device = device or str(best_device()[0])
    pipe = load_dit_pipeline(device)
    table = purification_table(purifications, vae=pipe.vae, pixel_model=pixel_model, device=device, seed=seed)
    classifier = load_classifier(device)
    vaes = {"A": pipe.vae}
    if (DEMO_DIR / "vae_b").is_dir():
        vaes["B"] = load_vae(str(DEMO_DIR / "vae_b"), device)
    model = None
    if any(m in AMORTIZED_BUDGETS for m in methods):
        model = AmortizedProtector.from_pretrained(str(protector or DEMO_DIR / "protector")).to(device)
    images, labels = generate(n, torch.Generator().manual_seed(EVAL_SEED + seed))
    images, labels = ((images + 1) / 2).to(device), labels.to(device)
    protected, seconds = protect_all(
        images, methods, pipe=pipe, protector=model, eps=eps, steps=steps, seed=seed, labels=labels
    )

    def gens(count: int) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(seed + 50_000 + i) for i in range(count)]

    mimics = {
        f"sdedit{s:g}": (lambda x, s=s: sdedit(pipe, x, labels, strength=s, steps=20, generator=gens(len(x))))
        for s in strengths
    }
    common = {"classifier": classifier, "noise_eps": eps, "seed": seed}
    rows = evaluate(images, protected, labels, mimics=mimics, vaes=vaes, purifications=table, **common)
    lora_table = {name: table[name] for name in lora_purifications if name in table}
    if lora_steps and lora_table:
        lora = {"lora": partial(lora_mimic, pipe, labels=labels, steps=lora_steps, seed=seed)}
        lora_rows = evaluate(images, protected, labels, mimics=lora, purifications=lora_table, **common)
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
        "purifications": {name: getattr(entry, "description", name) for name, entry in table.items()},
        "pixel_model": pixel_model if "diffpure" in table else None,
    }
    worst = {metric: worst_case(rows, metric) for metric in rows[0] if _is_damage(metric)}
    return {"settings": settings, "seconds_per_image": seconds, "rows": rows, "worst_case": worst, "device": device}


def _is_damage(metric: str) -> bool:
    return metric.startswith("latent_distortion") or metric.endswith(("_accuracy", "_fd", "_psnr_to_clean"))


def purification_table(
    names: Sequence[str], *, vae, pixel_model: str | None = "demo/unet", device: str | None = None, seed: int = 0
) -> dict[str, Any]:
    """The purifications ``names``: fixed entries of :data:`protect.purify.PURIFICATIONS` and the model-based ones
    of :func:`protect.purifiers.model_purifications` ("diffpure" with the unconditional pixel model
    ``pixel_model``, loaded by :func:`apps.models.load_score_model`; "impress" with ``vae``)."""
    from protect.purifiers import model_purifications
    from protect.purify import PURIFICATIONS as FIXED

    pixel = None
    if "diffpure" in names:
        from .models import load_score_model

        if pixel_model is None:
            raise ValueError("the diffpure purification needs a pixel diffusion model (--pixel-model)")
        pixel = load_score_model(pixel_model, device)
    models = model_purifications(vae=vae, pixel_model=pixel, seed=seed)
    unknown = [name for name in names if name not in models and (name not in FIXED or FIXED[name].random)]
    if unknown:
        choices = sorted({*models, "diffpure", *(name for name, entry in FIXED.items() if not entry.random)})
        raise ValueError(f"unknown purifications {unknown}; choose from {choices}")
    return {name: models.get(name) or FIXED[name] for name in names}


def markdown_worst_case(result: dict[str, Any]) -> str:
    """The worst case over purifications of :func:`run` as a Markdown table: per protection (rows) and metric
    (columns), the value under the purification that leaves the mimicry least damaged, and that purification."""
    worst = result["worst_case"]
    metrics = list(worst)
    protections = list(dict.fromkeys(e["protection"] for entries in worst.values() for e in entries))
    cells = {(e["protection"], metric): e for metric, entries in worst.items() for e in entries}
    lines = ["| protection | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for protection in protections:
        values = []
        for metric in metrics:
            e = cells.get((protection, metric))
            values.append(f"{e['value']:.3g} ({e['purification']})" if e else "")
        lines.append(f"| {protection} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def markdown(result: dict[str, Any], columns: Sequence[str] | None = None) -> str:
    """The rows of :func:`run` as a Markdown table."""
    rows = result["rows"]
    keys = columns or [k for k in rows[0] if k not in ("protection", "purification", "linf_255")]
    lines = ["| protection | purification | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for row in rows:
        cells = [f"{row[k]:.3g}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys]
        lines.append(f"| {row['protection']} | {row['purification']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- held-out photos

# photo evaluation: PGD (PhotoGuard; Mist and SDS with a latent model) on the first --vae, the amortized protector
PHOTO_PROTECTIONS = ("photoguard", "mist", *SDS_METHODS, "aspl", "amortized", "amortized-full")
# need the latent diffusion model (--ldm): Mist's and SDS's semantic part, the model ASPL fine-tunes
PHOTO_LATENT_METHODS = ("mist", *SDS_METHODS, "aspl")
PHOTO_MAX_SIZE = 400  # the shortest side of the held-out photos (coffee: 400 x 600)
PHOTO_MAX_WORK = 2e4  # megapixel-VAE-passes a photo evaluation may cost (about an hour of the demo VAE on 2 CPUs)
PHOTO_LDM = "demo/photo_ldm"  # the photo latent model (on demo/photo_vae), when trained
PHOTO_NOTE = (
    "Damage is the latent distortion in each VAE (relative L2 of the latent change, against the clean image after "
    "the same purification) and, with a latent diffusion model (--ldm), SDEdit mimicry through it: PSNR/SSIM of the "
    "edit of the protected image to the edit of the clean image after the same purification (lower: more damage), "
    "and the excess PSNR: the same without the part of the edit's change along the perturbation itself (a "
    "perturbation the mimicry merely reproduces is no damage; sdedit_carried_share is that part's share). "
    "PGD attacks the first VAE; the others measure transfer. Random noise of the same budget is the random_noise row."
)


def default_photo_vaes() -> list[str]:
    """The photo VAEs that are committed (``demo/photo_vae``, ``demo/photo_vae_b``), else the shapes ``demo/vae``."""
    from .demo import DEMO_DIR

    found = [f"demo/{name}" for name in ("photo_vae", "photo_vae_b") if (DEMO_DIR / name / "config.json").is_file()]
    return found or ["demo/vae"]


def default_photo_ldm() -> str | None:
    """``demo/photo_ldm`` when it is committed, else None (no Mist/SDS, no mimicry)."""
    from .demo import DEMO_DIR

    return PHOTO_LDM if (DEMO_DIR / PHOTO_LDM.removeprefix("demo/") / "unet").is_dir() else None


def default_photo_protector() -> str:
    """``demo/photo_protector`` (trained against the photo VAE) when it is committed, else the shapes
    ``demo/protector``."""
    from .demo import DEMO_DIR

    return "demo/photo_protector" if (DEMO_DIR / "photo_protector" / "config.json").is_file() else "demo/protector"


def photo_crops(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """``n`` seeded ``size`` x ``size`` native-resolution crops (N, 3, size, size) in [0, 1] of the held-out photos
    (:data:`apps.demo.photos.HELD_OUT`, never trained on), cycling through them, and where each came from."""
    from .demo.photos import HELD_OUT, photo

    if not 8 <= size <= PHOTO_MAX_SIZE:
        raise ValueError(f"--size must lie in [8, {PHOTO_MAX_SIZE}] (the held-out photos' shortest side)")
    generator = torch.Generator().manual_seed(EVAL_SEED + seed)
    crops, boxes = [], []
    for i in range(n):
        name = HELD_OUT[i % len(HELD_OUT)]
        image = photo(name)
        top = int(torch.randint(0, image.shape[1] - size + 1, (1,), generator=generator))
        left = int(torch.randint(0, image.shape[2] - size + 1, (1,), generator=generator))
        crops.append((image[:, top : top + size, left : left + size] + 1) / 2)
        boxes.append({"photo": name, "top": top, "left": left, "size": size})
    return torch.stack(crops), boxes


def photo_work(
    methods: Sequence[str], *, n: int, size: int, steps: int, vaes: int, purifications: int, mimic: bool = False
) -> float:
    """The cost of :func:`run_photos` in megapixel VAE-encoder passes: PGD (forward and backward, ~3 passes a
    step) on the first VAE, then the latents of every row (clean, noise, each method) under every purification,
    and with ``mimic`` an SDEdit of each (encode, decode: ~3 passes; the latent UNet is small beside them)."""
    pgd_steps = sum(int(m.partition("@")[2] or steps) for m in methods if m not in AMORTIZED_BUDGETS)
    megapixels = n * size * size / 1e6
    rows = purifications * (len(methods) + 2)
    return megapixels * (3 * pgd_steps + 2 * vaes * rows + (3 * rows if mimic else 0))


def protect_photos(
    images: torch.Tensor,
    methods: Sequence[str],
    *,
    vae,
    eps: float,
    steps: int = 1,
    latent_model: tuple | None = None,
    protector=None,
    seed: int = 0,
    tile: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Protect ``images`` (N, 3, H, W) in [0, 1] against ``vae`` with each of ``methods`` (photoguard, mist, sds, sds-,
    "photoguard@10" for 10 PGD steps, else ``steps``; amortized, amortized-full with ``protector``); returns the
    protected images and the seconds per image per method. PGD starts at random from ``seed + i`` per image and
    attacks ``tile`` x ``tile`` crops (None: the whole image); Mist and SDS take ``latent_model`` ``(unet,
    scheduler)`` as their semantic part (:func:`protect.evaluate.semantic_part`)."""
    from protect import protect
    from protect.evaluate import semantic_part

    protected, seconds = {}, {}
    for method in methods:
        name, _, count = method.partition("@")
        start = time.perf_counter()
        if name in AMORTIZED_BUDGETS:
            protected[method], _ = protect(
                images, "amortized", vae=vae, protector=protector, eps=eps, min_strength=AMORTIZED_BUDGETS[name]
            )
        else:
            gens = [torch.Generator().manual_seed(seed + i) for i in range(len(images))]
            extra = semantic_part(*latent_model) if name in PHOTO_LATENT_METHODS else {}
            if name == "aspl":  # fine-tunes the latent model itself, on the whole crops, as one set
                extra, gens = extra | {"denoiser": latent_model[0], "tile": None}, gens[0]
            protected[method], _ = protect(
                images, name, vae=vae, eps=eps, steps=int(count) if count else steps, generator=gens,
                **({"tile": tile} | extra),
            )  # fmt: skip
        seconds[method] = (time.perf_counter() - start) / len(images)
    return protected, seconds


def run_photos(
    methods: Sequence[str] = ("photoguard", "amortized"),
    *,
    vaes: Sequence[str] = ("demo/vae",),
    n: int = 4,
    size: int = 256,
    eps: float = 8 / 255,
    steps: int = 20,
    tile: int | None = 128,
    purifications: Sequence[str] = EVALUATION,
    protector: str | Path | None = None,
    pixel_model: str | None = "demo/photo_unet",
    ldm: str | None = None,
    sdedit_strength: float = 0.3,
    sdedit_steps: int = 20,
    device: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Protect ``n`` native-resolution crops of the held-out photos (:func:`photo_crops`) with ``methods`` and
    measure invisibility (PSNR/SSIM) and the latent distortion in each of ``vaes`` (names as
    :func:`apps.models.load_vae` takes them) after each purification, with the worst case over purifications per
    protection (:func:`protect.evaluate.worst_case`) and the same-budget random-noise row.

    PGD methods attack the first VAE (``tile`` x ``tile`` crops, :func:`protect.protect`); IMPRESS purifies with it
    too. ``ldm`` (an unconditional latent diffusion model of the first VAE, :func:`apps.models.load_latent_model`,
    e.g. ``demo/photo_ldm``) is Mist's and SDS's semantic part and the mimicry attack: SDEdit at
    ``sdedit_strength`` (``sdedit_steps`` DDIM steps, seeded per image) of every purified image, scored against
    the SDEdit of the clean image (see :data:`PHOTO_NOTE`). Without it there is no mimicry and no Mist/SDS.
    """
    from protect import AmortizedProtector
    from protect.evaluate import evaluate, sdedit_unconditional

    from .models import check_latent_pair, load_latent_model, load_vae, resolve

    unknown = [m for m in methods if m.partition("@")[0] not in PHOTO_PROTECTIONS]
    if unknown:
        raise ValueError(
            f"unknown photo methods {unknown}; choose from {PHOTO_PROTECTIONS} (random noise is always a row)"
        )
    if not vaes or len(set(vaes)) != len(vaes):
        raise ValueError("name at least one VAE (--vae), each once")
    latent_methods = [m for m in methods if m.partition("@")[0] in PHOTO_LATENT_METHODS]
    if latent_methods and ldm is None:
        raise ValueError(
            f"{', '.join(latent_methods)} need a latent diffusion model of the first VAE as their semantic part "
            "(--ldm, e.g. demo/photo_ldm): without one Mist would be PhotoGuard under another name"
        )
    if ldm is not None and not 0 < sdedit_strength <= 1:
        raise ValueError(f"the SDEdit strength must lie in (0, 1], got {sdedit_strength}")
    work = photo_work(
        methods, n=n, size=size, steps=steps, vaes=len(vaes), purifications=len(purifications), mimic=ldm is not None
    )
    if work > PHOTO_MAX_WORK:
        raise ValueError(
            f"this evaluation would cost about {work:.3g} megapixel VAE passes (limit {PHOTO_MAX_WORK:.3g}); "
            "use fewer or smaller crops (-n, --size), fewer PGD steps or fewer purifications"
        )
    images, boxes = photo_crops(n, size, seed)
    device = device or str(best_device()[0])
    models = {name: load_vae(name, device) for name in vaes}
    target = models[vaes[0]]
    latent_model = None
    if ldm is not None:
        unet, scheduler, ldm_vae = load_latent_model(ldm, device=device)
        if resolve(ldm_vae) != resolve(vaes[0]):
            raise ValueError(
                f"{ldm} was trained on the latents of {ldm_vae}, but the first --vae (the one attacked and "
                f"mimicked through) is {vaes[0]}: put {ldm_vae} first"
            )
        check_latent_pair(unet, target, (ldm, vaes[0]))
        latent_model = unet, scheduler
    table = purification_table(purifications, vae=target, pixel_model=pixel_model, device=device, seed=seed)
    images = images.to(device)
    protector_name = str(protector or default_photo_protector())
    amortized = None
    if any(m in AMORTIZED_BUDGETS for m in methods):
        amortized = AmortizedProtector.from_pretrained(resolve(protector_name)).to(device)
    protected, seconds = protect_photos(
        images,
        methods,
        vae=target,
        eps=eps,
        steps=steps,
        latent_model=latent_model,
        protector=amortized,
        seed=seed,
        tile=tile if tile is not None and tile < size else None,
    )
    mimics = {}
    if latent_model is not None:
        unet, scheduler = latent_model

        def mimic(x: torch.Tensor) -> torch.Tensor:  # the same noise for every row: seeded per image
            generators = [torch.Generator(device).manual_seed(seed + 1000 + i) for i in range(len(x))]
            return sdedit_unconditional(
                target, unet, scheduler, x, strength=sdedit_strength, steps=sdedit_steps, generator=generators
            )

        mimics["sdedit"] = mimic
    rows = evaluate(images, protected, vaes=models, mimics=mimics, purifications=table, noise_eps=eps, seed=seed)
    metrics = [f"latent_distortion_{name}" for name in vaes] + (
        ["sdedit_psnr_to_clean", "sdedit_ssim_to_clean", "sdedit_excess_psnr_to_clean"] if mimics else []
    )
    settings = {
        "data": "photos",
        "n": n,
        "size": size,
        "crops": boxes,
        "eps_255": eps * 255,
        "pgd_steps": steps,
        "tile": tile,
        "vaes": list(vaes),
        "attacked_vae": vaes[0],
        "purifications": {name: getattr(entry, "description", name) for name, entry in table.items()},
        "pixel_model": pixel_model if "diffpure" in table else None,
        "protector": protector_name if amortized is not None else None,
        "ldm": ldm,
        "sdedit": {"strength": sdedit_strength, "steps": sdedit_steps} if latent_model is not None else None,
        "work_megapixel_vae_passes": work,
        "note": PHOTO_NOTE,
    }
    worst = {metric: worst_case(rows, metric) for metric in metrics}
    return {"settings": settings, "seconds_per_image": seconds, "rows": rows, "worst_case": worst, "device": device}
