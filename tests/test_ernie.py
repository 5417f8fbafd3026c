"""guide() on ERNIE-Image: one batched CFG call (the unconditional half first) of single-stream blocks over
[image, text] tokens, each sample's text padded to the batch's longest under a key-padding mask, and blocks that
take their hidden states sequence-first, ``(tokens, batch, channels)``.

CFG equals the pipeline's own; APG equals the formula on the recorded branches; the perturbations batched equal
them as calls of their own (TPG and SLG must find the batch on dim 1 of the blocks' inputs); TPG shuffles each
row's real tokens only; ``PAG(joint="image")`` is refused; the pipeline is left as found."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidance import PAG, SLG, TPG, SoftPAG, guide
from tests.factories import ernie_call_kwargs, tiny_ernie
from tests.family_checks import (
    assert_apg_equals_the_formula,
    assert_batched_equals_own_calls,
    assert_cfg_equals_the_pipelines_own,
    scheduler_x0,
)


@pytest.fixture(scope="module")
def pipe():
    return tiny_ernie()


def call(pipe, batch=2, **extra):
    return pipe(**ernie_call_kwargs(batch) | extra, generator=torch.Generator().manual_seed(0)).images


def test_cfg_equals_the_pipelines_own(pipe):
    assert_cfg_equals_the_pipelines_own(pipe, call)


def test_apg_equals_the_formula_on_the_recorded_branches(pipe):
    assert_apg_equals_the_formula(pipe, call, "ernie-image", scheduler_x0(pipe))


@pytest.mark.parametrize(
    "method",
    [
        PAG(1.0),
        SoftPAG(1.0, heads=(("layers.1.self_attention", 1),)),
        TPG(1.0),
        SLG(1.0, layers=(1,), start=0.0, stop=1.0),
    ],
    ids=["pag", "softpag", "tpg", "slg"],
)
def test_perturbations_batched_equal_their_own_calls(pipe, method):
    assert_batched_equals_own_calls(pipe, call, method)


def test_tpg_shuffles_the_real_tokens_only(pipe, monkeypatch):
    """The pipeline pads the shorter text with zeros under a key-padding mask: whatever the padding holds, the
    output does not change, and with TPG it still does not (a shuffle over every token would move it in)."""
    pad = pipe._pad_text

    def padded_with(value):
        def garbage(*args, **kwargs):
            text, lengths = pad(*args, **kwargs)
            text = text.clone()
            for row, length in enumerate(lengths.tolist()):
                text[row, length:] = value
            return text, lengths

        monkeypatch.setattr(pipe, "_pad_text", garbage)
        return call(pipe, guidance_scale=4.0)

    np.testing.assert_array_equal(padded_with(0.0), padded_with(5.0))
    with guide(pipe, TPG(2.0)):
        shuffled = padded_with(0.0)
        np.testing.assert_allclose(padded_with(5.0), shuffled, atol=1e-6)
    assert np.abs(shuffled - padded_with(0.0)).max() > 1e-3


def test_pag_on_the_image_tokens_alone_is_refused(pipe):
    with pytest.raises(ValueError, match=r"joint='image'\) is not available"), guide(pipe, PAG(2.0, joint="image")):
        pass
