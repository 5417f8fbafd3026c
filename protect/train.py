"""Train an :class:`~protect.amortized.AmortizedProtector` against one or more VAEs, with ``accelerate``.

The same command runs on one CPU, one GPU or several GPUs (each process draws its own images; gradients are
averaged by ``accelerate``)::

    python -m apps.train_protector --vae demo/vae --vae demo/vae_b --out demo_models/protector  # demo shapes
    accelerate launch -m protect.train --vae stabilityai/sd-vae-ft-mse --images art/ --size 256 --out protector/

VAEs are given as local diffusers folders or hub ids (``from_pretrained``, safetensors only; a folder holding a
``vae/`` subfolder, like a pipeline, works too). The first VAE feeds the gate. Training images come from
``--images DIR`` (random crops of every image in it, decoded with the app's safe loader rules: PNG/JPEG/WebP/BMP/
TIFF, 50 MB and 40 M pixels at most) or from the ``shapes`` callable given to :func:`main` (the procedural demo
shapes and the ``demo/<name>`` VAE aliases: ``python -m apps.train_protector``, which calls :func:`main`).
The loss is :func:`~protect.amortized.multi_vae_target_loss` of the protected images after a random
purification (JPEG, resize, blur or noise, drawn per step with probability ``--robust-prob``). With ``--ldm`` (an
unconditional latent diffusion model of the first VAE: a folder or id with ``unet/`` and ``scheduler/``, e.g.
``demo/photo_ldm``) it also pushes the mimicry damage up: ``--mimicry-weight`` times
:func:`~protect.amortized.mimicry_shift`, a one-step SDEdit surrogate (how far the latent model's clean estimate
of the protected image moves from the clean image's), on the same purified images; ``--mimicry-space`` says where
the estimates are compared (decoded, without the part along the perturbation, by default), ``--target-weight``
weighs the target loss against it. ``--generator-channels C`` adds a full-resolution perturbation U-Net
(:class:`~protect.amortized.PerturbationNet`) to the protector, and ``--init DIR`` starts from a trained
protector's weights (warm start; a U-Net it lacks starts at zero, so the warm-started protector begins exactly
where the old one ended).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .amortized import AmortizedProtector, mimicry_shift, multi_vae_target_loss, one_step_alignment, vae_signature
from .evaluate import unet_denoiser
from .loading import load_unet, load_vae
from .losses import decoded, default_target, latent, vae_stride
from .pgd import random_transform
from .purify import EOT, PURIFICATIONS

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
MAX_FILE_BYTES = 50 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000


Shapes = Callable[[int, torch.Generator, int], torch.Tensor]  # (batch size, generator, size) -> images in [0, 1]


def initialise(protector: AmortizedProtector, name: str) -> None:
    """Copy the weights of the protector at ``name`` into ``protector`` (warm start). Its fields, targets, gate
    and lift must have the same shapes (experts, patch size, latent channels, hidden width); parameters it does
    not have (a :class:`~protect.amortized.PerturbationNet` added now) keep their fresh values."""
    source = AmortizedProtector.from_pretrained(name, local_files_only=Path(name).exists()).state_dict()
    own = protector.state_dict()
    mismatched = [k for k, v in source.items() if k not in own or own[k].shape != v.shape]
    if mismatched:
        raise ValueError(
            f"--init {name}: its {', '.join(mismatched[:4])} do not fit this protector (another number of experts, "
            "patch size, latent channels or width); pass the same --experts and --patch-size"
        )
    protector.load_state_dict(source, strict=False)


def folder_images(folder: Path, size: int, generator: random.Random) -> Iterator[torch.Tensor]:
    """Endless random ``size`` x ``size`` crops (3, size, size) in [0, 1] of the images in ``folder``."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    files = [p for p in files if p.stat().st_size <= MAX_FILE_BYTES]
    if not files:
        raise ValueError(f"no images (PNG, JPEG, WebP, BMP, TIFF up to 50 MB) found under {folder}")
    pictures = []
    for path in files:
        with Image.open(path) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                continue
            image = image.convert("RGB")
            if min(image.size) < size:
                image = image.resize((max(size, image.width), max(size, image.height)), Image.BICUBIC)
            pictures.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    if not pictures:
        raise ValueError(f"every image under {folder} exceeds {MAX_IMAGE_PIXELS} pixels")
    while True:
        picture = pictures[generator.randrange(len(pictures))]
        top = generator.randrange(picture.shape[1] - size + 1)
        left = generator.randrange(picture.shape[2] - size + 1)
        yield picture[:, top : top + size, left : left + size].float() / 255


def data_source(shapes: Shapes | None) -> str:
    """How the training record names a ``shapes`` callable: its ``description``, else its qualified name."""
    return getattr(shapes, "description", None) or f"{shapes.__module__}.{shapes.__qualname__}"


def purified_pair(
    transforms: list[Callable], protected: torch.Tensor, images: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P(protected), P(images))`` for one purification ``P`` drawn from ``generator`` (transformation and
    parameters), the same for both: the protection under purification is measured against the clean image under
    that purification, as :mod:`protect.survival` and :func:`protect.evaluate.evaluate` measure it (else the
    purification's own shift of the latent, 2-8x the protection's, would count as protection)."""
    state = generator.get_state()
    purified = random_transform(transforms, protected, generator)
    after = generator.get_state()
    generator.set_state(state)
    with torch.no_grad():
        reference = random_transform(transforms, images, generator)
    generator.set_state(after)
    return purified, reference


def batches(
    args: argparse.Namespace, process: int, shapes: Shapes | None = None, resumed_at: int = 0
) -> Iterator[torch.Tensor]:
    """Training batches (B, 3, S, S) in [0, 1], an independent stream per process (and per resumption step, so a
    resumed run does not replay the batches it has seen): crops of ``--images``, else drawn from ``shapes``."""
    seed = args.seed + 1000 * process + 1_000_003 * resumed_at
    if args.images is not None:
        crops = folder_images(args.images, args.size, random.Random(seed))
        while True:
            yield torch.stack([next(crops) for _ in range(args.batch_size)])
    if shapes is None:
        raise ValueError("no training images: pass --images DIR (python -m apps.train_protector: the demo shapes)")
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield shapes(args.batch_size, generator, args.size)


RUN_KEYS = (
    "vae",
    "size",
    "steps",
    "batch_size",
    "lr",
    "gate_lr",
    "experts",
    "patch_size",
    "eps",
    "min_strength",
    "ldm",
    "mimicry_weight",
    "generator_channels",
    "init",
    "target_weight",
    "mimicry_space",
    "step_weight",
    "generator_only",
)


def run_identity(args: argparse.Namespace) -> str:
    """The settings a checkpoint must share with the command that resumes it (JSON)."""
    return json.dumps({key: getattr(args, key) for key in RUN_KEYS}, sort_keys=True)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) atomically: a crash keeps the previous file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial_path = path.with_name(path.name + ".partial")
    torch.save(state, partial_path)
    partial_path.replace(path)


def load_checkpoint(path: Path, args: argparse.Namespace) -> dict | None:
    """The state saved at ``path`` (``torch.load(weights_only=True)``: never unpickles code), ``None`` when there is
    none; ``ValueError`` when it was written by a run with other settings (:data:`RUN_KEYS`)."""
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=True, map_location="cpu")
    if state.get("run") != run_identity(args):
        raise ValueError(
            f"{path} is the checkpoint of a run with other settings ({state.get('run')}); pass another "
            "--checkpoint or the same settings"
        )
    return state


def parse_args(
    argv: Iterable[str] | None = None, *, prog: str = "python -m protect.train", default_data: bool = False
) -> argparse.Namespace:
    """The command's arguments; ``default_data``: training images may come from elsewhere than ``--images``."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--vae", action="append", required=True, help="VAE folder or id (repeat for multi-VAE)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the trained protector")
    parser.add_argument("--images", type=Path, help="folder of training images (default: demo shapes)")
    parser.add_argument("--size", type=int, default=32, help="training crop size (default 32)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05, help="learning rate of the perturbation fields")
    parser.add_argument(
        "--gate-lr", type=float, default=1e-3, help="learning rate of the gate and lift networks (default 1e-3)"
    )
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--patch-size", type=int, default=32, help="period of the perturbation fields, pixels")
    parser.add_argument("--eps", type=float, default=8.0, help="training budget in 1/255 (default 8)")
    parser.add_argument("--min-strength", type=float, default=0.5, help="budget share on flat regions")
    parser.add_argument("--robust-prob", type=float, default=0.5, help="chance of a purification per step")
    parser.add_argument("--distortion-weight", type=float, default=1.0, help="weight of the untargeted push")
    parser.add_argument(
        "--balance", type=float, default=0.0, help="load-balancing weight: K * sum_k usage_k^2 (1 when uniform)"
    )
    parser.add_argument(
        "--ldm",
        help="unconditional latent diffusion model of the first VAE (folder or id with unet/ and scheduler/): adds "
        "the mimicry term",
    )
    parser.add_argument(
        "--mimicry-weight", type=float, default=1.0, help="weight of the mimicry term (with --ldm; default 1)"
    )
    parser.add_argument(
        "--generator-channels",
        type=int,
        default=0,
        help="base channels of the full-resolution perturbation U-Net (protect.amortized.PerturbationNet; 0: none)",
    )
    parser.add_argument(
        "--target-weight", type=float, default=1.0, help="weight of the multi-VAE target loss (default 1)"
    )
    parser.add_argument(
        "--init",
        help="start from this protector's weights (folder or id; same experts, patch size and latent channels); "
        "parts it lacks (e.g. the perturbation U-Net) start fresh",
    )
    parser.add_argument(
        "--mimicry-space",
        choices=("excess", "pixels", "latent"),
        default="excess",
        help="how the mimicry term compares the clean estimates: decoded images without the part along the "
        "perturbation (log10 of the mean squared excess change, default), decoded images (log10 of the mean squared "
        "difference: rewards perturbations the round trip merely reproduces) or latents (relative squared "
        "difference)",
    )
    parser.add_argument(
        "--step-weight",
        type=float,
        default=0.0,
        help="weight of the one-PGD-step term (protect.amortized.one_step_alignment averaged over the VAEs; default 0)",
    )
    parser.add_argument(
        "--generator-only",
        action="store_true",
        help="the perturbation is the U-Net's alone: fields at zero and frozen, no lift (needs --generator-channels)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing protector in --out")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="resumable state file: written every --checkpoint-every steps, resumed from when it exists",
    )
    parser.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default 100)")
    args = parser.parse_args(None if argv is None else list(argv))
    if args.steps < 1 or args.batch_size < 1 or args.size < 8 or args.checkpoint_every < 1:
        parser.error("--steps, --batch-size and --checkpoint-every must be >= 1 and --size >= 8")
    if min(args.mimicry_weight, args.target_weight, args.generator_channels, args.step_weight) < 0:
        parser.error("--mimicry-weight, --target-weight, --step-weight and --generator-channels must be >= 0")
    if args.generator_only and not args.generator_channels:
        parser.error("--generator-only needs --generator-channels C (the U-Net is then the whole perturbation)")
    if not 0 < args.eps <= 64:
        parser.error("--eps must be in (0, 64] (1/255 units)")
    if args.images is None and not default_data:
        parser.error("--images is required (python -m apps.train_protector trains on the demo shapes)")
    if (args.out / "config.json").exists() and not args.overwrite:
        parser.error(f"{args.out} already holds a protector; pass --overwrite to replace it")
    return args


def train(
    args: argparse.Namespace,
    *,
    shapes: Shapes | None = None,
    resolve: Callable[[str], str] = str,
    prog: str = "python -m protect.train",
) -> dict:
    """Train and save a protector; returns the training record (also written to ``OUT/training.json``).

    ``shapes`` draws the training images when there is no ``--images``; ``resolve`` maps a ``--vae`` name to a
    folder or hub id (aliases)."""
    from accelerate import Accelerator

    if args.threads:
        torch.set_num_threads(args.threads)
    # cpu=True without a GPU: under torchrun / accelerate launch the CPU processes then join one gloo group
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device = accelerator.device
    vaes = [load_vae(resolve(name), device, label=name) for name in args.vae]
    mimicry = None
    if args.ldm is not None:
        unet, ldm_scheduler = load_unet(resolve(args.ldm), device, label=args.ldm)
        unet.requires_grad_(False)
        if unet.config.in_channels != vaes[0].config.latent_channels:
            raise ValueError(
                f"--ldm {args.ldm} works on {unet.config.in_channels}-channel latents, the first --vae "
                f"{args.vae[0]} has {vaes[0].config.latent_channels}: pass the VAE it was trained on first"
            )
        mimicry = unet_denoiser(unet), ldm_scheduler.alphas_cumprod
    torch.manual_seed(args.seed)
    protector = AmortizedProtector(
        num_experts=args.experts,
        patch_size=args.patch_size,
        latent_channels=vaes[0].config.latent_channels,
        latent_stride=vae_stride(vaes[0]),
        eps=args.eps / 255,
        min_strength=args.min_strength,
        trained_on=tuple(args.vae),
        trained_vae_signatures=tuple(vae_signature(vae) for vae in vaes),
        generator_channels=args.generator_channels,
        residual=not args.generator_only,
    )
    if args.init is not None:
        initialise(protector, resolve(args.init))
    if args.generator_only:
        with torch.no_grad():
            protector.fields.zero_()
        protector.fields.requires_grad_(False)
    networks = [p for name, p in protector.named_parameters() if name != "fields"]
    groups = [{"params": networks, "lr": args.gate_lr}]
    if not args.generator_only:
        groups.insert(0, {"params": [protector.fields], "lr": args.lr})
    optimizer = torch.optim.Adam(groups)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    protector, optimizer, scheduler = accelerator.prepare(protector, optimizer, scheduler)
    model = accelerator.unwrap_model(protector)
    with torch.no_grad():
        target_latents = [model.target_latents(vae, args.size, args.size) for vae in vaes]
    rng = torch.Generator().manual_seed(args.seed + 7 + accelerator.process_index)
    transforms = [PURIFICATIONS[name] for name in EOT]
    losses, usage, start, first = [], torch.zeros(args.experts), time.perf_counter(), 0
    state = load_checkpoint(args.checkpoint, args) if args.checkpoint is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimiser"])
        scheduler.load_state_dict(state["schedule"])
        losses, usage, first = state["losses"].tolist(), state["usage"], int(state["step"])
        rng.set_state(state["rng"][accelerator.process_index])
        start -= float(state["seconds"])
        if accelerator.is_main_process:
            print(f"resuming from {args.checkpoint} at step {first}", file=sys.stderr, flush=True)
    # a resumed run draws fresh batches: its data stream is seeded past the steps already done
    data = batches(args, accelerator.process_index, shapes, first)
    step_targets = None  # PhotoGuard's target latent in each VAE at the training size, for --step-weight
    for step in range(first, args.steps):
        images = next(data).to(device)
        protected, weights = protector(images, vaes[0])
        unpurified, reference = protected, images
        if torch.rand((), generator=rng).item() < args.robust_prob:
            protected, reference = purified_pair(transforms, protected, images, rng)
        with torch.no_grad():  # what the purified protection is measured against: the clean image purified alike
            clean = [latent(vae, reference) for vae in vaes]
        loss = torch.zeros((), device=device)
        if args.target_weight or (mimicry is not None and args.mimicry_weight):
            latents = [latent(vae, protected) for vae in vaes]  # once: the target loss and the mimicry term share them
        if args.target_weight:
            loss = (
                args.target_weight
                * multi_vae_target_loss(
                    vaes, protected, clean, target_latents, weights, args.distortion_weight, latents
                ).mean()
            )
        if mimicry is not None and args.mimicry_weight:
            denoiser, alphas = mimicry
            if args.mimicry_space != "latent":
                carried = protected - reference if args.mimicry_space == "excess" else None
                decode = partial(decoded, vaes[0])
                shift = mimicry_shift(denoiser, alphas, latents[0], clean[0], rng, decode=decode, carried=carried)
                shift = shift.clamp_min(1e-10).log10()  # scale-free: -PSNR / 10 of the estimate's image
            else:
                shift = mimicry_shift(denoiser, alphas, latents[0], clean[0], rng)
            loss = loss - args.mimicry_weight * shift.mean()
        if args.step_weight:  # distil one PhotoGuard step per VAE (on the unpurified perturbation), averaged
            if step_targets is None:
                pattern = default_target(*images.shape[-2:])[None].to(device)
                step_targets = [latent(vae, pattern).detach() for vae in vaes]
            delta, budget = unpurified - images, args.eps / 255
            alignment = torch.stack(
                [one_step_alignment(vae, images, delta, z, rng, budget) for vae, z in zip(vaes, step_targets)]
            ).mean(0)
            loss = loss + args.step_weight * alignment.mean()
        if args.balance:  # Switch-Transformer-style: keep every expert in use across the batch
            loss = loss + args.balance * args.experts * weights.float().mean((0, 2, 3)).pow(2).sum()
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        losses.append(accelerator.reduce(loss.detach(), "mean").item())
        usage += weights.detach().float().mean((0, 2, 3)).cpu()
        if accelerator.is_main_process and (step % 100 == 0 or step == args.steps - 1):
            print(f"step {step}: loss {losses[-1]:.4f}", flush=True)
        if args.checkpoint is not None and (step + 1) % args.checkpoint_every == 0 and step + 1 < args.steps:
            states = accelerator.gather(rng.get_state()[None].to(device)).cpu()  # one generator state per process
            if accelerator.is_main_process:
                save_checkpoint(
                    args.checkpoint,
                    {
                        "run": run_identity(args),
                        "step": step + 1,
                        "model": model.state_dict(),
                        "optimiser": optimizer.state_dict(),
                        "schedule": scheduler.state_dict(),
                        "losses": torch.tensor(losses, dtype=torch.float64),
                        "usage": usage.clone(),
                        "rng": states,
                        "seconds": time.perf_counter() - start,
                    },
                )
    record = {
        "command": f"{prog} " + " ".join(sys.argv[1:]),
        "vaes": list(args.vae),
        "data": str(args.images) if args.images else data_source(shapes),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "processes": accelerator.num_processes,
        "lr": args.lr,
        "gate_lr": args.gate_lr,
        "size": args.size,
        "robust_prob": args.robust_prob,
        "distortion_weight": args.distortion_weight,
        "ldm": args.ldm,
        "mimicry_weight": args.mimicry_weight if args.ldm else None,
        "mimicry_space": args.mimicry_space if args.ldm else None,
        "balance": args.balance,
        "generator_channels": args.generator_channels,
        "target_weight": args.target_weight,
        "init": args.init,
        "step_weight": args.step_weight,
        "generator_only": args.generator_only,
        "first_loss": losses[0],
        "final_loss": float(np.mean(losses[-max(1, len(losses) // 10) :])),
        "losses": [float(f"{x:.5g}") for x in losses[:: max(1, len(losses) // 200)]],
        "expert_usage": (usage / args.steps).tolist(),
        "resumed_at": first or None,
        "seconds": time.perf_counter() - start,
        "device": str(device),
    }
    if accelerator.is_main_process:
        args.out.mkdir(parents=True, exist_ok=True)
        accelerator.unwrap_model(protector).save_pretrained(args.out, safe_serialization=True)
        (args.out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    accelerator.wait_for_everyone()
    return record


def main(
    argv: Iterable[str] | None = None,
    *,
    shapes: Shapes | None = None,
    resolve: Callable[[str], str] = str,
    prog: str = "python -m protect.train",
) -> int:
    """The training command; ``shapes`` and ``resolve`` as in :func:`train`."""
    args = parse_args(argv, prog=prog, default_data=shapes is not None)
    record = train(args, shapes=shapes, resolve=resolve, prog=prog)
    print(f"final loss {record['final_loss']:.4f} in {record['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
