"""apps/services.py without a server: the cache of generation pipelines is bounded."""

from __future__ import annotations

import pytest


def test_at_most_n_pipelines_stay_cached():
    import torch

    from apps.demo import DEMO_DIR
    from apps.services import cached_pipelines, load_pipeline, set_max_pipelines

    if not (DEMO_DIR / "dit").is_dir():
        pytest.skip("the demo DiT is not in demo_models/")
    try:
        set_max_pipelines(1)
        first = load_pipeline("demo/dit", "cpu", torch.float64)
        assert load_pipeline("demo/dit", "cpu", torch.float64) is first
        load_pipeline("demo/dit", "cpu")
        assert cached_pipelines() == [("demo/dit", "cpu", torch.float32)]
        with pytest.raises(ValueError, match="positive integer"):
            set_max_pipelines(0)
    finally:
        set_max_pipelines(4)
