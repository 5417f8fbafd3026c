"""protect.survival: the per-image survival report matches a direct measurement of the latent distortions."""

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from protect import protect
from protect.losses import latent
from protect.purify import jpeg, noisy_upscale, sign_noise
from protect.survival import MARGIN, describe, latent_distortion, report

DEMO = Path(__file__).resolve().parents[1] / "demo_models"


@pytest.fixture(scope="module")
def vae():
    return AutoencoderKL.from_pretrained(DEMO / "vae").eval()


@pytest.fixture(scope="module")
def images(vae):
    small = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    clean = 0.2 + 0.6 * torch.nn.functional.interpolate(small, size=(32, 32), mode="bilinear")
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    protected, _ = protect(clean, "photoguard", vae=vae, eps=8 / 255, steps=5, generator=gens)
    return clean, protected


def distortion(vae, reference, x):
    """By hand: ||E(x) - E(reference)|| / ||E(reference)|| per image."""
    with torch.no_grad():
        zr, zx = latent(vae, reference).double(), latent(vae, x).double()
    return ((zx - zr).flatten(1).norm(dim=1) / zr.flatten(1).norm(dim=1)).tolist()


def test_the_report_matches_a_direct_measurement(vae, images):
    clean, protected = images
    entries = report(vae, clean, protected, seed=5)
    eps = (protected - clean).abs().flatten(1).amax(1)
    noise = torch.cat([sign_noise(clean[i : i + 1], eps[i].item(), 5 + i) for i in range(2)])
    d0, n0 = distortion(vae, clean, protected), distortion(vae, clean, noise)
    by_hand = {
        "jpeg75": lambda x: jpeg(x, quality=75),
        "noisy_upscale": lambda x: noisy_upscale(x, std=0.05),
    }
    for i, entry in enumerate(entries):
        assert entry["eps_255"] == pytest.approx(eps[i].item() * 255) and entry["eps_255"] <= 8 + 1e-4
        assert entry["latent_distortion"] == pytest.approx(d0[i], rel=1e-5)
        assert entry["noise_latent_distortion"] == pytest.approx(n0[i], rel=1e-5)
        verdicts = []
        for name, purify in by_hand.items():
            measured = entry["purifications"][name]
            d = distortion(vae, purify(clean), purify(protected))[i]
            n = distortion(vae, purify(clean), purify(noise))[i]
            assert measured["latent_distortion"] == pytest.approx(d, rel=1e-5)
            assert measured["noise_latent_distortion"] == pytest.approx(n, rel=1e-5)
            assert measured["kept"] == pytest.approx(d / d0[i], rel=1e-5)
            assert measured["vs_noise"] == pytest.approx(d / n, rel=1e-5)
            assert measured["verdict"] == ("survives" if d >= MARGIN * n else "does not survive")
            verdicts.append(measured["verdict"])
        assert entry["verdict"] == ("survives" if set(verdicts) == {"survives"} else "does not survive")
        assert "2x" in entry["rule"] and entry["verdict"] in describe(entry) and "jpeg75" in describe(entry)
    assert entries[0]["latent_distortion"] > 2 * entries[0]["noise_latent_distortion"]  # PGD beats noise unpurified


def test_the_rule_follows_the_margin_and_random_noise_does_not_survive(vae, images):
    clean, protected = images
    strict = report(vae, clean, protected, margin=1e6)
    assert all(e["verdict"] == "does not survive" for e in strict)
    lenient = report(vae, clean, protected, margin=1e-6)
    assert all(e["verdict"] == "survives" for e in lenient)
    noise = sign_noise(clean, 8 / 255, seed=1)  # noise is its own baseline: about 1x noise, never 2x
    assert all(e["verdict"] == "does not survive" for e in report(vae, clean, noise, seed=1))
    unchanged = report(vae, clean, clean.clone(), margin=1e-6)  # nothing to survive: 0 is not >= 0 x noise here
    assert all(e["verdict"] == "does not survive" for e in unchanged)


def test_tiles_measure_over_the_crops(vae, images):
    clean, protected = images
    tiled = latent_distortion(vae, clean, protected, tile=16)
    crops = lambda x: torch.cat([x[..., y : y + 16, z : z + 16] for y in (0, 16) for z in (0, 16)])
    with torch.no_grad():
        zr = latent(vae, crops(clean)).double().reshape(4, 2, -1).transpose(0, 1).flatten(1)
        zp = latent(vae, crops(protected)).double().reshape(4, 2, -1).transpose(0, 1).flatten(1)
    assert torch.allclose(tiled, (zp - zr).norm(dim=1) / zr.norm(dim=1), rtol=1e-6)
    entries = report(vae, clean, protected, tile=16)
    assert entries[0]["latent_distortion"] == pytest.approx(tiled[0].item(), rel=1e-6)


def test_bad_input_is_refused(vae, images):
    clean, protected = images
    with pytest.raises(ValueError, match="differ in shape"):
        report(vae, clean, protected[:1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        report(vae, clean, protected * 2)
    with pytest.raises(ValueError, match="margin"):
        report(vae, clean, protected, margin=0)
