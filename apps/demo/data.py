"""Procedural, seeded "shapes" dataset: RGB images of 10 classes for the demo models.

Each image is one class-defining foreground (a shape such as a disc or a star, or
a texture such as stripes) in a random bright colour, at a random position, size
and rotation, over a random dark background (a two-colour gradient plus
low-frequency value noise, a faint grating, and fine grain). Everything is
computed in batched torch ops from a ``torch.Generator``, so the same seed gives
the same images, and tens of thousands of 32x32 images take a few seconds.

>>> images, labels = generate(16, torch.Generator().manual_seed(0))  # float in [-1, 1], (16, 3, 32, 32)
>>> pixels, labels = generate_uint8(16, seed=0)                        # uint8, (16, 32, 32, 3)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

CLASS_NAMES: tuple[str, ...] = (
    "disc",
    "square",
    "triangle",
    "ring",
    "cross",
    "star",
    "stripes",
    "checker",
    "diamond",
    "crescent",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 32

Tensor = torch.Tensor
# A signed distance (in pixels, negative inside) from rotated, centred coordinates u, v and radius r.
ShapeFn = Callable[[Tensor, Tensor, Tensor], Tensor]


# ----------------------------------------------------------------------------- shapes


def _regular_polygon(u: Tensor, v: Tensor, r: Tensor, sides: int) -> Tensor:
    """Distance-like field of a regular polygon with circumradius ``r`` (max over its edge half-planes)."""
    angles = torch.arange(sides, dtype=u.dtype) * (2 * math.pi / sides) + math.pi / 2
    proj = u[..., None] * torch.cos(angles) + v[..., None] * torch.sin(angles)
    return proj.amax(-1) - r * math.cos(math.pi / sides)


def _disc(u: Tensor, v: Tensor, r: Tensor) -> Tensor:
    return torch.sqrt(u**2 + v**2) - r


def _square(u: Tensor, v: Tensor, r: Tensor) -> Tensor:
    return torch.maximum(u.abs(), v.abs()) - 0.8 * r


def _triangle(u: Tensor, v: Tensor, r: Tensor) -> Tensor:
    return _regular_polygon(u, v + 0.25 * r, 1.15 * r, 3)


def _ring(u: Tensor, v: Tensor, r: Tensor) -> Tensor:
    return (torch.sqrt(u**2 + v**2) - 0.75 * r).abs() - 0.25 * r


def _cross(u: Tensor, v: Tensor, r: Tensor) -> Tensor:
    arm = 0.3 * r
    horizontal = torch.maximum(u.abs() - r, v.abs() - arm)
    vertical = torch.maximum(u.abs() - arm, v.abs() - r)
    return torch.minimum(horizontal, vertical)


def _star(u: Tensor, v: Tensor, r: Tensor) -> Tensor:
    theta = torch.atan2(v, u)
    outline = r * (0.45 + 0.6 * ((torch.cos(5 * theta) + 1) / 2) ** 2)
    return torch.sqrt(u**2 + v**2) - outline


def _stripes(u: Tensor, v: Tensor, r: Tensor) -> Tensor:
    period = 0.55 * r
    return -2.0 * torch.sin(2 * math.pi * u / period)


def _checker(u: Tensor, v: Tensor, r: Tensor) -> Tensor:
    period = 0.9 * r
    return -3.0 * torch.sin(2 * math.pi * u / period) * torch.sin(2 * math.pi * v / period)


def _diamond(u: Tensor, v: Tensor, r: Tensor) -> Tensor:
    # An elongated rhombus (aspect 1:2), so that it differs from a rotated square.
    return (u.abs() / (0.6 * r) + v.abs() / (1.15 * r) - 1) * 0.5 * r


def _crescent(u: Tensor, v: Tensor, r: Tensor) -> Tensor:
    outer = torch.sqrt(u**2 + v**2) - r
    inner = torch.sqrt((u - 0.5 * r) ** 2 + v**2) - 0.8 * r
    return torch.maximum(outer, -inner)


SHAPES: dict[str, ShapeFn] = {
    "disc": _disc,
    "square": _square,
    "triangle": _triangle,
    "ring": _ring,
    "cross": _cross,
    "star": _star,
    "stripes": _stripes,
    "checker": _checker,
    "diamond": _diamond,
    "crescent": _crescent,
}
# Textures fill the whole image; shapes are placed somewhere inside it.
TEXTURES = frozenset({"stripes", "checker"})


# ----------------------------------------------------------------------------- colours and backgrounds


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """(N,) hue/saturation/value in [0, 1] -> (N, 3) RGB in [0, 1]."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + h[:, None] * 6) % 6
    return v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def _rand(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _foreground_colours(n: int, generator: torch.Generator) -> Tensor:
    """Bright, saturated colours of random hue, (N, 3) in [0, 1]."""
    hue = torch.rand(n, generator=generator)
    return _hsv_to_rgb(hue, _rand(n, 0.55, 1.0, generator), _rand(n, 0.75, 1.0, generator))


def _backgrounds(n: int, size: int, generator: torch.Generator) -> Tensor:
    """Dark textured backgrounds, (N, 3, size, size) in [0, 1]."""
    c0 = _hsv_to_rgb(torch.rand(n, generator=generator), _rand(n, 0.0, 0.6, generator), _rand(n, 0.05, 0.45, generator))
    c1 = _hsv_to_rgb(torch.rand(n, generator=generator), _rand(n, 0.0, 0.6, generator), _rand(n, 0.05, 0.45, generator))
    ys, xs = _grid(size)
    angle = _rand(n, 0, 2 * math.pi, generator)[:, None, None]
    ramp = ((xs * torch.cos(angle) + ys * torch.sin(angle)) / math.sqrt(2) + 0.5).clamp(0, 1)
    image = c0[:, :, None, None] + (c1 - c0)[:, :, None, None] * ramp[:, None]
    for cells, amplitude in ((3, 0.3), (7, 0.2)):  # two octaves of value noise
        noise = torch.rand(n, 1, cells, cells, generator=generator) - 0.5
        noise = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)
        image = image + _rand(n, 0.0, amplitude, generator)[:, None, None, None] * noise
    freq = _rand(n, 2, 6, generator)[:, None, None] * 2 * math.pi
    tilt = _rand(n, 0, math.pi, generator)[:, None, None]
    grating = torch.sin(freq * (xs * torch.cos(tilt) + ys * torch.sin(tilt)))
    image = image + _rand(n, 0.0, 0.08, generator)[:, None, None, None] * grating[:, None]
    grain = torch.randn(n, 3, size, size, generator=generator)
    return (image + _rand(n, 0.0, 0.04, generator)[:, None, None, None] * grain).clamp(0, 1)


def _grid(size: int) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates in [-0.5, 0.5), each (size, size): rows (y) and columns (x)."""
    axis = (torch.arange(size, dtype=torch.float32) + 0.5) / size - 0.5
    return torch.meshgrid(axis, axis, indexing="ij")


# ----------------------------------------------------------------------------- images


def _alpha(labels: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """Anti-aliased foreground coverage (N, size, size) in [0, 1] for each image's class."""
    n = labels.numel()
    scale = size / IMAGE_SIZE  # shape parameters are in 32x32 pixel units, rescaled to `size`
    radius = _rand(n, 6.0, 11.0, generator) * scale
    margin = radius / size
    cx = (torch.rand(n, generator=generator) - 0.5) * (1 - 2 * margin).clamp(min=0)
    cy = (torch.rand(n, generator=generator) - 0.5) * (1 - 2 * margin).clamp(min=0)
    angle = _rand(n, 0, 2 * math.pi, generator)
    ys, xs = _grid(size)
    dx, dy = (xs - cx[:, None, None]) * size, (ys - cy[:, None, None]) * size
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    alpha = torch.zeros(n, size, size)
    for index, name in enumerate(CLASS_NAMES):
        rows = (labels == index).nonzero().squeeze(1)
        if rows.numel():
            sdf = SHAPES[name](u[rows], v[rows], radius[rows, None, None])
            alpha[rows] = (0.5 - sdf).clamp(0, 1)
    return alpha


def render(labels: Tensor, generator: torch.Generator, size: int = IMAGE_SIZE) -> Tensor:
    """Render one image per label: float (N, 3, size, size) in [-1, 1]."""
    labels = labels.to("cpu", torch.long)
    n = labels.numel()
    background = _backgrounds(n, size, generator)
    colour = _foreground_colours(n, generator)[:, :, None, None]
    alpha = _alpha(labels, size, generator)[:, None]
    image = background * (1 - alpha) + colour * alpha
    return image * 2 - 1


def generate(
    n: int, generator: torch.Generator, size: int = IMAGE_SIZE, labels: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``n`` images of random (or the given) labels: float (N, 3, size, size) in [-1, 1] and labels (N,)."""
    if labels is None:
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    return render(labels, generator, size), labels


def generate_uint8(n: int, seed: int = 0, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images for seed ``seed`` as uint8 (N, size, size, 3) and int64 labels (N,)."""
    images, labels = generate(n, torch.Generator().manual_seed(seed), size)
    return to_uint8(images), labels.numpy()


def to_uint8(images: Tensor) -> np.ndarray:
    """Float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3)."""
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


def batches(batch_size: int, generator: torch.Generator, size: int = IMAGE_SIZE) -> Iterator[tuple[Tensor, Tensor]]:
    """An endless stream of fresh (images, labels) batches."""
    while True:
        yield generate(batch_size, generator, size)


def contact_sheet(images: Tensor, rows: int, scale: int = 3) -> np.ndarray:
    """Tile float (N, 3, H, W) images in [-1, 1] into one uint8 (rows*H*scale, cols*W*scale, 3) picture."""
    pixels = to_uint8(images)
    n, h, w, _ = pixels.shape
    cols = math.ceil(n / rows)
    sheet = np.zeros((rows * (h + 1), cols * (w + 1), 3), dtype=np.uint8)
    for i, tile in enumerate(pixels):
        r, c = divmod(i, cols)
        sheet[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = tile
    return sheet.repeat(scale, 0).repeat(scale, 1)
