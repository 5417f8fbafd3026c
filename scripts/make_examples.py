"""Write the app's one-click example images to ``apps/examples/`` (tiny PNGs, committed; rerun to reproduce).

* ``star-32.png``, ``checker-128.png``: demo shapes (32x32; the second enlarged 4x, nearest) for the Protect tab;
* ``clean-16.png``, ``pgd8-16.png``: a clean 16x16 shape and its PGD (L-inf 8/255, 10 steps) adversarial
  version against the demo classifier, at the EPS detector's own resolution, for the Detect tab. The pair is
  the first one (in seed order) where the classifier is fooled and the demo detector is right on both images;
  the script prints how often the detector is right on its 64 candidates (its full figures: its model card);
* ``photo-64.png``, ``photo-pgd8-64.png``: a 64x64 crop of a *held-out* photo and its one-step PhotoGuard
  version (L-inf 8/255, against ``demo/photo_vae``, the app's default step count) for the Detect tab, scored by the
  app's native-resolution photo detector: the first crop (in seed order) it gets right on both images.

    OMP_NUM_THREADS=1 python scripts/make_examples.py
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from apps.demo import CLASS_NAMES, load_victim
from apps.demo.data import generate, generate_uint8, to_uint8
from apps.services import detect_images, load_detector
from protect import testbed as tb

OUT = Path(__file__).resolve().parents[1] / "apps" / "examples"
SEED = 2026


def shapes() -> None:
    pixels, labels = generate_uint8(64, seed=SEED)
    for name, size in (("star", 32), ("checker", 128)):
        index = int((labels == CLASS_NAMES.index(name)).nonzero()[0][0])
        image = Image.fromarray(pixels[index])
        image.resize((size, size), Image.Resampling.NEAREST).save(OUT / f"{name}-{size}.png", optimize=True)


def photo_pair(n: int = 32) -> None:
    import numpy as np

    from apps.demo.photos import photo_uint8
    from apps.models import load_vae
    from apps.services import PROTECT_VAE
    from protect import protect

    detector = load_detector(device="cpu")
    vae = load_vae(PROTECT_VAE, "cpu")
    rng, arrays = np.random.default_rng(SEED), []
    for i in range(n):  # seeded 64 px crops of held-out photos (apps.demo.photos.HELD_OUT), cycling through three
        array = photo_uint8(("astronaut", "coffee", "china")[i % 3])
        top, left = (int(rng.integers(0, side - 64 + 1)) for side in array.shape[:2])
        arrays.append(np.ascontiguousarray(array[top : top + 64, left : left + 64]))
    clean01 = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    generators = [torch.Generator().manual_seed(SEED + i) for i in range(n)]
    protected, _ = protect(clean01, "photoguard", vae=vae, eps=8 / 255, steps=1, generator=generators)
    protected = (protected * 255).round() / 255  # PNG quantisation, still within the budget
    as_pil = lambda x: [Image.fromarray((p.permute(1, 2, 0).numpy() * 255).round().astype("uint8")) for p in x]
    clean_v = [r["verdict"] for r in detect_images(detector, as_pil(clean01))]
    adv_v = [r["verdict"] for r in detect_images(detector, as_pil(protected))]
    print(f"photo crops: {sum(v == 'adversarial' for v in adv_v)}/{n} protected and "
          f"{sum(v == 'adversarial' for v in clean_v)}/{n} clean flagged")  # fmt: skip
    for i in range(n):
        if clean_v[i] == "clean" and adv_v[i] == "adversarial":
            as_pil(clean01[i : i + 1])[0].save(OUT / "photo-64.png", optimize=True)
            as_pil(protected[i : i + 1])[0].save(OUT / "photo-pgd8-64.png", optimize=True)
            print(f"photo pair: crop {i} of seed {SEED}")
            return
    raise SystemExit("no suitable photo pair; try another SEED")


def adversarial_pair(n: int = 64) -> None:
    from apps.demo import DEMO_DIR
    from apps.models import load_score_model
    from protect import EPSDetector

    detector = EPSDetector.from_pretrained(DEMO_DIR / "eps_detector", *load_score_model("demo/unet_eps", "cpu"))
    size = detector.reference.shape[-1]
    images, labels = generate(n, torch.Generator().manual_seed(SEED), size=size)
    clean01 = torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).float() / 255  # as stored in a PNG
    victim = load_victim()
    adversarial01 = tb.attack("pgd", victim, clean01, labels, 8 / 255, steps=10, seed=0)
    adversarial01 = (adversarial01 * 255).round() / 255  # PNG quantisation, still within the budget
    with torch.no_grad():
        right = victim(clean01).argmax(1) == labels
        fooled = victim(adversarial01).argmax(1) != labels
    as_pil = lambda x: [Image.fromarray(p) for p in to_uint8(tb.to_signed(x))]
    clean_v = [detector.verdict(s) for s in detector.score(clean01, value_range=(0, 1))]
    adv_v = [detector.verdict(s) for s in detector.score(adversarial01, value_range=(0, 1))]
    flagged = [v == "adversarial" for v in adv_v]
    count = int(fooled.sum())
    print(f"PGD 8/255 fooled the classifier on {count}/{n}; the detector flags {sum(flagged)}/{n} adversarial")
    print(f"clean images flagged: {sum(v == 'adversarial' for v in clean_v)}/{n}")
    for i in range(n):
        if right[i] and fooled[i] and clean_v[i] == "clean" and flagged[i]:
            as_pil(clean01[i : i + 1])[0].save(OUT / "clean-16.png", optimize=True)
            as_pil(adversarial01[i : i + 1])[0].save(OUT / "pgd8-16.png", optimize=True)
            print(f"pair: image {i} ({CLASS_NAMES[labels[i]]}) of seed {SEED}")
            return
    raise SystemExit("no suitable pair; try another SEED")


if __name__ == "__main__":
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    shapes()
    adversarial_pair()
    photo_pair()
    for path in sorted(OUT.glob("*.png")):
        print(path.name, path.stat().st_size, "bytes")
