"""benchmarks/bench_pgd_steps.py: the step sweep runs end to end on tiny models, tunes on the training photos only
and recommends the fewest steps that reach the share of the most steps' worst case."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_pgd_steps
from tests.factories import tiny_latent_unet, tiny_vae

pytest.importorskip("skimage")


def test_crops_come_from_the_training_photos_at_native_resolution():
    from apps.demo.photos import HELD_OUT, PhotoStream

    stream = PhotoStream(48, seed=3, max_scale=1, augment=False, split="train")
    stream.sample(6)
    assert all(c.source not in HELD_OUT and c.side == 48 for c in stream.last_crops)
    crops = bench_pgd_steps.training_crops(6, 48, 3)
    assert crops.shape == (6, 3, 48, 48) and 0 <= crops.min() and crops.max() <= 1


def test_step_sweep_writes_rows_and_a_recommendation(tmp_path, capsys):
    from diffusers import DDPMScheduler

    vae_dir, ldm_dir = tmp_path / "vae", tmp_path / "ldm"
    tiny_vae().save_pretrained(vae_dir)
    tiny_latent_unet().save_pretrained(ldm_dir)
    DDPMScheduler(num_train_timesteps=100).save_pretrained(ldm_dir)
    out = tmp_path / "steps.json"
    argv = ["--vae", str(vae_dir), "--ldm", str(ldm_dir), "--steps", "2", "1", "-n", "2", "--size", "24"]
    assert bench_pgd_steps.main([*argv, "--tile", "16", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert [(r["method"], r["steps"]) for r in record["rows"]] == [
        ("photoguard", 1),
        ("photoguard", 2),
        ("mist", 1),
        ("mist", 2),
    ]
    for method, best in record["recommended"].items():
        assert best["steps"] in (1, 2) and best["share_of_most_steps"] >= 0.9, method
    assert all(0 < r["sdedit_psnr_to_clean"] < 100 for r in record["rows"])  # the mimicry through the latent model
    assert 0 < record["random_noise_sdedit_psnr_to_clean"] < 100
    assert "training photos" in record["data"] and "x its speed" in capsys.readouterr().out


def test_mist_without_a_latent_model_is_refused_not_dropped(tmp_path, capsys):
    vae_dir = tmp_path / "vae"
    tiny_vae().save_pretrained(vae_dir)
    with pytest.raises(SystemExit) as exit_info:
        bench_pgd_steps.main(["--vae", str(vae_dir), "--methods", "photoguard", "mist", "--steps", "1"])
    assert exit_info.value.code == 2 and "mist needs" in capsys.readouterr().err
