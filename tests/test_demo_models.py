"""The embedded demo models: the data generator, the committed weights, and the training CLI.

Committed models are loaded offline with their diffusers classes and must generate
at their documented size; a test skips (with the reason) when that model's folder
is absent. The training CLI runs end to end, every model, on a two-step budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMPipeline, DiTPipeline

from apps import demo
from apps.demo.classifier import ShapeClassifier, load_classifier
from apps.demo.data import CLASS_NAMES, generate, generate_uint8

REPO = Path(__file__).resolve().parents[1]
MODELS = ("classifier", "vae", "dit", "unet", "vae_b")


def committed(name: str) -> Path:
    """The committed folder of demo model ``name``, or skip the test when it is absent."""
    path = demo.DEMO_DIR / name
    if not path.is_dir():
        pytest.skip(f"demo model {name!r} is not committed at {path} (train it with `python -m apps.demo.train`)")
    return path


# ----------------------------------------------------------------------------- data


def test_data_is_deterministic_and_in_range():
    a, labels_a = generate_uint8(64, seed=3)
    b, labels_b = generate_uint8(64, seed=3)
    c, _ = generate_uint8(64, seed=4)
    assert a.shape == (64, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and np.array_equal(labels_a, labels_b)
    assert not np.array_equal(a, c)


def test_data_float_tensors_and_requested_labels():
    labels = torch.arange(len(CLASS_NAMES)).repeat(3)
    images, out_labels = generate(len(labels), torch.Generator().manual_seed(0), size=16, labels=labels)
    assert images.shape == (30, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert torch.equal(out_labels, labels)
    assert len(set(CLASS_NAMES)) == 10


# ----------------------------------------------------------------------------- committed models


def assert_safetensors_only(path: Path) -> None:
    assert list(path.rglob("*.safetensors")), f"no safetensors under {path}"
    assert not list(path.rglob("*.bin")), f"pickled weights under {path}"
    assert (path / "README.md").is_file(), f"no model card in {path}"


def test_committed_classifier_loads_and_classifies():
    path = committed("classifier")
    assert_safetensors_only(path)
    model = demo.load_classifier()
    images, labels = generate(100, torch.Generator().manual_seed(123), labels=torch.arange(100) % 10)
    with torch.no_grad():
        logits, features = model(images), model.features(images)
    assert logits.shape == (100, 10) and features.shape == (100, model.config.block_out_channels[-1])
    assert (logits.argmax(1) == labels).float().mean() > 0.9


def test_committed_vae_round_trip():
    path = committed("vae")
    assert_safetensors_only(path)
    vae = demo.load_vae()
    assert isinstance(vae, AutoencoderKL)
    assert vae.config.scaling_factor != AutoencoderKL().config.scaling_factor, "scaling_factor was not calibrated"
    images, _ = generate(4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mode()
        recon = vae.decode(latents).sample
    assert latents.shape == (4, 4, 16, 16) and recon.shape == images.shape
    assert (recon - images).abs().mean() < 0.2


def test_committed_second_vae_round_trip():
    path = committed("vae_b")
    assert_safetensors_only(path)
    vae = AutoencoderKL.from_pretrained(path, use_safetensors=True, local_files_only=True).eval()
    images, _ = generate(4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mode()
        recon = vae.decode(latents).sample
    assert latents.shape == (4, 4, 8, 8) and recon.shape == images.shape
    assert (recon - images).abs().mean() < 0.3  # a lossier stride-4 autoencoder (recon PSNR 17 dB)


def test_committed_dit_generates_requested_classes():
    path = committed("dit")
    assert_safetensors_only(path)
    pipe = demo.load_dit_pipeline(dtype=torch.float32)
    assert isinstance(pipe, DiTPipeline)
    assert set(pipe.labels) == set(CLASS_NAMES)
    pipe.set_progress_bar_config(disable=True)
    ids = pipe.get_label_ids(["star", "ring"])
    out = pipe(
        ids, guidance_scale=4.0, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert out.shape == (2, 32, 32, 3) and np.isfinite(out).all()


def test_committed_unet_generates_at_its_size():
    path = committed("unet")
    assert_safetensors_only(path)
    pipe = demo.load_ddpm_pipeline()
    assert isinstance(pipe, DDPMPipeline)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size
    out = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (2, size, size, 3) and np.isfinite(out).all()


def test_missing_demo_model_has_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "DEMO_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"python -m apps\.demo\.train"):
        demo.model_path("dit")


# ----------------------------------------------------------------------------- training CLI


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Run the training CLI for every model on a two-step budget (one thread, a subprocess)."""
    out = tmp_path_factory.mktemp("demo_models")
    flags = "--steps 2 --batch-size 4 --threads 1 --device cpu".split()
    command = [sys.executable, "-m", "apps.demo.train", "all", "--out", str(out), *flags]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_dit_architecture_options_reach_the_saved_model_and_its_card(tmp_path):
    from apps.demo import train

    argv = ["dit", "--out", str(tmp_path), "--vae", str(committed("vae")), "--steps", "2", "--batch-size", "4"]
    train.main([*argv, "--dit-layers", "2", "--dit-width", "64"])
    config = json.loads((tmp_path / "dit" / "transformer" / "config.json").read_text())
    assert (config["num_layers"], config["num_attention_heads"], config["attention_head_dim"]) == (2, 2, 32)
    card = (tmp_path / "dit" / "README.md").read_text()
    assert "(2 layers, width 64, 2 heads, patch 2)" in card and "--dit-layers 2 --dit-width 64" in card
    for bad in (["--dit-width", "100"], ["--dit-layers", "0"], ["--dit-width", "0"]):
        with pytest.raises(SystemExit):
            train.parse_args([*argv, *bad])


def test_min_snr_weighting_matches_its_formula():
    from apps.demo.train import diffusion_loss, training_scheduler

    scheduler = training_scheduler()
    clean = torch.randn(64, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    seen = []

    def zero_model(noisy, t):  # predicts eps = 0: the loss is each sample's mean squared noise
        seen.append((noisy, t))
        return torch.zeros_like(noisy)

    plain = diffusion_loss(zero_model, clean, scheduler, torch.Generator().manual_seed(1))
    weighted = diffusion_loss(zero_model, clean, scheduler, torch.Generator().manual_seed(1), snr_gamma=5.0)
    (noisy, t), (noisy_again, _) = seen
    torch.testing.assert_close(noisy, noisy_again)  # the same draws
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noise = (noisy - abar.sqrt() * clean) / (1 - abar).sqrt()
    per_sample = noise.square().flatten(1).mean(1)
    snr = (abar / (1 - abar)).flatten()
    torch.testing.assert_close(plain, per_sample.mean(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weighted, (per_sample * snr.clamp(max=5.0) / snr).mean(), rtol=1e-4, atol=1e-5)
    assert (snr > 5).any() and (snr < 5).any() and weighted < plain  # low-noise samples weigh less
    with pytest.raises(SystemExit):
        from apps.demo import train

        train.parse_args(["dit", "--out", "x", "--snr-gamma", "0"])


@pytest.mark.slow
def test_dit_training_can_start_from_an_exported_dit_of_the_same_architecture(tmp_path):
    from safetensors.torch import load_file

    from apps.demo import train

    argv = ["dit", "--out", str(tmp_path), "--vae", str(committed("vae")), "--steps", "1", "--batch-size", "2"]
    train.main([*argv, "--init", str(committed("dit")), "--lr", "1e-12"])
    weights = "transformer/diffusion_pytorch_model.safetensors"
    start, out = load_file(committed("dit") / weights), load_file(tmp_path / "dit" / weights)
    assert all(torch.allclose(start[k], out[k], atol=1e-6) for k in start)  # one step at lr 1e-12: the start
    with pytest.raises(SystemExit, match="another architecture"):
        train.main([*argv, "--init", str(committed("dit")), "--dit-layers", "2"])
    with pytest.raises(SystemExit, match="not a DiTPipeline"):
        train.main([*argv, "--init", str(tmp_path / "nothing")])


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_training_cli_writes_a_loadable_model_and_card(trained: Path, name: str):
    folder = trained / name
    assert_safetensors_only(folder)
    card = (folder / "README.md").read_text()
    assert "| steps | 2 |" in card and "final loss" in card
    record = json.loads((folder / "training.json").read_text())
    assert len(record["losses"]) == 2 and all(np.isfinite(record["losses"]))
    generator = torch.Generator().manual_seed(0)
    if name == "classifier":
        model = load_classifier(folder)
        assert isinstance(model, ShapeClassifier)
        assert model(generate(2, generator)[0]).shape == (2, 10)
    elif name in ("vae", "vae_b"):
        vae = AutoencoderKL.from_pretrained(folder, use_safetensors=True, local_files_only=True)
        side = 16 if name == "vae" else 8  # vae_b has stride 4
        assert vae.decode(torch.zeros(1, 4, side, side)).sample.shape == (1, 3, 32, 32)
    elif name == "dit":
        pipe = DiTPipeline.from_pretrained(folder, use_safetensors=True, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        out = pipe([0, 9], num_inference_steps=2, generator=generator, output_type="np").images
        assert out.shape == (2, 32, 32, 3)
    else:
        pipe = DDPMPipeline.from_pretrained(folder, use_safetensors=True, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        assert pipe(batch_size=1, num_inference_steps=2, generator=generator, output_type="np").images.shape == (
            1,
            32,
            32,
            3,
        )
