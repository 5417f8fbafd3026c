"""benchmarks/bench_protect.py: every method's seconds per image and its ratio to the amortized protector, on the
photo family, at the sizes asked (a tiny run, so it cannot rot)."""

from __future__ import annotations

import json

import pytest

from apps.demo import DEMO_DIR
from benchmarks import bench_protect

pytest.importorskip("skimage")


@pytest.mark.skipif(
    not all((DEMO_DIR / name).is_dir() for name in ("photo_vae", "photo_ldm", "photo_protector")),
    reason="the photo demo models are not in demo_models/",
)
def test_bench_protect_times_every_method_at_each_size(tmp_path):
    out = tmp_path / "protect.json"
    argv = ["--sizes", "64", "96", "--steps", "4", "--measured-steps", "1", "--estimate", "--json", str(out)]
    rows = bench_protect.main(argv)
    assert [(r["size"], r["method"].split(" (")[0]) for r in rows] == [
        (size, method) for size in (64, 96) for method in ("amortized", "photoguard", "mist", "sds", "aspl")
    ]
    assert all(r["seconds"] > 0 and r["ratio"] > 0 and r["estimate"] > 0 for r in rows)
    aspl = [r for r in rows if r["method"].startswith("aspl")]
    pgd = [r for r in rows if "PGD" in r["method"] and r not in aspl]
    assert all(r["how"] == "1 and 2 steps measured, extrapolated" for r in pgd)
    assert all(
        r["method"] == "aspl (60 PGD steps)" and r["how"] == "6 and 12 steps measured, extrapolated" for r in aspl
    )
    assert json.loads(out.read_text())["rows"][0]["encoder"] == "demo/photo_vae"
