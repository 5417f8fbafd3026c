"""Fine-tune the demo pixel UNet into the score model of the EPS detector (``demo_models/unet_eps``).

EPS-AD only queries the score at small noise levels (``t <= t_max``, a few percent of the diffusion time), where
the 1000-step demo UNet (``demo_models/unet``, uniform timesteps) has seen only a few thousand samples. This
continues its training on the same data and objective (fresh 16x16 shapes every step, eps-prediction MSE, AdamW
with warm-up and cosine decay, EMA) with the timesteps drawn from a mixture that over-samples the small ones:
one third uniform over all 1000 steps, one third uniform below 200, one third uniform below 50. The result is
still an ordinary unconditional ``DDPMPipeline``. Checkpoints (model, EMA, optimiser) every ``--every`` steps
let a run be resumed with ``--resume``.

    OMP_NUM_THREADS=1 python -m benchmarks.train_eps_unet --steps 3500 --out demo_models/unet_eps
    OMP_NUM_THREADS=1 python -m benchmarks.train_eps_unet --card-only --out demo_models/unet_eps

``--card-only`` writes the model card (``README.md``) of a saved run, with the held-out eps-prediction error of
the fine-tuned and the base UNet at a few timesteps.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline

from apps.demo import generate, load_ddpm_pipeline
from apps.demo.train import EMA, final_loss, folder_size, warmup_cosine

DATA_SEED = 3_000_017  # a data stream of its own (the demo models trained on seed 0)
SMALL_T = (1000, 200, 50)  # the timestep mixture: uniform below each bound, equal weights


def sample_timesteps(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` timesteps from the mixture of uniforms over ``[0, b)`` for ``b`` in :data:`SMALL_T`."""
    bounds = torch.tensor(SMALL_T)[torch.randint(0, len(SMALL_T), (n,), generator=generator)]
    return (torch.rand(n, generator=generator) * bounds).long()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--every", type=int, default=250, help="checkpoint (and save the EMA pipeline) every N steps")
    parser.add_argument("--out", type=Path, default=Path("demo_models/unet_eps"))
    parser.add_argument("--checkpoints", type=Path, default=Path("/tmp/unet_eps_ckpt"))
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--card-only", action="store_true", help="only write README.md for the model in --out")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.card_only:
        write_card(args.out)
        return
    command = "python -m benchmarks.train_eps_unet " + " ".join(sys.argv[1:] if argv is None else argv)

    base = load_ddpm_pipeline()
    model, scheduler = base.unet, base.scheduler
    ema = EMA(model, decay=0.999)
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, warmup_cosine(100, args.steps))
    data, noise = torch.Generator().manual_seed(DATA_SEED), torch.Generator().manual_seed(DATA_SEED + 1)
    losses: list[float] = []
    start_step, elapsed = 0, 0.0
    args.checkpoints.mkdir(parents=True, exist_ok=True)
    ckpt = args.checkpoints / "state.pt"
    if args.resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        schedule.load_state_dict(state["schedule"])
        ema.shadow, ema.updates = state["ema"], state["ema_updates"]
        data.set_state(state["data"])
        noise.set_state(state["noise"])
        losses, start_step, elapsed = state["losses"], state["step"], state["elapsed"]
    abar = scheduler.alphas_cumprod

    def save(step: int) -> None:
        torch.save(
            {
                "model": model.state_dict(),
                "optimiser": optimiser.state_dict(),
                "schedule": schedule.state_dict(),
                "ema": ema.shadow,
                "ema_updates": ema.updates,
                "data": data.get_state(),
                "noise": noise.get_state(),
                "losses": losses,
                "step": step,
                "elapsed": elapsed,
            },
            ckpt,
        )
        averaged = type(model).from_config(model.config)
        averaged.load_state_dict(model.state_dict())
        ema.copy_to(averaged)
        DDPMPipeline(unet=averaged.eval(), scheduler=scheduler).save_pretrained(args.out, safe_serialization=True)
        record = {
            "name": "unet_eps",
            "base": "demo_models/unet",
            "steps": step,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "timestep_mixture_bounds": list(SMALL_T),
            "data_seed": DATA_SEED,
            "seconds": elapsed,
            "step_seconds": elapsed / max(1, step - 0),
            "final_loss": final_loss(losses),
            "losses": [float(f"{x:.5g}") for x in losses],
            "command": command,
            "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} thread(s)), float32",
            "weights_mb": folder_size(args.out) / 1e6,
        }
        (args.out / "training.json").write_text(json.dumps(record) + "\n")
        print(f"step {step}: loss {final_loss(losses):.4f}, {elapsed:.0f} s, saved", flush=True)

    model.train()
    for step in range(start_step, args.steps):
        t0 = time.perf_counter()
        images = generate(args.batch_size, data, size=model.config.sample_size)[0]
        t = sample_timesteps(len(images), noise)
        eps = torch.randn(images.shape, generator=noise)
        a = abar[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(model(a.sqrt() * images + (1 - a).sqrt() * eps, t).sample, eps)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        ema.update(model)
        losses.append(loss.item())
        elapsed += time.perf_counter() - t0
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            save(step + 1)


EVAL_TIMESTEPS = (2, 10, 20, 50, 100, 300, 600)


@torch.no_grad()
def eps_mse(unet: torch.nn.Module, scheduler, n: int = 256, seed: int = DATA_SEED + 7) -> dict[int, float]:
    """Held-out eps-prediction MSE at each of :data:`EVAL_TIMESTEPS` (same images and noise for every model)."""
    images = generate(n, torch.Generator().manual_seed(seed), size=unet.config.sample_size)[0]
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed + 1))
    out = {}
    for t in EVAL_TIMESTEPS:
        a = scheduler.alphas_cumprod[t]
        x_t = a.sqrt() * images + (1 - a).sqrt() * noise
        out[t] = F.mse_loss(unet(x_t, t).sample, noise).item()
    return out


def write_card(out: Path) -> None:
    """README.md for the run saved in ``out``: what it is, how it was trained, held-out eps MSE vs the base."""
    record = json.loads((out / "training.json").read_text())
    tuned = DDPMPipeline.from_pretrained(str(out), use_safetensors=True, local_files_only=True)
    base = load_ddpm_pipeline()
    mse_tuned, mse_base = eps_mse(tuned.unet.eval(), tuned.scheduler), eps_mse(base.unet.eval(), base.scheduler)
    rows = "\n".join(f"| {t} | {mse_base[t]:.4f} | {mse_tuned[t]:.4f} |" for t in EVAL_TIMESTEPS)
    record["eps_mse_held_out"] = {"base": mse_base, "tuned": mse_tuned}
    (out / "training.json").write_text(json.dumps(record) + "\n")
    text = f"""# steerguard demo model: unet_eps

The score model of the demo EPS-AD detector (`demo_models/eps_detector`, `apps.models.load_score_model`):
an unconditional pixel-space `DDPMPipeline` at 16x16, the demo UNet (`demo_models/unet`: `UNet2DModel`, channels
(32, 64, 64), one layer per block, attention at the middle level, linear betas over 1000 steps, 1000 CPU steps)
trained for {record["steps"]} more steps with the small timesteps over-sampled, because EPS only queries the score
at small noise levels. Same architecture and scheduler as `demo/unet`, so it loads and samples the same way.

## Training
| setting | value |
|---|---|
| command | `{record["command"]}` |
| initialised from | `demo_models/unet` (its EMA weights) |
| data | procedural shapes (`apps/demo/data.py`) at 16x16, fresh every step, seed {record["data_seed"]} |
| steps | {record["steps"]} |
| batch size | {record["batch_size"]} |
| timesteps | mixture of uniforms below {", ".join(map(str, record["timestep_mixture_bounds"]))} (equal weights) |
| objective | eps-prediction MSE |
| optimiser | AdamW (weight decay 0.01), lr {record["lr"]:g}, 100 warm-up steps then cosine decay, grad clip 1.0 |
| EMA | 0.999 (with (1+t)/(10+t) warm-up); these are the EMA weights |
| device | {record["device"]} |
| final loss (mean of last 10 % of steps) | {record["final_loss"]:.4f} |
| time per step | {record["step_seconds"]:.2f} s (a shared, loaded machine) |
| training time | {record["seconds"]:.0f} s |
| weights on disk | {record["weights_mb"]:.2f} MB |

Reproduce with `OMP_NUM_THREADS=1 python -m benchmarks.train_eps_unet --steps {record["steps"]} --out
demo_models/unet_eps` (then `--card-only` for this card); the run above wrote to a scratch folder first.

## Held-out eps-prediction MSE (256 images, same noise), base vs this model
| timestep | demo/unet | unet_eps |
|---|---|---|
{rows}

## Caveats
A toy model trained for minutes on a CPU. Its role is the EPS detector's score at small noise levels; it was not
evaluated as a sampler (`demo/unet` stays the sampling demo and the score-sampler benchmark's model).
"""
    (out / "README.md").write_text(text)


if __name__ == "__main__":
    main()
