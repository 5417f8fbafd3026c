"""Native-resolution EPS-AD: an image of any size is scored on its own pixels, as a set of patches.

EPS-AD (Zhang et al. 2023) is a two-sample test. Its score model sees images at one resolution (``p x p``,
16 for the demo score model, 32 for CIFAR-10 models); resizing a 512 px upload to that would destroy the very
perturbation to detect (a 32x downscale averages it away). Here an image is cut into ``p x p`` tiles at its
native resolution instead:

* :func:`patch_positions`: every tile of a grid covering the image (the last row and column aligned to the
  border), or, past ``max_patches``, a seeded sample of ``max_patches`` of them. The sample depends on the
  grid's size and the seed only, never on the pixels, so the cost is linear in the pixels up to the cap and
  constant beyond it.
* the EPS of all the patches of all the images, in one stacked batch (``config.batch_size`` model evaluations
  per forward pass: the levels and the patches together);
* the per-image statistic: the unbiased ``MMD^2`` between the image's patch-EPS set ``Y`` (``m`` patches) and
  the clean reference EPS set ``R`` (``n``), with the trained deep kernel,
  ``sum_{i != j} k(r_i, r_j) / n(n-1) + sum_{i != j} k(y_i, y_j) / m(m-1) - 2 mean_ij k(r_i, y_j)``
  (for ``m = 1``: the official per-sample ``MMD_batch``, ``k(y, y) = 1``);
* per patch, the per-sample ``MMD^2`` of its EPS, for a heat map of where an image looks perturbed.

The threshold is the ``1 - fpr`` quantile of the statistic on held-out clean *images* (not patches), scored
the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .detector import EPSDetector, model_fingerprint
from .eps import ValueRange, signed_images
from .mmd import mmd2_to_reference

PATCH_FORMAT = "steerguard.patch_eps_detector/1"

Images = Tensor | Sequence[Tensor]


def _starts(length: int, patch: int) -> list[int]:
    starts = list(range(0, length - patch + 1, patch))
    if starts[-1] != length - patch:
        starts.append(length - patch)  # the last tile aligned to the border: every pixel is covered
    return starts


def patch_positions(
    height: int, width: int, patch: int, max_patches: int | None = None, seed: int = 0
) -> tuple[Tensor, int]:
    """The ``(m, 2)`` top-left corners (row, column) of the patches to score, and the number of tiles.

    All the tiles of a ``patch``-sized grid covering the image, or a sample of ``max_patches`` of them drawn
    from ``seed`` (depends on the grid size and the seed only), in raster order.
    """
    if height < patch or width < patch:
        raise ValueError(
            f"the image is {width}x{height} pixels, smaller than the detector's {patch}x{patch} patches: "
            f"it cannot be scored at its native resolution (need at least {patch}x{patch})"
        )
    rows, cols = _starts(height, patch), _starts(width, patch)
    grid = torch.tensor([(r, c) for r in rows for c in cols], dtype=torch.long)
    tiles = len(grid)
    if max_patches is not None and tiles > max_patches:
        pick = torch.randperm(tiles, generator=torch.Generator().manual_seed(seed))[:max_patches]
        grid = grid[pick.sort().values]
    return grid, tiles


def separate_patches(positions: Tensor, patch: int) -> Tensor:
    """``(m, m)`` bool: which pairs of the patches at ``positions`` share no pixel (the border-aligned last row
    and column of tiles overlap their neighbours; an overlapping pair is nearly one patch twice)."""
    gap = (positions[:, None, :] - positions[None, :, :]).abs()
    return (gap >= patch).any(-1)


def extract_patches(image: Tensor, positions: Tensor, patch: int) -> Tensor:
    """The ``(m, C, patch, patch)`` patches of a ``(C, H, W)`` image at ``positions``."""
    return torch.stack([image[:, r : r + patch, c : c + patch] for r, c in positions.tolist()])


@dataclass(frozen=True)
class ImageScore:
    """One image's result: the statistic, and the patches it was computed on (``patch_scores`` per patch)."""

    score: float
    height: int
    width: int
    patch_size: int
    tiles: int  # tiles in the grid covering the image
    positions: Tensor  # (m, 2) top-left corners of the scored patches
    patch_scores: Tensor  # (m,) per-patch MMD^2 of each patch's EPS against the reference set

    @property
    def patches(self) -> int:
        return len(self.positions)

    def heatmap(self) -> Tensor:
        """An ``(H, W)`` map: each pixel the mean score of the scored patches covering it (NaN where none)."""
        total = torch.zeros(self.height, self.width, dtype=torch.float64)
        count = torch.zeros_like(total)
        p = self.patch_size
        for (r, c), s in zip(self.positions.tolist(), self.patch_scores.double().tolist()):
            total[r : r + p, c : c + p] += s
            count[r : r + p, c : c + p] += 1
        return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))


class PatchEPSDetector(EPSDetector):
    """EPS-AD on native-resolution patches (see the module's docstring); images of any size at least one patch.

    ``fit`` and ``score`` take a list of ``(C, H, W)`` images (sizes may differ) or an ``(N, C, H, W)`` batch, in
    ``[-1, 1]`` (or ``[0, 1]`` with ``value_range=(0, 1)``). ``config.patch_size`` defaults to the score model's
    ``sample_size``; ``config.max_patches`` caps the patches scored per image and ``config.fit_patches`` the
    patches per training image for the kernel and the reference set.
    """

    format = PATCH_FORMAT

    @property
    def patch_size(self) -> int:
        if self.config.patch_size is not None:
            return self.config.patch_size
        size = getattr(getattr(self.denoiser.model, "config", None), "sample_size", None)
        size = size[0] if isinstance(size, list | tuple) else size
        if not isinstance(size, int) or size < 2:
            raise ValueError("the score model has no int sample_size: set patch_size in the detector's config")
        return size

    def _images(self, images: Images, value_range: ValueRange, name: str) -> list[Tensor]:
        if isinstance(images, Tensor) and images.ndim == 3:
            images = [images]
        if isinstance(images, Tensor) and images.ndim != 4:
            raise ValueError(f"{name} must be a (C, H, W) image, an (N, C, H, W) batch or a list of images")
        if len(images) == 0:
            raise ValueError(f"no {name} given")
        out = []
        for i, image in enumerate(images):
            if not isinstance(image, Tensor) or image.ndim != 3:
                shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
                raise ValueError(f"{name}[{i}] must be a (C, H, W) tensor, got {shape}")
            out.append(signed_images(image[None], value_range, f"{name}[{i}]")[0])
        return out

    def patch_eps(self, images: list[Tensor], counts: list[int | None], seeds: list[int]) -> list[tuple]:
        """Per image (``[-1, 1]``): its patch EPS ``(m, C, p, p)``, the positions and the tile count (``counts``: the
        patch cap per image, ``seeds``: the sample's seed per image); one stacked EPS call."""
        p = self.patch_size
        layout = [patch_positions(x.shape[-2], x.shape[-1], p, n, s) for x, n, s in zip(images, counts, seeds)]
        patches = torch.cat([extract_patches(x, pos, p) for x, (pos, _) in zip(images, layout)])
        eps = self.eps(patches).split([len(pos) for pos, _ in layout])
        return [(e, pos, tiles) for e, (pos, tiles) in zip(eps, layout)]

    @torch.no_grad()
    def analyse(self, images: Images, *, value_range: ValueRange = None) -> list[ImageScore]:
        """Each image's :class:`ImageScore`: the per-image statistic and the per-patch scores."""
        if self.kernel is None or self.reference is None:
            raise RuntimeError("the detector is not fitted: call fit() or from_pretrained() first")
        images = self._images(images, value_range, "images")
        c = self.config
        channels = self.reference.shape[1]
        for i, x in enumerate(images):
            if x.shape[0] != channels:
                raise ValueError(f"images[{i}] has {x.shape[0]} channels, the detector was fitted on {channels}")
        parts = self.patch_eps(images, [c.max_patches] * len(images), [c.seed] * len(images))
        results = []
        for x, (eps, positions, tiles) in zip(images, parts):
            kernel, eps = self.kernel_and(eps)
            apart = separate_patches(positions, self.patch_size)
            score, per_patch = mmd2_to_reference(self.reference.to(eps), eps, kernel, apart)
            results.append(
                ImageScore(
                    score=float(score),
                    height=x.shape[-2],
                    width=x.shape[-1],
                    patch_size=self.patch_size,
                    tiles=tiles,
                    positions=positions,
                    patch_scores=per_patch.detach().cpu(),
                )
            )
        return results

    def score(self, images: Images, *, value_range: ValueRange = None) -> Tensor:
        """Each image's patch-set ``MMD^2`` to the clean reference, ``(N,)`` float64; higher = more adversarial."""
        return torch.tensor([r.score for r in self.analyse(images, value_range=value_range)], dtype=torch.float64)

    def fit(
        self,
        clean: Images,
        adversarial: Images,
        *,
        generator: torch.Generator | None = None,
        value_range: ValueRange = None,
    ) -> PatchEPSDetector:
        """Train the kernel on clean vs adversarial patch EPS, keep a reference set of clean patch EPS and set the
        threshold at the ``1 - fpr`` quantile of the per-image statistic of held-out clean *images*.

        ``generator`` (seed 0 if none) splits the clean images, samples the training patches
        (``config.fit_patches`` per image) and initialises and trains the kernel.
        """
        c = self.config
        clean = self._images(clean, value_range, "clean images")
        adversarial = self._images(adversarial, value_range, "adversarial images")
        channels = {x.shape[0] for x in clean + adversarial}
        if len(channels) != 1:
            raise ValueError(f"the images have different channel counts: {sorted(channels)}")
        n_cal = max(2, round(c.calibration_fraction * len(clean)))
        if len(clean) - n_cal < 1:
            raise ValueError(
                f"too few clean images: need >= {n_cal + 1} ({n_cal} held out for calibration), got {len(clean)}"
            )
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        order = torch.randperm(len(clean), generator=generator).tolist()
        calibration, train = [clean[i] for i in order[:n_cal]], [clean[i] for i in order[n_cal:]]

        def sampled_eps(images: list[Tensor]) -> Tensor:  # fit_patches seeded patches per image
            seeds = torch.randint(0, 2**31, (len(images),), generator=generator).tolist()
            return torch.cat([e for e, _, _ in self.patch_eps(images, [c.fit_patches] * len(images), seeds)])

        train_eps, adversarial_eps = sampled_eps(train), sampled_eps(adversarial)
        if len(train_eps) < 2 or len(adversarial_eps) < 2:
            raise ValueError("too few patches to fit: need >= 2 clean and >= 2 adversarial training patches")
        self.fit_kernel(train_eps, adversarial_eps, generator)
        pick = torch.randperm(len(train_eps), generator=generator)[: c.reference_size].sort().values
        self.reference = train_eps[pick.to(train_eps.device)].detach()
        self.set_threshold(self.score(calibration))
        self.fingerprint = model_fingerprint(self.denoiser.model)  # the weights it was fitted with
        return self

    def describe(self) -> dict[str, Any]:
        """What a verdict rests on: patch size, patch cap, levels, calibration (for reports and the app)."""
        n = len(self.calibration_scores) if self.calibration_scores is not None else None
        return {
            "method": "EPS-AD on native-resolution patches (deep-kernel MMD^2 of the patch-EPS set)",
            "patch_size": self.patch_size,
            "max_patches": self.config.max_patches,
            "timesteps": self.config.timesteps,
            "score_model": self.diffusion_model,
            "threshold": self.threshold,
            "calibrated_fpr": self.config.fpr,
            "calibration_images": n,
            "calibrated_benign_changes": sorted(self.benign_calibration),
        }


def score_fgsm(
    denoiser: Any,
    image: Tensor,
    eps: float = 8 / 255,
    *,
    patch_size: int,
    timestep: int = 20,
    seed: int = 0,
    batch_size: int = 64,
) -> Tensor:
    """A generic attack for fitting a detector when no attacked images are given: one FGSM step of L-inf size
    ``eps`` (in ``[0, 1]`` units, so ``2 eps`` on ``[-1, 1]``) up the score model's denoising loss
    ``|x0_hat(x_t) - x|^2`` at ``timestep``, computed tile by tile (the grid of :func:`patch_positions`) on the
    ``(C, H, W)`` image in ``[-1, 1]``; the result is clamped to ``[-1, 1]``. Any pixel diffusion model, any size.
    """
    from guidance import prediction as P

    from .eps import check_images

    check_images(image[None], "image")
    if not 0 < eps <= 64 / 255:
        raise ValueError(f"eps must lie in (0, 64/255], got {eps}")
    positions, _ = patch_positions(image.shape[-2], image.shape[-1], patch_size)
    sigma = denoiser.t_to_sigma(torch.tensor([float(timestep)], dtype=torch.float64)).to(image)
    generator = torch.Generator().manual_seed(seed)
    sign = torch.zeros_like(image)
    for start in range(0, len(positions), batch_size):
        chunk = positions[start : start + batch_size]
        x = extract_patches(image.detach(), chunk, patch_size).float().requires_grad_(True)
        noise = torch.randn(x.shape, generator=generator).to(x)
        x_ve = x + P.broadcast(sigma.float(), x) * noise
        loss = (denoiser(x_ve, sigma.float().expand(len(x))) - x).pow(2).sum()
        (grad,) = torch.autograd.grad(loss, x)
        for (r, c), g in zip(chunk.tolist(), grad.sign()):
            sign[:, r : r + patch_size, c : c + patch_size] = g.to(sign)
    return (image + 2 * eps * sign).clamp(-1, 1).detach()
