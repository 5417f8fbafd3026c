"""The GPU benchmark script's dry run: every section runs its real code path at tiny sizes on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_dry_run_runs_every_section_on_the_cpu(tmp_path):
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-3000:]
    (report_file,) = tmp_path.glob("gpu-*-dry.json")
    report = json.loads(report_file.read_text())
    assert report["dry_run"] and report["device"] == "cpu"
    from benchmarks.gpu import SECTIONS

    assert list(report["sections"]) == list(SECTIONS)
    failed = {name: s.get("error") for name, s in report["sections"].items() if s["status"] != "ok"}
    assert not failed, failed
    for name, section in report["sections"].items():
        assert section["rows"], name
    sdxl = {row["setting"]: row for row in report["sections"]["sdxl"]["rows"]}
    assert sdxl["pipeline CFG (peer)"]["ratio"] == 1.0 and sdxl["guide APG x0"]["median_s"] > 0
    protect = {row["setting"] for row in report["sections"]["protect"]["rows"]}
    assert {"ASPL, one round, every weight", "ASPL, one round, LoRA rank 8"} <= protect
    eps = report["sections"]["eps"]["rows"]
    assert all(row["max_abs_difference"] < 1e-3 for row in eps)  # batched and per-level EPS agree
    markdown = next(tmp_path.glob("gpu-*-dry.md")).read_text()
    assert "### sdxl (ok" in markdown and "### app (ok" in markdown
    print(f"dry run: {seconds:.0f} s")  # its time on a quiet machine is in benchmarks/RESULTS.md, not asserted here
