"""A small version of ``benchmarks/bench_load.py``: concurrent ``/detect`` calls against the app, none lost."""

from __future__ import annotations

from benchmarks.bench_load import percentile, run_load
from tests.test_app import detector_dir, server  # noqa: F401  (the app, started as tests/test_app.py starts it)


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 90), percentile(values, 99)) == (50.0, 90.0, 99.0)
    assert percentile([3.0], 99) == 3.0 and percentile([2.0, 1.0], 100) == 2.0


def test_concurrent_detect_calls_are_all_answered(server):  # noqa: F811
    result = run_load(server, calls=16, clients=4)
    assert result["lost"] == 0 and result["answered"] == 16, result["errors"]
    assert 0 < result["p50_s"] <= result["p90_s"] <= result["p99_s"] <= result["max_s"]
    assert len(result["score_dtypes"]) == 1 and result["score_dtypes"][0] in ("float32", "bfloat16", "float16")
