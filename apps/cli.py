"""The ``steerguard`` command line: ``app``, ``generate`` and ``train``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .generate import METHODS, PERTURBATIONS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="steerguard", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    app = commands.add_parser("app", help="start the Gradio app (default: the embedded demo models)")
    app.add_argument("--model", default="demo/dit", help="hub id, local folder or demo/<name> (see models.txt)")
    app.add_argument("--host", default="127.0.0.1")
    app.add_argument("--port", type=int, default=7860)
    app.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: the GPU when there is one)")

    gen = commands.add_parser("generate", help="generate images to PNG files")
    gen.add_argument("subject", help="a class name (class-conditional models) or a prompt")
    gen.add_argument("--model", default="demo/dit")
    gen.add_argument("--method", choices=METHODS, default="apg")
    gen.add_argument("--scale", type=float, default=4.0)
    gen.add_argument("--eta", type=float, default=0.0)
    gen.add_argument("--norm-threshold", type=float, default=None)
    gen.add_argument("--momentum", type=float, default=None)
    gen.add_argument("--perturbation", choices=tuple(PERTURBATIONS), default="none", help="PAG or TPG on top")
    gen.add_argument("--perturbation-scale", type=float, default=2.0)
    gen.add_argument("--corrector-steps", type=int, default=0, help="Langevin corrector steps per noise level")
    gen.add_argument("--steps", type=int, default=25)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--num-images", type=int, default=4)
    gen.add_argument("--out", type=Path, default=Path("out"), help="output folder (files are never overwritten)")
    gen.add_argument("--device", default=None)

    train = commands.add_parser("train", help="train the embedded demo models (python -m apps.demo.train)")
    train.add_argument("args", nargs=argparse.REMAINDER, help="arguments for apps.demo.train")

    args = parser.parse_args(argv)
    try:
        if args.command == "app":
            from .app import build_app

            build_app(args.model, args.device).launch(server_name=args.host, server_port=args.port)
        elif args.command == "generate":
            return _generate(args)
        elif args.command == "train":
            from .demo.train import main as train_main

            train_main(args.args)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"steerguard {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .generate import Request, generate
    from .models import load_pipeline

    request = Request(
        args.subject,
        method=args.method,
        scale=args.scale,
        eta=args.eta,
        norm_threshold=args.norm_threshold,
        momentum=args.momentum,
        steps=args.steps,
        seed=args.seed,
        num_images=args.num_images,
        perturbation=args.perturbation,
        perturbation_scale=args.perturbation_scale,
        corrector_steps=args.corrector_steps,
    )
    images = generate(load_pipeline(args.model, args.device), request)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.subject[:40].replace(' ', '_').replace('/', '_')}-{args.method}-s{args.scale:g}-seed{args.seed}"
    for i, image in enumerate(images):
        path = args.out / f"{stem}-{i}.png"
        n = 1
        while path.exists():
            path, n = args.out / f"{stem}-{i}.{n}.png", n + 1
        image.save(path)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
