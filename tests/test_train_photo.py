"""The photo training script: every model runs on a two-step budget and loads back; a checkpointed run that is
interrupted and resumed ends with the same weights as an uninterrupted one; ``--export`` saves a checkpoint's EMA
weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.models.attention_processor import Attention

from apps.demo import train_photo
from apps.demo.photos import HELD_OUT

pytest.importorskip("skimage")
pytest.importorskip("sklearn")

TINY = ["--steps", "2", "--batch-size", "2", "--threads", "1", "--device", "cpu"]
CROPS = {"vae": "32", "vae_b": "32", "unet": "16", "ldm": "32"}


def run(model: str, out: Path, *extra: str) -> Path:
    return train_photo.main([model, "--out", str(out), *TINY, "--crop", CROPS[model], *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("photo_models")
    for model in train_photo.MODELS:
        run(model, out, "--checkpoints", str(out / "ck"))
    return out


def state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (path,) = folder.glob("*.safetensors")
    return load_file(path)


@pytest.mark.slow
@pytest.mark.parametrize("model", train_photo.MODELS)
def test_tiny_run_writes_a_loadable_model_card_and_log(trained: Path, model: str):
    folder = trained / f"photo_{model}"
    card = (folder / "README.md").read_text()
    assert "| steps | 2 |" in card and "final loss" in card
    assert all(name in card for name in HELD_OUT) and "never trained on" in card
    record = json.loads((folder / "training.json").read_text())
    assert len(record["losses"]) == 2 and all(np.isfinite(record["losses"]))
    assert (trained / "ck" / f"photo_{model}.pt").is_file()
    if model in ("vae", "vae_b"):
        vae = AutoencoderKL.from_pretrained(folder, use_safetensors=True, local_files_only=True).eval()
        assert not any(isinstance(m, Attention) for m in vae.modules())  # fully convolutional
        stride = 8 if model == "vae" else 4
        with torch.no_grad():
            latent = vae.encode(torch.zeros(1, 3, 40, 24)).latent_dist.mean
        assert latent.shape == (1, 4, 40 // stride, 24 // stride)
        for name in HELD_OUT:
            assert np.isfinite(record["metrics"][f"heldout_{name}_psnr_db"])
            assert np.isfinite(record["metrics"][f"heldout_{name}_bicubic_psnr_db"])
        assert 0 < vae.config.scaling_factor < 100
    elif model == "unet":
        pipe = DDPMPipeline.from_pretrained(folder, use_safetensors=True, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
        assert np.asarray(images[0]).shape == (16, 16, 3)
        assert pipe.scheduler.config.num_train_timesteps == 1000
    else:
        unet = UNet2DModel.from_pretrained(folder / "unet", use_safetensors=True, local_files_only=True)
        scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
        info = json.loads((folder / "latent_vae.json").read_text())
        assert info["vae"] == "demo/photo_vae" and info["stride"] == 8
        assert unet.config.in_channels == 4 and unet.config.sample_size == 4 and scheduler.config.num_train_timesteps
        assert info["scaling_factor"] == pytest.approx(
            AutoencoderKL.from_pretrained(trained / "photo_vae").config.scaling_factor
        )


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_weights(tmp_path: Path, monkeypatch):
    flags = ["--steps", "4", "--checkpoint-every", "2"]
    run("vae", tmp_path / "straight", *flags, "--checkpoints", str(tmp_path / "ck_straight"))

    calls = {"n": 0}
    original = train_photo.vae_loss

    def crash_at_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption after the step-2 checkpoint")
        return original(*args, **kwargs)

    monkeypatch.setattr(train_photo, "vae_loss", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run("vae", tmp_path / "resumed", *flags, "--checkpoints", str(tmp_path / "ck"))
    saved = torch.load(tmp_path / "ck" / "photo_vae.pt", weights_only=True)
    assert saved["step"] == 2
    monkeypatch.setattr(train_photo, "vae_loss", original)
    run("vae", tmp_path / "resumed", *flags, "--checkpoints", str(tmp_path / "ck"))

    straight, resumed = state(tmp_path / "straight" / "photo_vae"), state(tmp_path / "resumed" / "photo_vae")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6)
    losses = json.loads((tmp_path / "resumed" / "photo_vae" / "training.json").read_text())["losses"]
    assert len(losses) == 4

    # --export saves the EMA weights of the checkpoint: the same as the finished run's
    run("vae", tmp_path / "exported", *flags, "--checkpoints", str(tmp_path / "ck"), "--export")
    exported = state(tmp_path / "exported" / "photo_vae")
    for key in straight:
        torch.testing.assert_close(exported[key], straight[key], rtol=0, atol=1e-6)
    assert (
        "EMA weights of a checkpoint of an unfinished run"
        in (tmp_path / "exported" / "photo_vae" / "README.md").read_text()
    )
    run("vae", tmp_path / "raw", *flags, "--checkpoints", str(tmp_path / "ck"), "--export", "--export-weights", "raw")
    saved_model = torch.load(tmp_path / "ck" / "photo_vae.pt", weights_only=True)["model"]
    raw = state(tmp_path / "raw" / "photo_vae")
    for key in raw:
        torch.testing.assert_close(raw[key], saved_model[key], rtol=0, atol=0)
    assert any(not torch.equal(raw[key], straight[key]) for key in raw)


@pytest.mark.parametrize("model", ["vae", "unet"])
def test_warm_start_continues_an_exported_run(tmp_path: Path, model: str):
    """An exported 2-step run carries on to 4 steps (a committed demo model can be trained further next session)."""
    run(model, tmp_path / "first")
    exported = tmp_path / "first" / f"photo_{model}"
    first = json.loads((exported / "training.json").read_text())
    train_photo.main([model, "--out", str(tmp_path / "more"), *TINY, "--crop", CROPS[model], "--steps", "4",
                      "--warm-start", str(exported)])  # fmt: skip
    more = tmp_path / "more" / f"photo_{model}"
    record = json.loads((more / "training.json").read_text())
    assert record["steps"] == 4 and len(record["losses"]) == 4
    assert record["losses"][:2] == first["losses"] and record["warm_start"] == str(exported)
    assert "continued from the exported" in (more / "README.md").read_text()
    sub = train_photo.WEIGHTS_FILE[model]
    before, after = state(exported / sub), state(more / sub)
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)

    with pytest.raises(ValueError, match="already ran 2 steps"):
        run(model, tmp_path / "again", "--warm-start", str(exported))
    other = "vae_b" if model == "vae" else "vae"
    with pytest.raises(ValueError, match=f"not photo_{other}"):
        run(other, tmp_path / "other", "--steps", "4", "--warm-start", str(exported))
    with pytest.raises(FileNotFoundError, match="not an exported"):
        run(model, tmp_path / "none", "--steps", "4", "--warm-start", str(tmp_path))


def test_export_without_a_checkpoint_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="--export needs --checkpoints"):
        run("vae", tmp_path, "--export")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run("vae", tmp_path, "--export", "--checkpoints", str(tmp_path / "none"))


def test_bad_arguments_are_refused(tmp_path: Path):
    with pytest.raises(SystemExit):
        train_photo.parse_args(["vae", "--out", str(tmp_path), "--steps", "0"])
    run("vae", tmp_path)
    with pytest.raises(ValueError, match="multiple of the VAE stride"):
        train_photo.main(["ldm", "--out", str(tmp_path), *TINY, "--crop", "36"])


def test_reconstruct_at_native_resolution_and_in_tiles():
    vae = train_photo.seeded(0, train_photo.make_photo_vae).eval()
    image = torch.rand(3, 45, 70) * 2 - 1
    whole = train_photo.reconstruct(vae, image)
    tiled = train_photo.reconstruct(vae, image, tile=32)
    assert whole.shape == tiled.shape == image.shape
    assert torch.isfinite(tiled).all()
    assert train_photo.psnr(image, image) == pytest.approx(10 * np.log10(4 / 1e-12))
    baseline = train_photo.bicubic_baseline(image, 8)
    assert baseline.shape == image.shape and train_photo.psnr(baseline, image) < 30


def test_the_cli_runs_the_photo_trainer(tmp_path: Path):
    from apps.cli import main as cli_main

    argv = ["train", "photo", "vae_b", "--out", str(tmp_path), *TINY, "--crop", "16"]
    assert cli_main(argv) == 0
    assert (tmp_path / "photo_vae_b" / "config.json").is_file()
