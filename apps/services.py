"""The services the app and the CLI run on the device: generate, protect, detect and the mimicry preview.

Every model is loaded once per device and cached here (at most :func:`set_max_pipelines` generation pipelines);
one lock serialises the loads and the generation calls (the scheduler swap and ``guide()`` change the
pipeline); the detector's scoring has its own, so ``/detect`` answers while a generation runs. The inputs are
images already decoded by :mod:`apps.files`. :func:`calibrate` measures what the work costs on this device
(:mod:`apps.cost`).
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from protect import AMORTIZED_BUDGETS, Finetune, Step
from protect.images import composite_rgb
from protect.loading import dtype_option
from protect.tiling import TILE_BATCH

from .cost import Costs
from .device import best_device, score_dtype
from .files import restore_mode
from .generate import Request, class_names, generate
from .models import DEFAULT_MODEL, load_score_model, resolve

# amortized: the photo protector, one forward pass, spending less of the budget on flat regions (less visible);
# amortized-full: the same at the full budget everywhere (the PSNR of PGD's, and its damage: benchmarks/RESULTS.md)
# sds: Diff-Protect's SDS+ (the denoising loss of the photo latent model pushed up; Xue et al. 2024); aspl:
# Anti-DreamBooth (the same loss of a copy of that model fine-tuned on the image as the attack goes, in tiles)
PROTECT_METHODS = ("amortized", "amortized-full", "photoguard", "mist", "sds", "aspl")
#: the methods that attack the photo latent diffusion model (:data:`PROTECT_LDM`) as well as its VAE
LATENT_METHODS = ("mist", "sds", "aspl")
#: ASPL's fine-tunes in the app and the CLI: the paper's rounds (3 fine-tune steps, 6 PGD steps) at the learning
#: rate of the full fine-tune attacker of benchmarks/bench_aspl.py on the photo latent model
ASPL_FINETUNE = Finetune(steps=3, pgd_steps=6, lr=1e-4)
EPS_255 = (1, 32)  # the protection budget in 1/255 units, the app's and the CLI's bounds
PGD_STEPS = (1, 500)
# the CLI's and the app's PGD steps, from measured benefit (benchmarks/bench_pgd_steps.py on training-photo crops,
# benchmarks/RESULTS.md): on the photo VAE one step from a random start moves the latent furthest and survives
# JPEG q75 and noisy upscaling best; 100 steps change an SDEdit mimicry 0.4 dB more at 58x the cost
DEFAULT_PGD_STEPS = 1
#: ASPL's steps (10 rounds): one PGD step would fine-tune nothing in between (benchmarks/RESULTS.md, bench_aspl)
DEFAULT_ASPL_STEPS = 60
PROTECT_VAE = "demo/photo_vae"  # what the app and the CLI protect against (and measure survival in)
PROTECT_LDM = "demo/photo_ldm"  # Mist's and SDS's semantic part, the mimicry preview's SDEdit: a latent model on it
PROTECTOR_NAME = "photo_protector"  # the amortized protector, trained against the photo VAE
PHOTO_DETECTOR_NAME = "photo_detector"  # native-resolution patches, fitted on photos

__all__ = [
    "ASPL_FINETUNE",
    "DEFAULT_ASPL_STEPS",
    "DEFAULT_PGD_STEPS",
    "EPS_255",
    "LATENT_METHODS",
    "PGD_STEPS",
    "PGD_TILE",
    "PROTECTOR_NAME",
    "PROTECT_LDM",
    "PROTECT_METHODS",
    "PROTECT_VAE",
    "cached_pipelines",
    "calibrate",
    "calibrate_generation",
    "check_protect_options",
    "default_detector_dir",
    "default_steps",
    "describe_result",
    "detect_images",
    "generate_images",
    "heatmap_image",
    "load_detector",
    "load_pipeline",
    "mimicry_preview",
    "protect_image",
    "set_max_pipelines",
    "survival_report",
]

_lock = threading.RLock()  # loading models and generating (a generation changes the pipeline): one at a time
_detect_lock = threading.Lock()  # the detector's scoring, one batch at a time
PGD_TILE = 128  # pixels a side of the crops PGD attacks (the demo VAE's self-attention is cheap up to here)


_pipelines: OrderedDict[tuple, Any] = OrderedDict()  # (name, device, dtype) -> pipeline, least recently used first
_max_pipelines = 4


def set_max_pipelines(count: int) -> None:
    """Keep at most ``count`` pipelines loaded (``steerguard app --max-pipelines``); the least recently used go."""
    global _max_pipelines
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"the number of cached pipelines must be a positive integer, got {count!r}")
    with _lock:
        _max_pipelines = count
        while len(_pipelines) > _max_pipelines:
            _pipelines.popitem(last=False)


def cached_pipelines() -> list[tuple]:
    """The ``(name, device, dtype)`` of the pipelines loaded now, least recently used first."""
    with _lock:
        return list(_pipelines)


class _StringKeysNote(logging.Filter):
    """Drops diffusers' "Expected types for id2label: dict[int, str], got dict[str, str]" at every DiT load: a
    model_index.json can only hold string keys (hub DiTs too), and DiTPipeline turns them into ints itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Expected types for id2label")


logging.getLogger("diffusers.pipelines.pipeline_utils").addFilter(_StringKeysNote())


def _pipeline(name: str, device: str, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    options = dtype_option(dtype) if dtype != torch.float32 else {}
    pipe = DiffusionPipeline.from_pretrained(resolve(name), use_safetensors=True, **options)
    pipe.set_progress_bar_config(disable=True)
    if name.startswith("demo/") and hasattr(pipe, "get_label_ids") and not getattr(pipe, "labels", None):
        from .demo import CLASS_NAMES

        pipe.labels = {label: i for i, label in enumerate(CLASS_NAMES)}
    return pipe.to(device)


def load_pipeline(
    name: str = DEFAULT_MODEL, device: torch.device | str | None = None, dtype: torch.dtype | None = None
):
    """A diffusers pipeline for ``name`` (cached), on the best device unless one is given."""
    best_dev, best_dtype = best_device()
    device = torch.device(device) if device is not None else best_dev
    if dtype is None:
        dtype = best_dtype if device.type == "cuda" else torch.float32
    key = (name, str(device), dtype)
    with _lock:
        if key not in _pipelines:
            _pipelines[key] = _pipeline(*key)
            while len(_pipelines) > _max_pipelines:
                _pipelines.popitem(last=False)
        _pipelines.move_to_end(key)
        return _pipelines[key]


def generate_images(pipe: Any, request: Request, on_step: Callable[[Step], Any] | None = None) -> list[Image.Image]:
    """:func:`apps.generate.generate` holding the device lock (one call at a time changes the pipeline)."""
    with _lock:
        return generate(pipe, request, on_step)


@functools.lru_cache(maxsize=2)
def _vae(device: str):
    from .models import load_vae

    return load_vae(PROTECT_VAE, device)


@functools.lru_cache(maxsize=2)
def _protector(device: str):
    from protect import AmortizedProtector

    from .demo import model_path

    return AmortizedProtector.from_pretrained(str(model_path(PROTECTOR_NAME))).to(device).eval()


@functools.lru_cache(maxsize=2)
def _latent_model(device: str, name: str):
    """``(unet, scheduler)`` of the latent model ``name`` (:data:`PROTECT_LDM`), checked against
    :data:`PROTECT_VAE`."""
    from .models import check_latent_pair, load_latent_model

    try:
        unet, scheduler, vae_name = load_latent_model(name, PROTECT_VAE, device)
    except OSError as error:  # not there (a checkout without it): say what needs it
        raise ValueError(
            f"mist, sds, aspl and the mimicry preview need the latent diffusion model {name}, which could not be "
            f"loaded ({error}); use amortized or photoguard, or train it (python -m apps.demo.train_photo ldm)"
        ) from None
    check_latent_pair(unet, _vae(device), (name, vae_name))
    return unet, scheduler


def default_steps(method: str) -> int:
    """The PGD steps a method runs unless told: :data:`DEFAULT_ASPL_STEPS` for ASPL, else
    :data:`DEFAULT_PGD_STEPS` (the amortized protector runs none)."""
    return DEFAULT_ASPL_STEPS if method == "aspl" else DEFAULT_PGD_STEPS


def check_protect_options(method: str, eps_255: float, steps: int, seed: int) -> None:
    """``ValueError`` unless the method is known and eps (in 1/255), steps and seed lie within the bounds."""
    if method not in PROTECT_METHODS:
        raise ValueError(f"method must be one of {PROTECT_METHODS}, got {method!r}")
    if not EPS_255[0] <= eps_255 <= EPS_255[1]:
        raise ValueError(f"eps must be between {EPS_255[0]} and {EPS_255[1]} (in 1/255 units), got {eps_255:g}")
    if not PGD_STEPS[0] <= steps <= PGD_STEPS[1]:
        raise ValueError(f"steps must be between {PGD_STEPS[0]} and {PGD_STEPS[1]}, got {steps}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")


def protect_image(
    image: Image.Image,
    *,
    method: str = "amortized",
    eps: float = 8 / 255,
    steps: int | None = None,
    seed: int = 0,
    device: str | None = None,
    tile: int | None = PGD_TILE,
    on_step: Callable[[Step], Any] | None = None,
    survival: bool = True,
    mode: str | None = None,
    icc_profile: bytes | None = None,
) -> tuple[Image.Image, dict[str, Any]]:
    """Protect one RGB/RGBA image against the photo VAE (:data:`PROTECT_VAE`); returns the protected image and its
    metrics.

    "amortized" runs the photo amortized protector (one forward pass; ``steps`` and ``seed`` do not apply),
    texture-weighted (less of the budget on flat regions); "amortized-full" spends the full budget everywhere;
    "photoguard", "mist" and "sds" run ``steps`` PGD steps from a random start drawn from ``seed``, on ``tile`` x
    ``tile`` crops (:func:`protect.protect`'s ``tile``: the cost and the memory grow in proportion to the pixels);
    "mist" uses the photo latent diffusion model (:data:`PROTECT_LDM`, unconditional) as its semantic part, "sds"
    (Diff-Protect's SDS+) pushes that model's denoising loss up, "aspl" (Anti-DreamBooth) the loss of a copy of it
    fine-tuned on the image's crops as the attack goes (:data:`ASPL_FINETUNE`). ``steps`` None: the method's
    default (:func:`default_steps`).
    ``on_step`` sees every step and may stop the work (:class:`protect.Cancelled`). With ``survival``,
    ``metrics["survival"]`` says whether the protection survives JPEG q75 and noisy upscaling
    (:func:`survival_report`, on ``tile`` crops). ``mode`` and ``icc_profile`` (the file's, :class:`apps.files.
    Upload`) give the protected image back in the file's mode (L / LA) with its profile
    (:func:`apps.files.restore_mode`); the metrics then measure that image, as it will be stored.
    """
    from protect import protect
    from protect.evaluate import semantic_part

    steps = default_steps(method) if steps is None else steps
    check_protect_options(method, eps * 255, steps, seed)
    device = device or str(best_device()[0])
    extra: dict[str, Any] = {}
    with _lock:
        vae = _vae(device)
        model = _protector(device) if method in AMORTIZED_BUDGETS else None
        if method in LATENT_METHODS:
            unet, scheduler = _latent_model(device, PROTECT_LDM)
            extra = semantic_part(unet, scheduler) | ({"finetune": ASPL_FINETUNE} if method == "aspl" else {})
    if model is not None:
        floor = AMORTIZED_BUDGETS.get(method)
        (protected,), report = protect(
            [image], method="amortized", vae=vae, eps=eps, protector=model, on_step=on_step, min_strength=floor
        )
    else:
        generator = torch.Generator(device).manual_seed(seed)
        (protected,), report = protect(
            [image],
            method=method,
            vae=vae,
            eps=eps,
            steps=steps,
            generator=generator,
            tile=tile,
            on_step=on_step,
            **extra,
        )
    psnr, ssim, linf = report.psnr[0], report.ssim[0], report.linf[0]
    if mode is not None:
        protected = restore_mode(protected, mode, icc_profile)
    if protected.mode in ("L", "LA"):  # stored as gray: measure the gray file, not the RGB it was protected as
        from protect.images import to_tensor
        from protect.metrics import psnr_ssim

        clean, stored = to_tensor(image)[None], to_tensor(protected)[None]
        (psnr,), (ssim,) = psnr_ssim(clean, stored)
        linf = float((stored - clean).abs().max())
    metrics = {"psnr": psnr, "ssim": ssim, "linf_255": round(linf * 255, 4), "seconds": report.seconds}
    if survival:
        metrics["survival"] = survival_report(vae, image, protected, seed=seed, tile=tile)
    return protected, metrics


def survival_report(vae: Any, original: Image.Image, protected: Image.Image, seed: int = 0, tile: int | None = None):
    """:func:`protect.survival.report` for one original and its protected image (their stored RGB colours) against
    ``vae``, on ``tile`` x ``tile`` crops: does the protection survive JPEG q75 and noisy upscaling?"""
    from protect.images import to_tensor
    from protect.survival import report

    device = next(vae.parameters()).device
    clean, shielded = (to_tensor(im)[None].to(device) for im in (original, protected))
    (entry,) = report(vae, clean, shielded, seed=seed, tile=tile)
    return entry


PREVIEW_CROP = 128  # the mimicry preview edits a native-resolution centre crop (resizing would blur the protection)
PREVIEW_STRENGTH = 0.3


def mimicry_preview(
    original: Image.Image,
    protected: Image.Image,
    *,
    strength: float = PREVIEW_STRENGTH,
    seed: int = 0,
    device: str | None = None,
    scale: int = 2,
) -> tuple[Image.Image, Image.Image, dict[str, Any]] | None:
    """SDEdit (img2img) of the original and of the protected image with the photo latent model
    (:data:`PROTECT_LDM` on :data:`PROTECT_VAE`, :func:`protect.evaluate.sdedit_unconditional`), on the same centre
    crop (at most 128x128, native resolution) and with the same noise. Returns both edits (enlarged ``scale``
    times) and the PSNR between them (``psnr_between_edits``; lower: the protection changed the edit more), the same
    without the part of the change that is the perturbation carried through (``excess_psnr_between_edits``) and
    that part's share (``carried_share``; :func:`protect.evaluate.carried_over`), and the crop side; ``None`` for
    images under 16 pixels a side."""
    from protect.evaluate import carried_over, sdedit_unconditional
    from protect.metrics import psnr

    width, height = original.size
    side = min(PREVIEW_CROP, width, height) // 8 * 8
    if side < 16:
        return None
    device = device or str(best_device()[0])
    left, top = (width - side) // 2, (height - side) // 2
    crops = [
        torch.from_numpy(np.asarray(composite_rgb(im).crop((left, top, left + side, top + side)), np.float32).copy())
        for im in (original, protected)
    ]
    x = (torch.stack(crops).permute(0, 3, 1, 2) / 255).to(device)
    with _lock:
        vae = _vae(device)
        unet, scheduler = _latent_model(device, PROTECT_LDM)
    generators = [torch.Generator().manual_seed(seed) for _ in range(2)]  # the same noise for both, on any device
    edits = sdedit_unconditional(vae, unet, scheduler, x, strength=strength, steps=20, generator=generators)
    pictures = [
        Image.fromarray((e.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)).resize(
            (side * scale, side * scale), Image.NEAREST
        )
        for e in edits
    ]
    share, excess = carried_over(edits[1:] - edits[:1], x[1:] - x[:1])
    info = {
        "psnr_between_edits": psnr(edits[:1], edits[1:]).item(),
        "excess_psnr_between_edits": excess.item(),
        "carried_share": share.item(),
        "crop": side,
        "strength": strength,
    }
    return pictures[0], pictures[1], info


def default_detector_dir() -> Path:
    """``demo_models/photo_detector``, the native-resolution detector fitted on photos (the 16 px testbed detector
    ``demo_models/eps_detector`` scores fixed-size images only, which the app refuses to resize to)."""
    from .demo import DEMO_DIR

    return DEMO_DIR / PHOTO_DETECTOR_NAME


@functools.lru_cache(maxsize=2)
def _detector(directory: str, device: str, dtype: torch.dtype):
    from protect import PatchEPSDetector
    from protect.patches import PATCH_FORMAT

    meta = json.loads((Path(directory) / "config.json").read_text())
    if not isinstance(meta, dict) or meta.get("format") != PATCH_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(
            f"{directory} holds a {found or 'non-detector'} config, not a native-resolution detector "
            f"({PATCH_FORMAT}): uploads are scored on their own pixels, never resized; fit one with "
            "'steerguard train detector'"
        )
    name = meta.get("diffusion_model", "demo/unet_eps")  # the one it was fit on
    unet, scheduler = load_score_model(name, device)
    detector = PatchEPSDetector.from_pretrained(directory, unet, scheduler)  # checks the float32 weights' fingerprint
    if dtype != torch.float32:
        quiet = logging.getLogger("diffusers.models.modeling_utils")
        level, quiet.level = quiet.level, logging.ERROR  # its "keep in float32" note; UNet2DModel keeps none
        try:
            unet.to(dtype)
        finally:
            quiet.level = level
    clean = meta.get("calibration_scores")
    detector.clean_scores = [float(s) for s in clean] if isinstance(clean, list) else None
    return detector


def load_detector(directory: str | Path | None = None, device: str | None = None, dtype: str = "auto"):
    """The native-resolution EPS-AD detector (:class:`protect.PatchEPSDetector`) saved in ``directory`` (default
    :func:`default_detector_dir`), around the score model its ``config.json`` names (``diffusion_model``), that
    model in ``dtype`` (:func:`apps.device.score_dtype`: ``auto`` is bfloat16 on GPUs and on CPUs with bfloat16
    matrix units, where it is ~1.8x faster and its scores stay within 1 % of float32's, float32 elsewhere).

    Raises ``FileNotFoundError`` ("no detector available ...") when there is none, ``ValueError`` for a
    fixed-resolution detector.
    """
    directory = Path(directory) if directory is not None else default_detector_dir()
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"no detector available: {directory} holds no saved detector (fit one with 'steerguard train detector')"
        )
    device = device or str(best_device()[0])
    torch_dtype = score_dtype(device, dtype)
    with _lock:
        return _detector(str(directory.resolve()), device, torch_dtype)


def detect_images(detector: Any, images: list[Image.Image]) -> list[dict[str, Any]]:
    """Score RGB ``images`` at their native resolution (patches of the score model's size, never resized).

    Each result: ``score``, ``threshold``, ``verdict``, what was scored (``resolution`` [width, height],
    ``patch_size``, ``patches`` scored of ``tiles`` in the grid, ``score_model``, ``score_dtype``,
    ``calibrated_fpr``, ``calibrated_benign_changes``: the benign changes of clean images that rate also holds
    for on the calibration images) and ``patch_scores`` / ``patch_positions`` ([top, left]) for a heat map.
    """
    device = detector.denoiser.model.device  # the score model's: the uploads are scored where it runs
    batch = [
        torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32).copy()).permute(2, 0, 1).to(device) / 255
        for image in images
    ]
    with _detect_lock:  # not the device lock: /detect answers while a generation holds it
        results = detector.analyse(batch, value_range=(0, 1))
    threshold = float(detector.threshold)
    return [
        {
            "score": r.score,
            "threshold": threshold,
            "verdict": detector.verdict(r.score),
            "resolution": [r.width, r.height],
            "patch_size": r.patch_size,
            "patches": r.patches,
            "tiles": r.tiles,
            "score_model": detector.diffusion_model,
            "score_dtype": str(detector.denoiser.model.dtype).removeprefix("torch."),
            "calibrated_fpr": detector.config.fpr,
            "calibrated_benign_changes": sorted(getattr(detector, "benign_calibration", {})),
            "patch_positions": r.positions.tolist(),
            "patch_scores": [float(s) for s in r.patch_scores.double().tolist()],
        }
        for r in results
    ]


def calibrate(costs: Costs, device: str | None = None, tile: int = PGD_TILE, preview: bool = True) -> Costs:
    """Measure the unit costs of :func:`protect_image` and :func:`mimicry_preview` on ``device`` into ``costs``:
    one PGD step of PhotoGuard, Mist, SDS and ASPL on a batch of :data:`protect.tiling.TILE_BATCH` ``tile`` x
    ``tile`` crops, as :func:`protect.protect` batches an image's crops (per pixel, ``pgd_pixel_step:<method>``),
    one of ASPL's fine-tune steps on their latents (``aspl_finetune_pixel``), the amortized protector and the
    survival report on one crop (per pixel, ``amortized_pixel``, ``survival_pixel``), the protection report's PSNR
    and SSIM on the crops (``report_pixel``), and one mimicry preview (a 128 px crop). A few seconds on a CPU;
    each is measured once per ``costs``."""
    import copy

    from protect.evaluate import unet_denoiser
    from protect.losses import denoising_loss, encoder_loss, latent, mist_loss, sds_loss
    from protect.metrics import psnr_ssim

    device = device or str(best_device()[0])
    with _lock:
        vae, protector = _vae(device), _protector(device)
        unet, scheduler = _latent_model(device, PROTECT_LDM)
    # one crop for the amortized protector and the survival report; the batch of crops PGD and ASPL's fine-tunes
    # run on (per crop, one in four of them took 1.2-1.7x the time on the 2-core CPU)
    batch = torch.rand(TILE_BATCH, 3, tile, tile, generator=torch.Generator().manual_seed(0)).to(device)
    x = batch[:1]
    denoiser = unet_denoiser(unet)
    losses = {
        "photoguard": partial(encoder_loss, vae),
        "mist": partial(
            mist_loss,
            vae,
            denoiser,
            target_latent=None,
            alphas_cumprod=scheduler.alphas_cumprod,
            generator=torch.Generator(device).manual_seed(0),
        ),
        "sds": partial(
            sds_loss,
            vae,
            denoiser,
            alphas_cumprod=scheduler.alphas_cumprod,
            generator=torch.Generator(device).manual_seed(0),
        ),
        # ASPL's PGD step: back through the (fine-tuned) latent model and the encoder
        "aspl": lambda view: -denoising_loss(denoiser, latent(vae, view), alphas_cumprod=scheduler.alphas_cumprod),
    }
    surrogate = copy.deepcopy(denoiser).float().requires_grad_(True)  # ASPL fine-tunes a copy
    optimizer = torch.optim.AdamW(surrogate.parameters(), lr=ASPL_FINETUNE.lr)
    with torch.no_grad():
        z = latent(vae, batch)

    def finetune_step() -> None:
        loss = denoising_loss(surrogate, z, alphas_cumprod=scheduler.alphas_cumprod).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def pgd_step(method: str) -> None:
        view = batch.clone().requires_grad_(True)
        torch.autograd.grad(losses[method](view).sum(), view)

    def amortized() -> None:
        with torch.no_grad():
            protector.protect(x, vae, eps=8 / 255)

    for method in losses:
        costs.measure(f"pgd_pixel_step:{method}", partial(pgd_step, method), units=batch[:, 0].numel())
    costs.measure("aspl_finetune_pixel", finetune_step, units=batch[:, 0].numel())
    costs.measure("amortized_pixel", amortized, units=tile * tile)
    # the report every method makes (PSNR and SSIM of the whole image): 14 % of the amortized protector's time
    costs.measure("report_pixel", lambda: psnr_ssim(batch, batch.flip(-1)), units=batch[:, 0].numel())
    image = Image.fromarray((x[0].permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8))
    costs.measure("survival_pixel", lambda: survival_report(vae, image, image, tile=tile), units=tile * tile)
    if preview:
        crop = image.crop((0, 0, min(tile, PREVIEW_CROP), min(tile, PREVIEW_CROP)))
        costs.measure("preview", lambda: mimicry_preview(crop, crop, device=device), repeats=1)
    return costs


def calibrate_generation(costs: Costs, name: str, pipe: Any) -> float:
    """Seconds per image, denoising step and guidance branch of ``pipe`` (``costs["generate:<name>"]``), measured
    once with one image and two steps."""
    names = class_names(pipe)
    request = Request(names[0] if names else "a test", method="none", steps=2, num_images=1)
    return costs.measure(f"generate:{name}", lambda: generate_images(pipe, request), units=2, repeats=1)


def heatmap_image(image: Image.Image, result: dict[str, Any], threshold: float) -> Image.Image:
    """``image`` (RGB) with each scored patch tinted red in proportion to its score (none at 0, the most at twice
    the image threshold; overlapping patches: the larger score); pixels of no scored patch are greyed."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    heat = np.full(rgb.shape[:2], np.nan, dtype=np.float64)
    p = int(result["patch_size"])
    for (top, left), s in zip(result["patch_positions"], result["patch_scores"]):
        cell = heat[top : top + p, left : left + p]
        heat[top : top + p, left : left + p] = np.where(np.isnan(cell), s, np.maximum(cell, s))
    scale = max(abs(threshold), 1e-12) * 2
    level = np.nan_to_num(heat / scale, nan=0.0).clip(0, 1)[..., None]
    red = np.array([255.0, 0.0, 0.0], dtype=np.float32)
    out = rgb * (1 - 0.7 * level) + red * 0.7 * level
    out = np.where(np.isnan(heat)[..., None], rgb * 0.5 + 64, out)
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8), "RGB")


SEPARATE_PATCHES = 4  # below this many non-overlapping patches a verdict carries a caution (benchmarks/RESULTS.md)


def describe_result(result: dict[str, Any]) -> str:
    """One line for a person: the verdict, the score against the threshold and what was scored."""
    width, height = result["resolution"]
    p = result["patch_size"]
    sampled = "all" if result["patches"] == result["tiles"] else f"a seeded sample of {result['patches']} of"
    changes = result.get("calibrated_benign_changes") or []
    benign = f" and on each of {len(changes)} benign changes" if changes else ""
    separate = (width // p) * (height // p)  # patches that share no pixel
    small = (
        f"; only {separate} separate patch{'es' if separate > 1 else ''}: the score of so small an image is noisier "
        "than the calibration's, a verdict is less certain"
        if separate < SEPARATE_PATCHES
        else ""
    )
    return (
        f"{result['verdict']} (score {result['score']:.4g}, threshold {result['threshold']:.4g} at "
        f"{result['calibrated_fpr']:.0%} false positives on clean images{benign}); scored at the native "
        f"{width}x{height}: "
        f"{sampled} {result['tiles']} {p}x{p} patches, score model {result['score_model']} "
        f"({result['score_dtype']}){small}"
    )
