"""Attacking large images in crops: :func:`tiles` covers an image with ``tile`` x ``tile`` crops, and
:func:`tiled_loss` takes the mean of a per-crop loss over them, :data:`TILE_BATCH` crops per image at a time, so a
step costs in proportion to the pixels and its activation memory is that of a few crops, whatever the image size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .rng import Generators, check_generators

Tensor = torch.Tensor
TILE_BATCH = 4  # with ``tile``: tiles of each image per forward pass (activation memory: 4 tiles per image)

__all__ = ["TILE_BATCH", "ChunkedRowLoss", "crop_generators", "crops_per_image", "rows_of", "tiled_loss", "tiles"]


def _origins(size: int, tile: int) -> list[int]:
    return [0] if size <= tile else [*range(0, size - tile, tile), size - tile]


def tiles(x: Tensor, tile: int) -> Tensor:
    """``tile`` x ``tile`` crops covering the images ``x`` (N, C, H, W) (sides shorter than ``tile`` are kept whole;
    the last row and column of crops overlap the previous ones), stacked tile-major: crop ``t`` of image ``i`` is
    row ``t * N + i``."""
    height, width = x.shape[-2:]
    th, tw = min(tile, height), min(tile, width)
    return torch.cat([x[..., y : y + th, z : z + tw] for y in _origins(height, tile) for z in _origins(width, tile)])


def crops_per_image(x: Tensor, tile: int) -> int:
    """How many :func:`tiles` of ``tile`` px cover each image of ``x``."""
    return len(_origins(x.shape[-2], tile)) * len(_origins(x.shape[-1], tile))


def crop_generators(generator: Generators, n: int, count: int) -> Generators:
    """The generators of the ``count`` tile-major crops of each of ``n`` images: a list of one per image repeated
    as the crops are stacked, so that image ``i``'s crops draw from its own; a single generator (or None) as given."""
    if isinstance(generator, list | tuple):
        check_generators(generator, n)
        return list(generator) * count
    return generator


def rows_of(generator: Generators, rows: slice) -> Generators:
    """The generators of ``rows`` of a batch: those entries of a list of one per row, else the one given."""
    return generator[rows] if isinstance(generator, list) else generator


class ChunkedRowLoss(torch.autograd.Function):
    """Per-row losses of ``rows`` computed ``chunk`` rows at a time, each chunk's gradient taken in the forward pass
    and its graph freed there: the activation memory is that of one chunk, whatever the number of rows (the tiles
    of a large image). Exact because each row's loss depends on that row only (per-image losses)."""

    @staticmethod
    def forward(ctx, rows: Tensor, loss_of: Callable[[slice], Callable[[Tensor], Tensor]], chunk: int) -> Tensor:
        losses, grads = [], []
        for start in range(0, rows.shape[0], chunk):
            part = slice(start, start + chunk)
            with torch.enable_grad():
                x = rows[part].detach().requires_grad_(True)
                loss = loss_of(part)(x)
                (grad,) = torch.autograd.grad(loss.sum(), x)
            losses.append(loss.detach())
            grads.append(grad)
        ctx.save_for_backward(torch.cat(grads))
        return torch.cat(losses)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * grad_output.view(-1, *([1] * (grad.ndim - 1))).to(grad.dtype), None, None


def tiled_loss(loss_of: Callable[[slice], Callable[[Tensor], Tensor]], tile: int, count: int, x: Tensor) -> Tensor:
    """The mean over the ``count`` :func:`tiles` of each image of the loss, :data:`TILE_BATCH` tiles of every image
    at a time (whole tile-major groups, so each image's generator draws in the same order whatever the batch)."""
    n = x.shape[0]
    return ChunkedRowLoss.apply(tiles(x, tile), loss_of, TILE_BATCH * n).view(count, n).mean(0)
