"""benchmarks/bench_aspl.py: protections fine-tuned on by two attackers, the learned share per protection."""

from __future__ import annotations

import json
import math

import pytest

from apps.demo import DEMO_DIR
from benchmarks import bench_aspl

pytestmark = pytest.mark.skipif(not (DEMO_DIR / "photo_ldm").is_dir(), reason="the photo LDM is not in demo_models/")


def test_rows_per_attacker_and_protection_with_the_clean_share_one(tmp_path, capsys):
    out = tmp_path / "aspl.json"
    argv = ["-n", "2", "--size", "32", "--steps", "2", "--attack-steps", "2", "--seeds", "2", "--samples", "1"]
    assert bench_aspl.main([*argv, "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    protections = ("clean", "random noise", "photoguard", "sds", "aspl")
    assert [(r["attacker"], r["protection"]) for r in record["rows"]] == [
        (a, p) for a in bench_aspl.ATTACKERS for p in protections
    ]
    for row in record["rows"]:
        assert all(math.isfinite(row[k]["mean"]) for k in ("clean_loss", "learned", "sdedit_psnr", "sample_psnr"))
        if row["protection"] == "clean":
            assert row["learned"] == {"mean": 1.0, "sd": 0.0, "per_seed": [1.0, 1.0]} and row["psnr"] == math.inf
        else:
            assert 28 < row["psnr"] < 60  # 8/255 at most: >= 30 dB but for rounding
    assert record["settings"]["crops"][0]["photo"] and record["untuned_clean_loss"] > 0
    assert "aspl / photoguard learned share" in capsys.readouterr().out
    assert all(len(row["per_seed"]) == 2 and len(row["learned"]["per_seed"]) == 2 for row in record["rows"])


def test_photoguard_at_aspls_psnr_is_added_on_request(tmp_path, capsys):
    out = tmp_path / "aspl.json"
    argv = ["-n", "2", "--size", "32", "--steps", "2", "--attack-steps", "1", "--seeds", "2", "--samples", "1"]
    assert bench_aspl.main([*argv, "--equal-psnr", "--json", str(out)]) == 0
    rows = {(r["attacker"], r["protection"]): r for r in json.loads(out.read_text())["rows"]}
    equal, aspl = rows[("full", "photoguard at ASPL's PSNR")], rows[("full", "aspl")]
    assert abs(equal["psnr"] - aspl["psnr"]) < abs(rows[("full", "photoguard")]["psnr"] - aspl["psnr"]) + 1e-6
    assert "aspl / photoguard at ASPL's PSNR learned share" in capsys.readouterr().out


def test_aspl_on_tiles_is_added_on_request(tmp_path, capsys):
    out = tmp_path / "aspl.json"
    argv = ["-n", "2", "--size", "64", "--steps", "2", "--attack-steps", "1", "--seeds", "2", "--samples", "1"]
    assert bench_aspl.main([*argv, "--aspl-tile", "32", "--json", str(out)]) == 0
    rows = {(r["attacker"], r["protection"]): r for r in json.loads(out.read_text())["rows"]}
    assert all((a, "aspl, 32 px tiles") in rows for a in bench_aspl.ATTACKERS)
    assert 28 < rows[("full", "aspl, 32 px tiles")]["psnr"] < 60
    printed = capsys.readouterr().out
    assert "aspl, 32 px tiles / aspl learned share" in printed and "aspl, 32 px tiles / photoguard" in printed


def test_aspl_on_each_crop_alone_is_added_on_request_and_only_keeps_the_named_protections(tmp_path, capsys):
    out = tmp_path / "aspl.json"
    argv = ["-n", "2", "--size", "64", "--steps", "2", "--attack-steps", "1", "--seeds", "2", "--samples", "1"]
    only = ["--only", "aspl, 32 px tiles", bench_aspl.PER_IMAGE]
    assert bench_aspl.main([*argv, "--aspl-tile", "32", "--per-image", *only, "--json", str(out)]) == 0
    rows = {(r["attacker"], r["protection"]): r for r in json.loads(out.read_text())["rows"]}
    assert sorted(rows) == sorted(
        (a, p) for a in bench_aspl.ATTACKERS for p in ("clean", "aspl, 32 px tiles", bench_aspl.PER_IMAGE)
    )
    assert 28 < rows[("lora", bench_aspl.PER_IMAGE)]["psnr"] < 60
    assert f"{bench_aspl.PER_IMAGE} / aspl, 32 px tiles learned share" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_aspl.main([*argv, "--only", "nothing of that name"])
