"""The app's example images (apps/examples) are tiny and say what the app claims of them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from apps.demo import DEMO_DIR
from apps.tabs.common import EXAMPLES

SIZES = {
    "star-32.png": 32,
    "checker-128.png": 128,
    "clean-16.png": 16,
    "pgd8-16.png": 16,
    "photo-64.png": 64,
    "photo-pgd8-64.png": 64,
}


def test_example_images_are_small_rgb_squares():
    for name, size in SIZES.items():
        path = EXAMPLES / name
        assert path.stat().st_size < 10_000, f"{name} should stay tiny"
        image = Image.open(path)
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (size, size)


@pytest.mark.skipif(not (DEMO_DIR / "eps_detector" / "config.json").is_file(), reason="no demo detector")
def test_the_demo_detector_gets_the_example_pair_right():
    """The 16 px testbed detector (demo_models/eps_detector, fixed resolution; the app's native-resolution
    detector is another one) on the pair, each image alone as the CLI scored it."""
    import torch

    from apps.models import load_score_model
    from protect import EPSDetector

    clean, adversarial = (Image.open(EXAMPLES / name) for name in ("clean-16.png", "pgd8-16.png"))
    difference = np.abs(np.asarray(clean, np.int16) - np.asarray(adversarial, np.int16))
    assert 0 < difference.max() <= 8  # PGD within 8/255
    unet, scheduler = load_score_model("demo/unet_eps", "cpu")
    detector = EPSDetector.from_pretrained(DEMO_DIR / "eps_detector", unet, scheduler)
    batch = torch.stack(
        [torch.from_numpy(np.asarray(im, np.float32).copy()).permute(2, 0, 1) for im in (clean, adversarial)]
    )
    verdicts = [detector.verdict(s) for s in detector.score(batch / 255, value_range=(0, 1))]
    assert verdicts == ["clean", "adversarial"], (
        "the Detect tab calls this a pair the demo detector gets right: rerun scripts/make_examples.py"
    )


@pytest.mark.skipif(not (DEMO_DIR / "photo_detector" / "config.json").is_file(), reason="no demo photo detector")
def test_the_app_detector_gets_the_photo_example_pair_right():
    """The Detect tab's first example: a 64 px crop of a held-out photo and its one-step PhotoGuard version at
    8/255, scored by the app's native-resolution photo detector as uploads."""
    from apps.services import detect_images, load_detector

    clean, protected = (Image.open(EXAMPLES / name) for name in ("photo-64.png", "photo-pgd8-64.png"))
    difference = np.abs(np.asarray(clean, np.int16) - np.asarray(protected, np.int16))
    assert 0 < difference.max() <= 8  # within 8/255
    results = detect_images(load_detector(device="cpu"), [clean, protected])
    assert [r["verdict"] for r in results] == ["clean", "adversarial"], (
        "the Detect tab calls this a pair the demo detector gets right: rerun scripts/make_examples.py"
    )
    assert all(r["resolution"] == [64, 64] and r["patch_size"] == 32 for r in results)
