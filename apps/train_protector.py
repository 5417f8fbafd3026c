"""``python -m apps.train_protector``: :mod:`protect.train` with the demo defaults.

The training images default to the procedural demo shapes (``apps.demo.data``); ``--data photos`` draws seeded
multi-scale crops of the *training* photos of the photo corpus instead (``apps.demo.photos.PhotoStream``, never a
held-out photo). ``--vae`` accepts the ``demo/<name>`` aliases of ``models.txt``; every other option is
:mod:`protect.train`'s. ``accelerate launch -m apps.train_protector`` runs it on several GPUs.

    python -m apps.train_protector --data photos --vae demo/photo_vae --vae demo/photo_vae_b --size 128 --out DIR
"""

from __future__ import annotations

import argparse
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


class PhotoCrops:
    """Batches of training-photo crops in [0, 1] (the ``shapes`` callable of :func:`protect.train.main`): one
    :class:`~apps.demo.photos.PhotoStream` per crop size, seeded from the first draw of the caller's generator (so
    every process of a multi-GPU run gets its own stream)."""

    description = "apps.demo.photos.PhotoStream (crops of the training photos)"  # the data, in the training record

    def __init__(self) -> None:
        self.streams: dict[int, object] = {}

    def __call__(self, batch_size: int, generator: torch.Generator, size: int) -> torch.Tensor:
        from .demo.photos import PhotoStream

        if size not in self.streams:
            self.streams[size] = PhotoStream(size, seed=int(torch.randint(2**31, (), generator=generator)))
        return (self.streams[size].sample(batch_size) + 1) / 2


DATA = {"shapes": lambda: demo_shapes, "photos": PhotoCrops}


def main(argv: Iterable[str] | None = None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--data", choices=tuple(DATA), default="shapes")
    known, rest = pre.parse_known_args(None if argv is None else list(argv))
    return train.main(rest, shapes=DATA[known.data](), resolve=resolve, prog=PROG)


if __name__ == "__main__":
    raise SystemExit(main())
