"""Score-based samplers on the demo pixel UNet, against the model's own DDPM / DDIM sampling.

1. Quality at equal network evaluations (NFE): Fréchet distance, precision and
   recall in the demo classifier's feature space (images upsampled to its size).
2. Speed: images per second against NFE, and each sampler's overhead: its time
   outside the network's forward calls (timed by hooks on the UNet in the same
   run) relative to the time inside them (target <= 2 %).

    python benchmarks/bench_score.py --samples 200 --nfe 50 100
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMPipeline

from apps.demo import generate, load_classifier, model_path
from apps.device import best_device
from common import device_name
from guidance.score_pipeline import ScoreSamplingPipeline
from quality import measure, table

LEVELS = 10  # annealed Langevin noise levels (the paper's L)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--nfe", type=int, nargs="+", default=[50, 100])
    parser.add_argument("--device", default=str(best_device()[0]))
    args = parser.parse_args()
    ddpm = DDPMPipeline.from_pretrained(str(model_path("unet")), use_safetensors=True).to(args.device)
    ddpm.set_progress_bar_config(disable=True)
    score = ScoreSamplingPipeline(ddpm.unet, ddpm.scheduler)
    ddpm_scheduler, ddim_scheduler = ddpm.scheduler, DDIMScheduler.from_config(ddpm.scheduler.config)
    classifier = load_classifier(args.device)
    size = ddpm.unet.config.sample_size
    real, _ = generate(4000, torch.Generator().manual_seed(12345), size=size)
    real_features = features(classifier, real)

    rows, speed = [], []
    inside = NetworkTimer(ddpm.unet, args.device)
    for nfe in args.nfe:
        samplers = {
            f"DDPM {nfe} steps": lambda g, n=nfe: run_diffusers(ddpm, ddpm_scheduler, n, args.samples, g),
            f"DDIM {nfe} steps": lambda g, n=nfe: run_diffusers(ddpm, ddim_scheduler, n, args.samples, g),
            f"annealed Langevin {LEVELS}x{nfe // LEVELS - 1}+final": lambda g, n=nfe: score(
                args.samples,
                sampler="annealed_langevin",
                num_levels=LEVELS,
                steps_per_level=n // LEVELS - 1,
                epsilon=_ald_epsilon(score, LEVELS),
                generator=g,
                output_type="pt",
            ),
            f"predictor-corrector {nfe // 2} levels, 1 corrector step": lambda g, n=nfe: score(
                args.samples, sampler="predictor_corrector", num_levels=n // 2, generator=g, output_type="pt"
            ),
        }
        for name, sampler in samplers.items():
            inside.reset()
            start = time.perf_counter()
            images = sampler(torch.Generator().manual_seed(0))
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            images = images * 2 - 1
            metrics = measure(_resize(images), None, real_features, classifier)
            metrics["NFE"] = inside.calls
            rows.append((name, metrics))
            overhead = 100 * (seconds - inside.seconds) / inside.seconds
            speed.append((name, {"NFE": inside.calls, "images/s": args.samples / seconds, "overhead %": overhead}))
    print(
        f"# demo pixel UNet ({size}x{size}), {args.samples} samples per sampler, {device_name(args.device)}, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(table(rows, ["NFE", "fd", "precision", "recall", "saturation"]))
    print()
    print(table(speed, ["NFE", "images/s", "overhead %"]))


def _ald_epsilon(score: ScoreSamplingPipeline, levels: int) -> float:
    """A step size that lets the chain mix at the last level: alpha_L = eps ~ sigma_L^2 (see the samplers tests)."""
    return float(score.sigmas(levels)[-1] ** 2)


def run_diffusers(pipe: DDPMPipeline, scheduler, steps: int, n: int, generator: torch.Generator) -> torch.Tensor:
    pipe.scheduler = scheduler
    images = pipe(batch_size=n, num_inference_steps=steps, generator=generator, output_type="np").images
    return torch.from_numpy(images).permute(0, 3, 1, 2)


class NetworkTimer:
    """Counts the UNet's forward calls and the wall time spent inside them (forward hooks)."""

    def __init__(self, unet, device: str) -> None:
        self.device = device
        unet.register_forward_pre_hook(self._enter)
        unet.register_forward_hook(self._leave)
        self.reset()

    def reset(self) -> None:
        self.calls, self.seconds, self._start = 0, 0.0, 0.0

    def _sync(self) -> float:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter()

    def _enter(self, module, args) -> None:
        self._start = self._sync()

    def _leave(self, module, args, output) -> None:
        self.seconds += self._sync() - self._start
        self.calls += 1


def _resize(images: torch.Tensor, size: int = 32) -> torch.Tensor:
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def features(classifier, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([classifier.features(_resize(x).to(classifier.device)).cpu() for x in images.split(500)])


if __name__ == "__main__":
    main()
