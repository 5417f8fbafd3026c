"""Purifications: the benign or deliberate changes a protected image meets on its way (JPEG, resizing, noise,
blur), in one table, :data:`PURIFICATIONS`, for

* the mimicry evaluation (:mod:`protect.evaluate`, the names in :data:`EVALUATION`),
* the detector testbed (:mod:`protect.testbed`, :data:`BENIGN`) and the photo detection benchmark's pixel changes
  (8-bit, PIL: ``jpeg90``, ``resize0.5_pil``, ``noise2_8bit``, ``blur1_pil``...),
* expectation over transformations in PGD (:func:`protect.pgd.pgd`'s ``robust``, the names in :data:`EOT`): the
  random, differentiable entries, whose parameters are drawn from the caller's generator at every step.

``noisy_upscale`` here is its bicubic form; :mod:`protect.purifiers` builds the model-based purifications
(noisy upscaling with a learned upscaler, DiffPure, IMPRESS) from the caller's models.

Every entry takes and returns images ``(N, 3, H, W)`` in [0, 1], in the input's dtype and device.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import kornia
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import Tensor

from .rng import draw

MAX_PIXELS = 4096 * 4096  # as protect.protect: the model purifications (protect.purifiers) refuse larger images
NOISY_UPSCALE_STD = 0.05
Transform = Callable[[Tensor, torch.Generator | None], Tensor]  # a random purification: (images, generator) -> images

__all__ = [
    "BENIGN",
    "EOT",
    "EVALUATION",
    "PURIFICATIONS",
    "Purification",
    "Transform",
    "blur",
    "blur_pil",
    "check_images",
    "gaussian_noise",
    "gaussian_noise_8bit",
    "jpeg",
    "noisy_upscale",
    "purify",
    "resize_pil",
    "resize_roundtrip",
    "sign_noise",
]


def _to_pil(image: Tensor) -> Image.Image:
    """One ``(3, H, W)`` image in [0, 1] as an 8-bit RGB PIL image (rounded)."""
    return Image.fromarray((image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())


def _from_pil(image: Image.Image) -> Tensor:
    """An RGB PIL image as a float32 ``(3, H, W)`` tensor in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).float() / 255


def jpeg(images: Tensor, quality: int = 75) -> Tensor:
    """JPEG re-compression: a PIL round trip through 8 bits at ``quality``."""
    out = []
    for image in images:
        buffer = io.BytesIO()
        _to_pil(image).save(buffer, format="JPEG", quality=quality)
        out.append(_from_pil(Image.open(io.BytesIO(buffer.getvalue()))))
    return torch.stack(out).to(images)


def resize_roundtrip(images: Tensor, factor: float = 0.5, mode: str = "bilinear") -> Tensor:
    """Downscale by ``factor`` (antialiased) and back up to the original size, both with ``mode``."""
    size = images.shape[-2:]
    small = F.interpolate(images.float(), scale_factor=factor, mode=mode, align_corners=False, antialias=True)
    return F.interpolate(small, size=size, mode=mode, align_corners=False).clamp(0, 1).to(images)


def gaussian_noise(images: Tensor, std: float = 2 / 255, seed: int = 0, per_image: bool = False) -> Tensor:
    """Additive Gaussian noise of standard deviation ``std``, clipped to [0, 1]; drawn from one generator seeded
    ``seed``, or with ``per_image`` from one generator per image (``seed + i``: independent of the batch)."""
    if per_image:
        gens = [torch.Generator().manual_seed(seed + i) for i in range(len(images))]
        noise = draw("randn", images.shape, gens, images)
    else:
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)).to(images)
    return (images + std * noise).clamp(0, 1)


def sign_noise(images: Tensor, eps: float = 4 / 255, seed: int = 0) -> Tensor:
    """Random ``+-eps`` per pixel (the L-inf budget of an attack, but no gradient), clipped to [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, images.shape, generator=g).to(images) * 2 - 1
    return (images + eps * signs).clamp(0, 1)


def check_images(images: Tensor, what: str) -> None:
    """``ValueError`` unless ``images`` is a non-empty float batch ``(N, 3, H, W)`` in [0, 1] within the pixel cap."""
    if not isinstance(images, Tensor):
        raise ValueError(f"{what}: expected a tensor of images, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise ValueError(f"{what}: expected images of shape (N, 3, H, W) with N >= 1, got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{what}: expected a float tensor in [0, 1], got dtype {images.dtype}")
    height, width = images.shape[-2:]
    if height * width > MAX_PIXELS:
        raise ValueError(f"{what}: {width}x{height} (width x height) exceeds the {MAX_PIXELS}-pixel cap (4096x4096)")
    if torch.isnan(images).any() or images.min() < 0 or images.max() > 1:
        raise ValueError(f"{what}: images must lie in [0, 1] (no NaN)")


def noisy_upscale(
    images: Tensor, *, std: float = NOISY_UPSCALE_STD, seed: int = 0, upscaler: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """Noisy upscaling (Hönig et al. 2024): Gaussian noise of ``std`` (image ``i`` seeded ``seed + i``, clipped to
    [0, 1]), then a 2x upscale by ``upscaler`` (images -> images of twice the height and width) or, without one,
    bicubic; then back to the native size (bicubic, antialiased), clipped to [0, 1].

    Default ``std`` 0.05 (small noise that a learned upscaler removes). Without a learned upscaler the result is
    the noise, slightly low-passed by the bicubic round trip: on a flat image the change has a standard deviation
    between 0.5 and 1 times ``std``.
    """
    check_images(images, "noisy_upscale")
    if not 0 <= std <= 0.5:
        raise ValueError(f"noisy_upscale: std must lie in [0, 0.5], got {std}")
    height, width = images.shape[-2:]
    noisy = gaussian_noise(images, std=std, seed=seed, per_image=True)
    if upscaler is None:
        up = F.interpolate(noisy.float(), scale_factor=2, mode="bicubic", align_corners=False).clamp(0, 1)
    else:
        up = upscaler(noisy)
        if tuple(up.shape) != (*images.shape[:2], 2 * height, 2 * width):
            raise ValueError(f"noisy_upscale: the upscaler returned {tuple(up.shape)}, not twice {tuple(images.shape)}")
    down = F.interpolate(up.float(), size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return down.clamp(0, 1).to(images)


def blur(images: Tensor, sigma: float = 1.0) -> Tensor:
    """Gaussian blur, 5x5 kernel of standard deviation ``sigma``."""
    return kornia.filters.gaussian_blur2d(images.float(), (5, 5), (sigma, sigma)).clamp(0, 1).to(images)


def resize_pil(images: Tensor, factor: float = 0.5) -> Tensor:
    """8-bit resize with PIL: bicubic down by ``factor`` (no reducing gap) and bicubic back up to the size."""
    out = []
    for image in images:
        pil = _to_pil(image)
        w, h = pil.size
        small = pil.resize((int(w * factor), int(h * factor)), Image.Resampling.BICUBIC, reducing_gap=None)
        out.append(_from_pil(small.resize((w, h), Image.Resampling.BICUBIC)))
    return torch.stack(out).to(images)


def gaussian_noise_8bit(images: Tensor, std: float = 2 / 255, seed: int = 0) -> Tensor:
    """8-bit Gaussian noise: N(0, (255 std)^2) levels added to the 8-bit image, rounded and clipped; image ``i``
    draws from ``numpy.random.default_rng(seed + i)`` (independent of the batch)."""
    out = []
    for i, image in enumerate(images):
        array = np.asarray(_to_pil(image))
        noise = np.random.default_rng(seed + i).normal(0, std * 255, array.shape)
        out.append(_from_pil(Image.fromarray((array + noise).round().clip(0, 255).astype(np.uint8))))
    return torch.stack(out).to(images)


def blur_pil(images: Tensor, radius: float = 1.0) -> Tensor:
    """8-bit Gaussian blur with PIL (``ImageFilter.GaussianBlur(radius)``)."""
    return torch.stack([_from_pil(_to_pil(image).filter(ImageFilter.GaussianBlur(radius))) for image in images]).to(
        images
    )


def _uniform(low: float, high: float, n: int, generator: torch.Generator | None, like: Tensor) -> Tensor:
    return low + (high - low) * draw("rand", (n,), generator, like, torch.float32)


def random_jpeg(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Differentiable JPEG (kornia) at a quality drawn per image from U(50, 95)."""
    quality = _uniform(50.0, 95.0, x.shape[0], generator, x)
    return kornia.enhance.jpeg_codec_differentiable(x, quality)


def random_resize(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Bilinear resize (antialiased) by one factor drawn from U(0.5, 0.9) and back up to the size."""
    scale = _uniform(0.5, 0.9, 1, generator, x).item()
    size = x.shape[-2:]
    small = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False, antialias=True)
    return F.interpolate(small, size=size, mode="bilinear", align_corners=False)


def random_blur(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Gaussian blur (5x5, kornia) with a standard deviation drawn per image from U(0.5, 1.5)."""
    sigma = _uniform(0.5, 1.5, x.shape[0], generator, x)
    border = "reflect" if min(x.shape[-2:]) > 2 else "replicate"  # reflecting 2 px needs 3: tiny images replicate
    return kornia.filters.gaussian_blur2d(x, (5, 5), torch.stack([sigma, sigma], dim=1), border_type=border)


def random_noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Additive Gaussian noise with a standard deviation drawn per image from U(0, 0.05), clipped to [0, 1]."""
    std = _uniform(0.0, 0.05, x.shape[0], generator, x).view(-1, 1, 1, 1)
    noise = draw("randn", x.shape, generator, x)
    return (x + std * noise).clamp(0, 1)


@dataclass(frozen=True)
class Purification:
    """One entry of :data:`PURIFICATIONS`, called as ``entry(images)`` (or ``entry(images, generator)``).

    ``fn`` maps images ``(N, 3, H, W)`` in [0, 1] to images; a ``random`` one also takes the generator its
    parameters are drawn from (a fixed one holds its parameters and seeds and takes none). ``differentiable``:
    gradients flow through ``fn``; the random differentiable entries are the EOT transformations (:data:`EOT`).
    """

    fn: Callable[..., Tensor]
    description: str
    differentiable: bool = False
    random: bool = False

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if self.random:
            return self.fn(images, generator)
        if generator is not None:
            raise ValueError(f"{self.description}: a fixed purification draws nothing; it takes no generator")
        return self.fn(images)


PURIFICATIONS: dict[str, Purification] = {
    "none": Purification(lambda x: x, "unchanged", differentiable=True),
    "jpeg75": Purification(partial(jpeg, quality=75), "JPEG q75 (PIL, 8 bits)"),
    "jpeg90": Purification(partial(jpeg, quality=90), "JPEG q90 (PIL, 8 bits)"),
    "jpeg50": Purification(partial(jpeg, quality=50), "JPEG q50 (PIL, 8 bits)"),
    "resize0.5": Purification(
        partial(resize_roundtrip, factor=0.5, mode="bicubic"), "resize x0.5 and back (bicubic)", differentiable=True
    ),
    "noise4": Purification(
        partial(gaussian_noise, std=4 / 255, per_image=True), "Gaussian noise 4/255 (seeded per image)", True
    ),
    "blur1": Purification(partial(blur, sigma=1.0), "Gaussian blur 5x5, sigma 1", differentiable=True),
    "resize_x0.5": Purification(
        partial(resize_roundtrip, factor=0.5, mode="bilinear"), "resize x0.5 and back (bilinear)", True
    ),
    "gauss_2/255": Purification(
        partial(gaussian_noise, std=2 / 255), "Gaussian noise 2/255 (seed 0)", differentiable=True
    ),
    "sign_4/255": Purification(
        partial(sign_noise, eps=4 / 255), "random +-4/255 per pixel (seed 0)", differentiable=True
    ),
    "resize0.5_pil": Purification(partial(resize_pil, factor=0.5), "resize x0.5 and back (PIL bicubic, 8 bits)"),
    "noise2_8bit": Purification(partial(gaussian_noise_8bit, std=2 / 255), "Gaussian noise 2/255 on 8 bits"),
    "blur1_pil": Purification(partial(blur_pil, radius=1.0), "Gaussian blur radius 1 (PIL, 8 bits)"),
    "noisy_upscale": Purification(
        partial(noisy_upscale, std=NOISY_UPSCALE_STD), "noisy upscaling: Gaussian noise 0.05, 2x bicubic and back"
    ),
    # random and differentiable: the expectation over transformations of PGD (pgd(robust=...))
    "jpeg": Purification(random_jpeg, "JPEG, quality U(50, 95) (differentiable)", differentiable=True, random=True),
    "resize": Purification(random_resize, "resize x U(0.5, 0.9) and back (bilinear)", differentiable=True, random=True),
    "blur": Purification(random_blur, "Gaussian blur 5x5, sigma U(0.5, 1.5)", differentiable=True, random=True),
    "noise": Purification(random_noise, "Gaussian noise, std U(0, 0.05)", differentiable=True, random=True),
}
if not hasattr(kornia.enhance, "jpeg_codec_differentiable"):  # older kornia: no differentiable JPEG
    del PURIFICATIONS["jpeg"]
# what the mimicry evaluation reports (with protect.purifiers.model_purifications: DiffPure, IMPRESS)
EVALUATION = ("none", "jpeg90", "jpeg75", "jpeg50", "resize0.5", "noise4", "blur1", "noisy_upscale")
BENIGN = ("jpeg75", "resize_x0.5", "gauss_2/255", "sign_4/255")  # the detector's false-positive checks
EOT = tuple(name for name, entry in PURIFICATIONS.items() if entry.random and entry.differentiable)


def purify(images: Tensor, name: str, generator: torch.Generator | None = None) -> Tensor:
    """Apply purification ``name`` of :data:`PURIFICATIONS` to images in [0, 1] (``generator``: for a random one)."""
    if name not in PURIFICATIONS:
        raise ValueError(f"unknown purification {name!r}; choose from {sorted(PURIFICATIONS)}")
    return PURIFICATIONS[name](images, generator)
