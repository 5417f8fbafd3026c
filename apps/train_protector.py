"""``python -m apps.train_protector``: :mod:`protect.train` with the demo defaults.

The training images default to the procedural demo shapes (``apps.demo.data``) and ``--vae`` accepts the
``demo/<name>`` aliases of ``models.txt``; every other option is :mod:`protect.train`'s. ``accelerate launch -m
apps.train_protector`` runs it on several GPUs.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from protect import train

from .models import resolve

PROG = "python -m apps.train_protector"


def demo_shapes(batch_size: int, generator: torch.Generator, size: int) -> torch.Tensor:
    """A batch of the procedural demo shapes in [0, 1] (``apps.demo.data``)."""
    from .demo.data import generate

    images, _ = generate(batch_size, generator, size=size)
    return (images + 1) / 2


def main(argv: Iterable[str] | None = None) -> int:
    return train.main(argv, shapes=demo_shapes, resolve=resolve, prog=PROG)


if __name__ == "__main__":
    raise SystemExit(main())
