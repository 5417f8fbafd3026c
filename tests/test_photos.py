"""The photo corpus: the held-out split is never trained on (by source id and by pixel content), crops are
seeded, shaped and in range, and the benign processing changes images by bounded amounts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from apps.demo import photos
from apps.demo.photos import COLOUR, HELD_OUT, SKLEARN, SOURCES, TRAIN, PhotoStream

pytest.importorskip("skimage")
pytest.importorskip("sklearn")

WINDOW = 8


def to_uint8(crop: torch.Tensor) -> np.ndarray:
    """Inverse of ``photos.to_tensor`` for unresampled crops: exact uint8 (H, W, 3)."""
    return ((crop + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def window_hashes(image: np.ndarray) -> np.ndarray:
    """A 56-bit content hash of every textured WINDOW x WINDOW x 3 window of a uint8 image (H, W, 3).

    Two exact integer random projections of the window's pixels (float64 convolutions of integers below 2^53 are
    exact), packed into one int64. Flat windows (pixel std < 3 grey levels: sky, saturated highlights) are left
    out, since different photos share them.
    """
    x = torch.from_numpy(image.astype(np.float64)).permute(2, 0, 1)[None]
    weights = torch.randint(0, 4096, (2, 3, WINDOW, WINDOW), generator=torch.Generator().manual_seed(0)).double()
    h = F.conv2d(x, weights)[0].long()
    ones = torch.ones(1, 3, WINDOW, WINDOW, dtype=torch.float64)
    n = 3 * WINDOW * WINDOW
    var = F.conv2d(x * x, ones)[0, 0] / n - (F.conv2d(x, ones)[0, 0] / n) ** 2
    textured = var > 9
    return (h[0] * (1 << 28) + h[1])[textured].numpy()


@pytest.fixture(scope="module")
def held_out_hashes() -> np.ndarray:
    """Sorted unique hashes of every textured window of the held-out photos."""
    return np.unique(np.concatenate([window_hashes(photos.photo_uint8(name)) for name in HELD_OUT]))


def found(hashes: np.ndarray, table: np.ndarray) -> bool:
    """Whether any of ``hashes`` is in the sorted array ``table``."""
    index = np.searchsorted(table, hashes).clip(0, len(table) - 1)
    return bool((table[index] == hashes).any())


def test_split_by_source_is_documented_and_disjoint():
    assert set(TRAIN).isdisjoint(HELD_OUT) and set(TRAIN) | set(HELD_OUT) == set(SOURCES)
    colour = [name for name in HELD_OUT if name in COLOUR or name in SKLEARN]
    assert len(colour) >= 2 and 3 <= len(HELD_OUT) <= 4
    for name in HELD_OUT:
        assert name in photos.__doc__
    assert set(photos.held_out_photos()) == set(HELD_OUT)


def test_training_stream_draws_only_training_sources():
    stream = PhotoStream(16, seed=0)
    seen = set()
    for _ in range(10):
        stream.sample(40)
        seen |= {crop.source for crop in stream.last_crops}
    assert seen <= set(TRAIN)
    assert len(seen) >= len(TRAIN) - 2  # 400 uniform draws over 17 sources reach (nearly) all of them


def test_no_training_crop_matches_held_out_pixels(held_out_hashes):
    stream = PhotoStream(24, seed=1, max_scale=1.0, augment=False)
    crops = stream.sample(60)
    matched = 0
    for crop, where in zip(crops, stream.last_crops):
        pixels = to_uint8(crop)
        source = photos.photo_uint8(where.source)
        # the provenance record is truthful: the unresampled crop is that box of that training photo
        assert np.array_equal(pixels, source[where.top : where.top + 24, where.left : where.left + 24])
        matched += found(window_hashes(pixels), held_out_hashes)
    assert matched == 0


def test_the_pixel_hash_detects_held_out_crops(held_out_hashes):
    """Positive control: the same check flags crops that do come from the held-out photos."""
    stream = PhotoStream(24, seed=1, max_scale=1.0, augment=False, split="held_out")
    crops = stream.sample(20)
    flagged = [found(window_hashes(to_uint8(c)), held_out_hashes) for c in crops]
    textured = [len(window_hashes(to_uint8(c))) > 0 for c in crops]
    assert sum(flagged) == sum(textured) > 10
    assert {crop.source for crop in stream.last_crops} <= set(HELD_OUT)


def test_crops_are_seeded_shaped_and_in_range():
    a, b, c = PhotoStream(32, seed=5), PhotoStream(32, seed=5), PhotoStream(32, seed=6)
    x, y, z = a.sample(12), b.sample(12), c.sample(12)
    assert x.shape == (12, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, y) and not torch.equal(x, z)
    assert a.last_crops == b.last_crops
    # the generator state carries the stream: a restored state continues identically
    state = a.generator.get_state()
    following = a.sample(4)
    a.generator.set_state(state)
    assert torch.equal(a.sample(4), following)
    scales = {crop.side for _ in range(5) for crop in (a.sample(20), a.last_crops)[1]}
    assert min(scales) < 48 and max(scales) > 64  # multi-scale: zooms from x1 to x4


def test_grey_photos_become_rgb_and_augmentation_keeps_them_grey():
    for name in ("camera", "moon", "horse"):
        array = photos.photo_uint8(name)
        assert array.ndim == 3 and array.shape[2] == 3 and array.dtype == np.uint8
        assert np.array_equal(array[..., 0], array[..., 2])
    stream = PhotoStream(16, seed=0)
    crops = stream.sample(60)
    for crop, where in zip(crops, stream.last_crops):
        if where.source in ("moon", "brick", "grass", "gravel"):
            torch.testing.assert_close(crop[0], crop[1])


def test_held_out_photos_at_native_resolution():
    sizes = {name: tuple(image.shape) for name, image in photos.held_out_photos().items()}
    assert sizes == {
        "astronaut": (3, 512, 512),
        "coffee": (3, 400, 600),
        "china": (3, 427, 640),
        "camera": (3, 512, 512),
    }
    astronaut = photos.held_out_photos()["astronaut"]
    assert astronaut.min() >= -1 and astronaut.max() <= 1 and astronaut.std() > 0.2


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown photo"):
        photos.photo_uint8("lena")
    with pytest.raises(ValueError, match="positive"):
        PhotoStream(0)
    with pytest.raises(ValueError, match="max_scale"):
        PhotoStream(16, max_scale=0.5)
    with pytest.raises(ValueError, match="split"):
        PhotoStream(16, split="test")


def test_jpeg_and_benign_processing_change_images_by_bounded_amounts():
    clean = PhotoStream(32, seed=0).sample(16)
    q95, q50 = photos.jpeg(clean[0], 95), photos.jpeg(clean[0], 50)
    err95, err50 = (q95 - clean[0]).abs().mean().item(), (q50 - clean[0]).abs().mean().item()
    assert 0 < err95 < err50 < 0.15  # mean absolute error in [-1, 1] units
    processed = photos.benign_processing(clean, torch.Generator().manual_seed(0))
    again = photos.benign_processing(clean, torch.Generator().manual_seed(0))
    assert torch.equal(processed, again) and processed.shape == clean.shape
    changed = (processed - clean).abs().flatten(1).mean(1)
    assert (changed > 0).any() and (changed < 0.15).all()
    none = photos.benign_processing(clean, torch.Generator().manual_seed(0), p_jpeg=0, p_resize=0, p_noise=0)
    assert torch.equal(none, clean)
    noisy = photos.benign_processing(clean, torch.Generator(), p_jpeg=0, p_resize=0, p_noise=1, max_sigma=0.02)
    assert (noisy - clean).std() < 0.02
