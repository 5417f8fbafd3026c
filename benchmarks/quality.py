"""Quality of generated images on the demo data, measured with the demo classifier.

* FD: Fréchet distance between classifier features of samples and of real data
  (FID's formula in our own feature space);
* precision / recall: Kynkäänniemi et al. 2019, k-NN manifolds (k = 3) in the same space;
* accuracy: the classifier's top-1 agreement with the requested classes;
* saturation: mean HSV saturation, and the fraction of clipped channel values
  (0 or 255 after 8-bit quantisation); the real data's values are the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor

from apps.demo.classifier import batched
from protect.metrics import frechet_distance


def saturation(images: Tensor) -> float:
    """Mean HSV saturation ``(max - min) / max`` of images in [-1, 1] (N, 3, H, W)."""
    rgb = (images.float().clamp(-1, 1) + 1) / 2
    high, low = rgb.amax(dim=1), rgb.amin(dim=1)
    return ((high - low) / high.clamp_min(1e-8)).mean().item()


def clipped_fraction(images: Tensor) -> float:
    """Fraction of channel values that quantise to 0 or 255."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round()
    return ((pixels <= 0) | (pixels >= 255)).float().mean().item()


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of ``fake`` against ``real`` features."""

    def radii(features: Tensor) -> Tensor:
        return torch.cdist(features, features).kthvalue(k + 1, dim=1).values  # +1: the point itself

    def coverage(reference: Tensor, queries: Tensor) -> float:
        inside = torch.cdist(queries, reference) <= radii(reference)[None]
        return inside.any(dim=1).float().mean().item()

    real, fake = real.double(), fake.double()
    return coverage(real, fake), coverage(fake, real)


@torch.no_grad()
def measure(images: Tensor, labels: Tensor | None, real_features: Tensor, classifier) -> dict[str, float]:
    """Every metric of the module docstring for images in [-1, 1] (and their requested labels)."""
    device = next(classifier.parameters()).device
    features = batched(lambda x: classifier.features(x.to(device)), images)
    precision, recall = precision_recall(real_features, features)
    out = {"fd": frechet_distance(real_features, features), "precision": precision, "recall": recall}
    if labels is not None:
        logits = batched(lambda x: classifier(x.to(device)), images)
        out["accuracy"] = (logits.argmax(1) == labels.cpu()).float().mean().item()
    out["saturation"] = saturation(images)
    out["clipped"] = clipped_fraction(images)
    return out


def contact_sheet(images: Tensor, columns: int, scale: int = 2) -> Image.Image:
    """A grid PNG of images in [-1, 1] (N, 3, H, W), ``columns`` per row, enlarged ``scale`` times."""
    n, _, h, w = images.shape
    rows = -(-n // columns)
    sheet = torch.ones(3, rows * (h + 1), columns * (w + 1))
    for i, image in enumerate(images.float().cpu().clamp(-1, 1)):
        r, c = divmod(i, columns)
        sheet[:, r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = (image + 1) / 2
    pixels = (sheet * 255).round().byte().permute(1, 2, 0).numpy()
    picture = Image.fromarray(pixels)
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def table(rows: Sequence[tuple[str, dict[str, float]]], keys: Sequence[str]) -> str:
    """A Markdown table of metric rows."""
    lines = ["| setting | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, values in rows:
        lines.append(f"| {name} | " + " | ".join(f"{values[k]:.3f}" if k in values else "" for k in keys) + " |")
    return "\n".join(lines)
