"""benchmarks/bench_survival_grid.py: the survival ratios on the PGD grid, a shifted grid and the whole image."""

from __future__ import annotations

import json

import pytest

from apps.demo import DEMO_DIR
from benchmarks import bench_survival_grid
from tests.factories import tiny_vae

pytestmark = pytest.mark.skipif(
    not (DEMO_DIR / "photo_protector").is_dir(), reason="the photo protector is not in demo_models/"
)


@pytest.mark.filterwarnings("ignore:this amortized protector was trained against")
def test_three_grids_per_protection_with_positive_ratios(tmp_path, capsys):
    vae_dir = tmp_path / "vae"
    tiny_vae().save_pretrained(vae_dir)
    out = tmp_path / "grid.json"
    argv = ["--vae", str(vae_dir), "-n", "2", "--size", "48", "--tile", "16", "--json", str(out)]
    assert bench_survival_grid.main(argv) == 0
    record = json.loads(out.read_text())
    assert [(r["protection"], r["grid"]) for r in record["rows"]] == [
        (name, grid)
        for name in ("photoguard@1", "amortized")
        for grid in ("pgd grid", "shifted half a tile", "whole image")
    ]
    for row in record["rows"]:
        assert set(row) == {"protection", "grid", "none", "jpeg75", "noisy_upscale"}
        assert all(len(row[k]) == 2 and all(v > 0 for v in row[k]) for k in ("none", "jpeg75", "noisy_upscale"))
    assert "PGD grid / whole image vs-noise ratio" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_survival_grid.main(["--size", "100", "--tile", "64"])
