"""Shared test settings and fixtures."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models: extra CPU threads cost more than they give (and other processes may share the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo():
    """The demo DiT pipeline, the demo classifier, 8 demo shape images in [0, 1] and their labels."""
    from apps.demo import generate, load_classifier, load_dit_pipeline

    images, labels = generate(8, torch.Generator().manual_seed(3_000_017))
    return load_dit_pipeline(), load_classifier(), (images + 1) / 2, labels
