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


def test_loading_a_dit_logs_no_key_type_warning():
    """diffusers warns on every DiT load that id2label has string keys (JSON's only kind); the app filters it."""
    import logging

    import torch

    from apps.demo import DEMO_DIR
    from apps.services import load_pipeline, set_max_pipelines

    if not (DEMO_DIR / "dit").is_dir():
        pytest.skip("the demo DiT is not in demo_models/")

    class Records(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    logger, records = logging.getLogger("diffusers.pipelines.pipeline_utils"), Records()
    logger.addHandler(records)  # sees what passes the logger's filters
    try:
        set_max_pipelines(1)
        load_pipeline("demo/dit", "cpu", torch.float32)
        pipe = load_pipeline("demo/dit", "cpu", torch.float64)  # a fresh load: the cache holds one pipeline
    finally:
        logger.removeHandler(records)
        set_max_pipelines(4)
    assert pipe.labels["star"] == 5
    assert not [m for m in records.messages if m.startswith("Expected types for id2label")], records.messages
