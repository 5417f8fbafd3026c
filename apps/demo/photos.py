"""A photo corpus from installed packages, split by source photo, for the photo demo models.

Sources (all load offline): scikit-image's colour photos (astronaut, chelsea, coffee, rocket, hubble_deep_field,
immunohistochemistry, retina), its grey photos and textures (camera, moon, brick, grass, gravel, clock, coins,
horse, page, text, cell, microaneurysms; expanded to RGB), and scikit-learn's ``load_sample_images()`` (china,
flower).

**Held out, never used in training** (``HELD_OUT``): ``astronaut`` (colour portrait), ``coffee`` (colour still
life), ``china`` (colour landscape) and ``camera`` (grey scene). They are the evaluation photos of the protection
and detection benchmarks, at native resolution (``held_out_photos()``). Every other source is a training source
(``TRAIN``); ``PhotoStream`` draws only from those.

Training crops (``PhotoStream.sample``) are seeded (one ``torch.Generator``, whose state a checkpoint can save):
a source drawn uniformly, a square crop of side ``size * scale`` with ``scale`` log-uniform in
``[1, max_scale]`` (capped by the photo's size) resized to ``size`` with antialiasing (multi-scale), a random
horizontal flip and rotation by a multiple of 90 degrees, and colour jitter (brightness, contrast, saturation).
``benign_processing`` adds JPEG re-encoding, down-and-up resizing and mild Gaussian noise, so that a model trained
with it sees benign processing as in-distribution (the pixel diffusion model of the detector).

Images are float32 tensors (N, 3, H, W) in [-1, 1].
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

COLOUR = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
GREY = (
    "camera",
    "moon",
    "brick",
    "grass",
    "gravel",
    "clock",
    "coins",
    "horse",
    "page",
    "text",
    "cell",
    "microaneurysms",
)
SKLEARN = ("china", "flower")
SOURCES = (*COLOUR, *GREY, *SKLEARN)
HELD_OUT = ("astronaut", "coffee", "china", "camera")
TRAIN = tuple(name for name in SOURCES if name not in HELD_OUT)


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data

        return getattr(data, name)()

    return load


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_images

        images = load_sample_images()
        index = [i for i, f in enumerate(images.filenames) if f.endswith(f"{name}.jpg")]
        return images.images[index[0]]

    return load


def _loader(name: str) -> Callable[[], np.ndarray]:
    return _sklearn(name) if name in SKLEARN else _skimage(name)


@cache
def photo_uint8(name: str) -> np.ndarray:
    """Source photo ``name`` as a read-only uint8 array (H, W, 3) at native resolution (grey expanded to RGB)."""
    if name not in SOURCES:
        raise ValueError(f"unknown photo {name!r}; choose from {', '.join(SOURCES)}")
    try:
        array = np.asarray(_loader(name)())
    except ImportError as error:  # pragma: no cover - depends on the environment
        hint = "pip install steerguard[train]"
        raise ImportError(f"photo {name!r} needs scikit-image and scikit-learn ({hint})") from error
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    array = np.ascontiguousarray(array[..., :3].astype(np.uint8))
    array.setflags(write=False)
    return array


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.array(array, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


@cache
def _photo_tensor(name: str) -> torch.Tensor:
    return to_tensor(photo_uint8(name))


def photo(name: str) -> torch.Tensor:
    """Source photo ``name`` as float32 (3, H, W) in [-1, 1] at native resolution."""
    return _photo_tensor(name).clone()


def held_out_photos() -> dict[str, torch.Tensor]:
    """The held-out evaluation photos (never trained on), each (3, H, W) in [-1, 1] at native resolution."""
    return {name: photo(name) for name in HELD_OUT}


@dataclass(frozen=True)
class Crop:
    """Where one training crop came from: source name and the (top, left, side) box in the source's pixels."""

    source: str
    top: int
    left: int
    side: int


class PhotoStream:
    """Seeded multi-scale augmented square crops of the training photos (never the held-out ones).

    ``split="held_out"`` draws from the held-out photos instead: for evaluation only (e.g. with ``max_scale=1``
    and ``augment=False``: native-resolution patches).
    ``sample(n)`` returns (n, 3, size, size) in [-1, 1]; ``last_crops`` lists where each came from. All randomness
    comes from ``self.generator`` (save ``generator.get_state()`` to resume the stream).
    """

    def __init__(self, size: int, seed: int = 0, max_scale: float = 4.0, augment: bool = True, split: str = "train"):
        if size < 1:
            raise ValueError(f"crop size must be positive, got {size}")
        if max_scale < 1:
            raise ValueError(f"max_scale must be >= 1, got {max_scale}")
        if split not in ("train", "held_out"):
            raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
        self.size, self.max_scale, self.augment, self.split = size, max_scale, augment, split
        self.sources = TRAIN if split == "train" else HELD_OUT
        self.generator = torch.Generator().manual_seed(seed)
        self.last_crops: list[Crop] = []

    def _uniform(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def _crop(self) -> tuple[torch.Tensor, Crop]:
        source = self.sources[int(torch.randint(len(self.sources), (), generator=self.generator))]
        image = _photo_tensor(source)
        height, width = image.shape[-2:]
        largest = min(height, width)
        max_scale = min(self.max_scale, largest / self.size)
        scale = math.exp(self._uniform() * math.log(max_scale)) if max_scale > 1 else 1.0
        side = min(largest, max(1, round(self.size * scale)))
        top = int(torch.randint(height - side + 1, (), generator=self.generator))
        left = int(torch.randint(width - side + 1, (), generator=self.generator))
        crop = image[:, top : top + side, left : left + side]
        if side != self.size:
            crop = F.interpolate(crop[None], size=(self.size, self.size), mode="bilinear", antialias=True)[0]
        if self.augment:
            crop = self._augment(crop)
        return crop, Crop(source, top, left, side)

    def _augment(self, crop: torch.Tensor) -> torch.Tensor:
        if self._uniform() < 0.5:
            crop = crop.flip(-1)
        crop = torch.rot90(crop, int(torch.randint(4, (), generator=self.generator)), dims=(-2, -1))
        brightness = 0.2 * (self._uniform() - 0.5)  # +-0.1 of the [-1, 1] range
        contrast = 0.8 + 0.4 * self._uniform()
        saturation = 0.7 + 0.6 * self._uniform()
        grey = crop.mean(0, keepdim=True)
        crop = grey + saturation * (crop - grey)
        mean = crop.mean()
        crop = mean + contrast * (crop - mean) + brightness
        return crop.clamp(-1, 1)

    def sample(self, n: int) -> torch.Tensor:
        """``n`` crops (n, 3, size, size), float32 in [-1, 1]; their provenance in ``last_crops``."""
        crops, where = zip(*(self._crop() for _ in range(n)), strict=True) if n else ((), ())
        self.last_crops = list(where)
        if not crops:
            return torch.empty(0, 3, self.size, self.size)
        return torch.stack(crops).contiguous()


def jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG round trip (PIL, 4:2:0) of one image (3, H, W) in [-1, 1] at ``quality``."""
    array = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=int(quality))
    decoded = np.asarray(Image.open(buffer).convert("RGB"))
    return to_tensor(decoded).to(image.device, image.dtype)


def benign_processing(
    images: torch.Tensor,
    generator: torch.Generator,
    p_jpeg: float = 0.3,
    p_resize: float = 0.3,
    p_noise: float = 0.3,
    max_sigma: float = 0.04,
) -> torch.Tensor:
    """Randomly JPEG (quality 50-95), resize down (x0.5-0.9) and back, and add Gaussian noise (sigma <= max_sigma
    in [-1, 1] units, i.e. <= 5/255 by default) to each image of (N, 3, H, W); each with its probability.
    """
    out = []
    size = images.shape[-2:]
    for image in images:
        if float(torch.rand((), generator=generator)) < p_resize:
            factor = 0.5 + 0.4 * float(torch.rand((), generator=generator))
            small = [max(1, round(s * factor)) for s in size]
            image = F.interpolate(image[None], size=small, mode="bilinear", antialias=True)
            image = F.interpolate(image, size=tuple(size), mode="bilinear", align_corners=False)[0]
        if float(torch.rand((), generator=generator)) < p_jpeg:
            image = jpeg(image, 50 + int(torch.randint(46, (), generator=generator)))
        if float(torch.rand((), generator=generator)) < p_noise:
            sigma = max_sigma * float(torch.rand((), generator=generator))
            image = image + sigma * torch.randn(image.shape, generator=generator).to(image.device, image.dtype)
        out.append(image.clamp(-1, 1))
    return torch.stack(out) if out else images
