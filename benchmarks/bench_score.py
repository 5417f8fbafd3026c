"""Score-based samplers on the demo pixel UNet, against the model's own DDPM / DDIM sampling.

1. Quality at equal network evaluations (NFE): Fréchet distance, precision and
   recall in the demo classifier's feature space (images upsampled to its size).
2. Speed: images per second against NFE, and the overhead of each sampler over
   NFE x the cost of one denoiser evaluation measured in the same run (target <= 2 %).

    python benchmarks/bench_score.py --samples 200 --nfe 50 100
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMPipeline

from apps.demo import generate, load_classifier, model_path
from common import device_name
from guidance.score_pipeline import ScoreSamplingPipeline
from quality import measure, table

LEVELS = 10  # annealed Langevin noise levels (the paper's L)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--nfe", type=int, nargs="+", default=[50, 100])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
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
    per_eval = time_one_evaluation(ddpm.unet, args.samples, args.device)
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
            start = time.perf_counter()
            images = sampler(torch.Generator().manual_seed(0))
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            images = images * 2 - 1
            metrics = measure(_resize(images), None, real_features, classifier)
            metrics["NFE"] = nfe
            rows.append((name, metrics))
            speed.append(
                (name, {"NFE": nfe, "images/s": args.samples / seconds, "overhead": seconds / (nfe * per_eval) - 1})
            )
    print(
        f"# demo pixel UNet ({size}x{size}), {args.samples} samples per sampler, {device_name(args.device)}, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(table(rows, ["NFE", "fd", "precision", "recall", "saturation"]))
    print(f"\none denoiser evaluation of the batch: {1e3 * per_eval:.1f} ms")
    print(table(speed, ["NFE", "images/s", "overhead"]))


def _ald_epsilon(score: ScoreSamplingPipeline, levels: int) -> float:
    """A step size that lets the chain mix at the last level: alpha_L = eps ~ sigma_L^2 (see the samplers tests)."""
    return float(score.sigmas(levels)[-1] ** 2)


def run_diffusers(pipe: DDPMPipeline, scheduler, steps: int, n: int, generator: torch.Generator) -> torch.Tensor:
    pipe.scheduler = scheduler
    images = pipe(batch_size=n, num_inference_steps=steps, generator=generator, output_type="np").images
    return torch.from_numpy(images).permute(0, 3, 1, 2)


@torch.no_grad()
def time_one_evaluation(unet, n: int, device: str, repeats: int = 5) -> float:
    config = unet.config
    x = torch.randn(n, config.in_channels, config.sample_size, config.sample_size, device=device)
    t = torch.full((n,), 500, device=device)
    unet(x, t)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        unet(x, t)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _resize(images: torch.Tensor, size: int = 32) -> torch.Tensor:
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def features(classifier, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([classifier.features(_resize(x).to(classifier.device)).cpu() for x in images.split(500)])


if __name__ == "__main__":
    main()
