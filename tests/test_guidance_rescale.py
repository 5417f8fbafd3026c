"""The pipeline's own ``guidance_rescale`` (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are
Flawed": the guided prediction rescaled toward the conditional one's standard deviation) inside guide(): the CFG
batch then carries the true conditional half and an unconditional half solved so that the pipeline's CFG gives the
guided prediction, and the pipeline rescales it exactly as it would its own CFG. Against the pipeline's own CFG and
diffusers' PAG pipelines with the same ``guidance_rescale``."""

from __future__ import annotations

import numpy as np
import pytest

from guidance import APG, CFG, PAG, guide
from tests.factories import BUILDERS, default_call_kwargs
from tests.test_perturbation import _diffusers_pag
from tests.test_pipeline import assert_images_close, gen, get_pipe, run

RESCALE = 0.7


@pytest.mark.parametrize("name", ["sd", "sd_v", "sdxl"])
def test_cfg_with_guidance_rescale_equals_the_pipelines_own(name):
    pipe = get_pipe(name)
    reference = run(pipe, scale=5.0, guidance_rescale=RESCALE)
    assert np.abs(reference - run(pipe, scale=5.0)).max() > 1e-4, "the rescaling must change this tiny model's output"
    with guide(pipe, CFG(5.0)):
        assert_images_close(run(pipe, guidance_rescale=RESCALE), reference, atol=1e-4)
        assert_images_close(run(pipe, scale=1.0, guidance_rescale=RESCALE), reference, atol=1e-4)  # branch forced on
    with guide(pipe, APG(5.0)):
        rescaled, plain = run(pipe, guidance_rescale=RESCALE), run(pipe)
    assert np.isfinite(rescaled).all() and np.abs(rescaled - plain).max() > 1e-4


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_pag_with_guidance_rescale_equals_diffusers_pag_pipeline(name):
    pipe = BUILDERS[name]()
    theirs = _diffusers_pag(pipe, ["mid"])
    theirs.set_progress_bar_config(disable=True)
    kwargs = default_call_kwargs(pipe) | {"guidance_rescale": RESCALE}
    expected = theirs(**kwargs, guidance_scale=4.0, pag_scale=3.0, generator=gen()).images
    with guide(pipe, CFG(4.0), PAG(3.0, layers=("mid",))):
        assert_images_close(pipe(**kwargs, generator=gen()).images, expected, atol=1e-4)
    with guide(pipe, PAG(3.0, layers=("mid",))):  # the pipeline's own CFG 4, composed with PAG, then rescaled
        assert_images_close(pipe(**kwargs, guidance_scale=4.0, generator=gen()).images, expected, atol=1e-4)
