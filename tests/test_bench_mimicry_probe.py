"""benchmarks/bench_mimicry_probe.py: the tuning probe runs end to end on tiny models (amortized protectors and
PhotoGuard side by side), on training-photo crops, and separates the carried-over perturbation from the excess."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_mimicry_probe
from protect import AmortizedProtector
from tests.factories import tiny_latent_unet, tiny_vae

pytest.importorskip("skimage")


def test_probe_writes_one_row_per_protection(tmp_path, capsys):
    from diffusers import DDPMScheduler

    vae_dir, ldm_dir, protector_dir = tmp_path / "vae", tmp_path / "ldm", tmp_path / "protector"
    tiny_vae().save_pretrained(vae_dir)
    tiny_latent_unet().save_pretrained(ldm_dir)
    DDPMScheduler(num_train_timesteps=100).save_pretrained(ldm_dir)
    torch.manual_seed(0)
    AmortizedProtector(num_experts=2, patch_size=8, hidden=4, generator_channels=4).save_pretrained(protector_dir)
    out = tmp_path / "probe.json"
    argv = ["--vae", str(vae_dir), "--ldm", str(ldm_dir), "--protector", str(protector_dir), "--pgd-steps", "1"]
    assert bench_mimicry_probe.main([*argv, "-n", "2", "--size", "24", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["protection"] for r in rows] == [f"amortized-full {protector_dir}", "photoguard@1"]
    for row in rows:
        assert 0 <= row["carried_share"] <= 1 and row["excess_psnr"] >= row["edit_psnr"] - 1e-6
        assert 20 < row["psnr"] < 60 and row["impress_edit_psnr"] > 0
    assert "| photoguard@1 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_mimicry_probe.main(["--vae", str(vae_dir), "--ldm", str(ldm_dir)])
