"""A small CNN classifier / feature extractor for the shapes data, and quality metrics built on it.

``ShapeClassifier`` is a diffusers ``ModelMixin`` + ``ConfigMixin``, so it saves
and loads like any diffusers model (``config.json`` + ``diffusion_pytorch_model.safetensors``).
Its ``features`` (the pooled penultimate layer) define the space of the Fréchet
distance used to score generated images.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from protect.loading import dtype_option

from .data import NUM_CLASSES


class ShapeClassifier(ModelMixin, ConfigMixin):
    """Stages of conv-GroupNorm-SiLU layers, 2x average pooling between stages, global average pooling, linear head.

    Inputs are float images (N, 3, H, W) in [-1, 1]; ``forward`` returns logits (N, num_classes).
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = NUM_CLASSES,
        block_out_channels: tuple[int, ...] = (16, 32, 64, 128),
        layers_per_block: int = 2,
        norm_num_groups: int = 8,
        image_size: int = 32,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for i, width in enumerate(block_out_channels):
            for _ in range(layers_per_block):
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(norm_num_groups, width), nn.SiLU()]
                channels = width
            if i < len(block_out_channels) - 1:
                layers.append(nn.AvgPool2d(2))
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (N, block_out_channels[-1]) for images in [-1, 1]."""
        return self.body(images.to(self.dtype)).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes) for images in [-1, 1]."""
        return self.head(self.features(images))


def load_classifier(
    path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> ShapeClassifier:
    """Load a saved ``ShapeClassifier`` (safetensors, local files only) in eval mode."""
    kwargs = {} if dtype is None else dtype_option(dtype)
    model = ShapeClassifier.from_pretrained(str(path), use_safetensors=True, local_files_only=True, **kwargs)
    return (model if device is None else model.to(device)).eval()


@torch.no_grad()
def batched(fn, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Apply ``fn`` to ``images`` in chunks and concatenate the results on the CPU."""
    return torch.cat([fn(chunk).float().cpu() for chunk in images.split(batch_size)])


def accuracy(model: ShapeClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on images in [-1, 1] (moved to the model's device)."""
    logits = batched(lambda x: model(x.to(model.device)), images)
    return (logits.argmax(1) == labels.cpu()).float().mean().item()
