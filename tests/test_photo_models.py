"""The committed photo demo models: listed in models.txt, loaded offline by their id, fully convolutional, and
(for the photo VAE) better than the bicubic baseline on a held-out photo at native resolution. A model that is
not committed yet is skipped with the reason."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.attention_processor import Attention

from apps.demo import DEMO_DIR
from apps.models import listed_models, resolve

pytest.importorskip("skimage")

PHOTO_MODELS = ("photo_vae", "photo_vae_b", "photo_unet", "photo_ldm")


def committed(name: str):
    if not (DEMO_DIR / name).is_dir():
        pytest.skip(f"photo demo model {name!r} is not committed yet (python -m apps.demo.train_photo)")
    return DEMO_DIR / name


@pytest.mark.parametrize("name", PHOTO_MODELS)
def test_committed_photo_models_are_listed_and_small(name):
    folder = committed(name)
    assert f"demo/{name}" in dict(listed_models())
    assert resolve(f"demo/{name}") == str(folder)
    weights = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
    assert 0 < weights < 6e6
    card = (folder / "README.md").read_text()
    assert "Held out, never trained on" in card and "astronaut" in card
    assert json.loads((folder / "training.json").read_text())["losses"]


@pytest.mark.parametrize("name", ["photo_vae", "photo_vae_b"])
def test_photo_vae_encodes_any_size_and_beats_bicubic_on_a_held_out_photo(name):
    from apps.demo.photos import photo
    from apps.demo.train_photo import bicubic_baseline, psnr, reconstruct

    committed(name)
    vae = AutoencoderKL.from_pretrained(resolve(f"demo/{name}"), use_safetensors=True, local_files_only=True).eval()
    assert not any(isinstance(m, Attention) for m in vae.modules())
    stride = 2 ** (len(vae.config.block_out_channels) - 1)
    with torch.no_grad():
        assert vae.encode(torch.zeros(1, 3, 8 * 7, 8 * 5)).latent_dist.mean.shape[-2:] == (56 // stride, 40 // stride)
    image = photo("astronaut")[:, 128:384, 128:384]  # a native-resolution 256 px crop of a held-out photo
    assert psnr(reconstruct(vae, image), image) > psnr(bicubic_baseline(image, stride), image)
