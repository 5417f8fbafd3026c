"""What a request will cost, known before it starts: seconds estimated from unit costs measured on this device.

At start-up the app times a few tiny operations once (:meth:`Costs.measure`: one tiled PGD step of the demo VAE
on one tile, the amortized protector on one tile, a mimicry preview, one denoising step of the generation
model) and keeps the seconds per unit (per pixel and PGD step of each method, per pixel, per preview, per image
and step).
:func:`protect_seconds` and :func:`generate_seconds` multiply them by a request's pixels, steps and images (PGD
runs on tiles, so its cost grows in proportion to the pixels), and :func:`check_budget` refuses a request whose
estimate exceeds ``steerguard app --max-seconds`` before any work starts, with a message that says what to change.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable

from protect import AMORTIZED_BUDGETS, Finetune
from protect.amortized import PerturbationNet

from .jobs import duration

__all__ = ["Costs", "check_budget", "generate_seconds", "measure", "protect_seconds", "tiled_pixels"]


def measure(fn: Callable[[], object], repeats: int = 3) -> float:
    """The fastest of ``repeats`` timed calls of ``fn`` after one warm-up call, in seconds."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


class Costs:
    """Seconds per unit of work on this device, measured once per name (thread-safe)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.unit: dict[str, float] = {}
        self._lock = threading.Lock()

    def measure(self, name: str, fn: Callable[[], object], units: float = 1.0, repeats: int = 3) -> float:
        """Seconds per unit of ``name``: ``fn`` does ``units`` units of work; measured on the first call only."""
        with self._lock:
            if name not in self.unit:
                self.unit[name] = measure(fn, repeats) / units
            return self.unit[name]

    def __getitem__(self, name: str) -> float:
        if name not in self.unit:
            raise KeyError(f"the cost of {name!r} has not been measured on {self.device}")
        return self.unit[name]


MIN_CROP_SIDE = 16  # a crop thinner than this costs as much as one this thick (fixed per-crop work, padding)


def tiled_pixels(width: int, height: int, tile: int) -> int:
    """The pixels that PGD on ``tile`` x ``tile`` crops processes for one step (overlapping crops count twice),
    each crop's side counted as at least :data:`MIN_CROP_SIDE`: a 2 px high strip of 128 px crops took 4.8x the
    time per pixel of square crops (measured on the 2-core CPU), and would otherwise slip under the budget."""

    def side(n: int) -> int:
        return math.ceil(n / tile) * max(min(n, tile), min(MIN_CROP_SIDE, tile))

    return side(width) * side(height)


def protect_seconds(
    costs: Costs,
    sizes: Iterable[tuple[int, int]],
    method: str,
    steps: int,
    tile: int,
    preview: bool,
    finetune: Finetune | None = None,
) -> float:
    """Estimated seconds of one ``/protect`` request on images of ``sizes`` (width, height); ``finetune``: ASPL's
    fine-tunes (two of ``finetune.steps`` steps per round of ``finetune.pgd_steps`` PGD steps)."""
    total = 0.0
    for width, height in sizes:
        pixels = tiled_pixels(width, height, tile)
        if method in AMORTIZED_BUDGETS:  # amortized, amortized-full: one forward pass (tiles with halos > 1024 px)
            total += PerturbationNet.processed_pixels(height, width) * costs["amortized_pixel"]
        else:
            total += pixels * steps * costs[f"pgd_pixel_step:{method}"]
        if method == "aspl":
            settings = finetune or Finetune()
            rounds = math.ceil(steps / settings.pgd_steps)
            total += pixels * rounds * 2 * settings.steps * costs["aspl_finetune_pixel"]
        if "report_pixel" in costs.unit:  # the PSNR and SSIM of the report, on the whole image
            total += width * height * costs["report_pixel"]
        if preview and min(width, height) >= 8:
            total += costs["preview"]
        if "survival_pixel" in costs.unit:  # the survival report (JPEG q75, noisy upscaling), where measured
            total += tiled_pixels(width, height, tile) * costs["survival_pixel"]
    return total


def generate_seconds(costs: Costs, model: str, rows: int, images: int, steps: int, branches: int) -> float:
    """Estimated seconds of ``rows`` generations of ``images`` images of ``steps`` steps, ``branches`` denoiser
    batches per step (1 + CFG + perturbation), from the measured cost of one image-step of one branch."""
    return rows * images * steps * branches * costs[f"generate:{model}"]


def check_budget(seconds: float, limit: float | None, what: str, advice: str) -> None:
    """Raise ``ValueError`` when the estimated ``seconds`` exceed ``limit`` (None: no limit)."""
    if limit is not None and seconds > limit:
        raise ValueError(
            f"{what} would take about {duration(seconds)} on this server, more than its limit of "
            f"{duration(limit)} per request (steerguard app --max-seconds); {advice}"
        )
