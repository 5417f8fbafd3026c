"""The Generate tab's options on the demo DiT: SoftPAG, the sampler choice (restored even on error), the model
picker offering hub models only when allowed, and the API staying compatible with 13-argument calls."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from apps.demo import DEMO_DIR
from apps.generate import SOFTPAG_STRENGTH, Request, generate, samplers_for, softpag_heads
from guidance import SoftPAG
from tests.test_app import detector_dir, server  # noqa: F401  (the app, started as tests/test_app.py starts it)

pytestmark = pytest.mark.skipif(not (DEMO_DIR / "dit").is_dir(), reason="the demo DiT is not in demo_models/")


@pytest.fixture(scope="module")
def pipe():
    from apps.services import load_pipeline

    return load_pipeline("demo/dit", "cpu")


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image, np.int16) for image in images])


def test_softpag_uses_every_head_of_pags_default_layer(pipe):
    heads = softpag_heads(pipe)
    config = pipe.transformer.config  # every head of the middle block (PAG's default layer)
    middle = f"transformer_blocks.{config.num_layers // 2}.attn1"
    assert heads == tuple((middle, h) for h in range(config.num_attention_heads))
    request = Request("star", perturbation="softpag", perturbation_scale=2)
    with pytest.raises(ValueError, match="needs the pipeline"):
        request.guidance()
    _apg, softpag = request.guidance(pipe)
    assert isinstance(softpag, SoftPAG) and softpag.heads == heads and softpag.strength == SOFTPAG_STRENGTH
    with pytest.raises(ValueError, match="scale"):
        Request("star", perturbation="softpag", perturbation_scale=float("nan"))
    plain = generate(pipe, Request("star", steps=4, num_images=1, perturbation="none"))
    soft = generate(pipe, Request("star", steps=4, num_images=1, perturbation="softpag"))
    assert np.abs(_pixels(plain) - _pixels(soft)).max() > 0


def test_samplers_are_swapped_for_the_call_and_restored(pipe, monkeypatch):
    assert samplers_for(pipe)[:3] == ["default", "ddim", "dpm++"]
    assert "euler" not in samplers_for(pipe)  # DiTPipeline does not scale the noise for sigma samplers
    with pytest.raises(ValueError, match="sampler must be one of"):
        Request("star", sampler="heun")
    original = pipe.scheduler
    request = Request("star", method="cfg", scale=3, steps=4, num_images=1, sampler="dpm++")
    first, again = generate(pipe, request), generate(pipe, request)
    default = generate(pipe, Request("star", method="cfg", scale=3, steps=4, num_images=1))
    assert pipe.scheduler is original
    assert np.array_equal(_pixels(first), _pixels(again))  # same seed, same sampler: same image
    assert not np.array_equal(_pixels(first), _pixels(default))
    with pytest.raises(ValueError, match="DiTPipeline"):
        generate(pipe, Request("star", steps=2, num_images=1, sampler="euler"))

    def fail(*args, **kwargs):
        raise RuntimeError("denoiser failed")

    monkeypatch.setattr(pipe.transformer, "forward", fail)
    with pytest.raises(RuntimeError, match="denoiser failed"):
        generate(pipe, Request("star", method="none", steps=2, num_images=1, sampler="unipc"))
    assert pipe.scheduler is original


def test_generate_api_options_and_models_not_offered(server):  # noqa: F811
    from gradio_client import Client

    client = Client(server, verbose=False)
    old = ("star", "apg", 6, 0, None, -0.5, "softpag", 2, 0, 3, 0, 1, False)  # the 13 arguments of before
    image, caption = client.predict(*old, api_name="/generate")
    assert Image.open(image).size == (256, 256) and caption == "row 1: apg 6 + softpag 2"
    _, caption = client.predict(*old, "ddim", "demo/dit", api_name="/generate")
    assert caption == "row 1: apg 6 + softpag 2 (ddim)"
    with pytest.raises(Exception, match="not in the list of choices"):
        client.predict(*old, "euler", api_name="/generate")

    with pytest.raises(Exception, match="not in the list of choices"):  # hub models: only with --allow-hub
        client.predict(*old, "default", "facebook/DiT-XL-2-256", api_name="/generate")
    with pytest.raises(Exception, match="not in the list of choices"):
        client.predict(*old, "default", "/etc", api_name="/generate")


def test_the_cost_estimate_counts_every_denoiser_evaluation():
    """What the app's budget check multiplies: score samplers run several evaluations per level, the corrector
    several per step (a request must not slip past --max-seconds by asking for them)."""
    assert Request("star", steps=25).evaluations() == 25
    assert Request("star", steps=25, corrector_steps=3).evaluations() == 100
    langevin = Request("x", method="none", steps=200, sampler="langevin", extra=(("sampler_steps_per_level", 100),))
    assert langevin.evaluations() == 200 * 100 + 1  # plus the final denoising
    assert Request("x", method="none", steps=10, sampler="langevin").evaluations() == 10 * 4 + 1  # its default
    pc = Request("x", method="none", steps=50, sampler="pc", extra=(("sampler_corrector_steps", 3),))
    assert pc.evaluations() == 50 * 4
    assert Request("star", method="apg", perturbation="pag").branches() == 3
    assert Request("star", method="none").branches() == 1
