"""benchmarks/per_class_dit.py: per-class confusion counts of the demo DiT's samples and of real shapes."""

from __future__ import annotations

import json

import pytest

from apps.demo import CLASS_NAMES, DEMO_DIR
from benchmarks import per_class_dit

pytestmark = pytest.mark.skipif(not (DEMO_DIR / "dit").is_dir(), reason="the demo DiT is not in demo_models/")


def test_confusion_counts_every_requested_sample_once(tmp_path, capsys):
    out = tmp_path / "pc.json"
    argv = ["--per-class", "1", "--seeds", "2", "--steps", "2", "--cfg", "2", "--real", "30", "--json", str(out)]
    record = per_class_dit.main(argv)
    k = len(CLASS_NAMES)
    assert list(record["confusion"]) == ["real shapes (ceiling)", "no guidance", "CFG 2"]
    for name, counts in record["confusion"].items():
        assert len(counts) == k and all(len(row) == k for row in counts)
        total = 30 if name.startswith("real") else 2 * k  # 2 seeds x 1 sample per class
        assert sum(map(sum, counts)) == total
    guided = record["confusion"]["CFG 2"]
    assert all(sum(row) == 2 for row in guided)  # each class requested once per seed
    assert json.loads(out.read_text())["classes"] == list(CLASS_NAMES)
    assert "weakest class" in capsys.readouterr().out
