"""guide() on AuraFlow: one batched CFG call (the unconditional half first) of MMDiT joint blocks followed by
single-stream blocks over [register tokens, text, image], its latents coming in as images ``(B, C, H, W)`` and its
timestep as sigma in [0, 1].

CFG equals the pipeline's own; APG equals the formula on the recorded branches; the perturbations batched equal
them as calls of their own; in the single-stream blocks ``PAG(joint="image")`` finds the image tokens after the
registers and the text (it acted on the whole sequence before); SLG's weak branch is the denoiser without the
block; the pipeline is left as found."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidance import PAG, SLG, TPG, SoftPAG, guide
from tests.factories import auraflow_call_kwargs, tiny_auraflow
from tests.family_checks import (
    assert_apg_equals_the_formula,
    assert_batched_equals_own_calls,
    assert_cfg_equals_the_pipelines_own,
    scheduler_x0,
)

SINGLE = "single_transformer_blocks.1.attn"


@pytest.fixture(scope="module")
def pipe():
    return tiny_auraflow()


def call(pipe, **extra):
    return pipe(**auraflow_call_kwargs() | extra, generator=torch.Generator().manual_seed(0)).images


def test_cfg_equals_the_pipelines_own(pipe):
    assert_cfg_equals_the_pipelines_own(pipe, call)


def test_apg_equals_the_formula_on_the_recorded_branches(pipe):
    assert_apg_equals_the_formula(pipe, call, "auraflow", scheduler_x0(pipe, 1000))  # the pipeline passes t / 1000


@pytest.mark.parametrize(
    "method",
    [
        PAG(1.0),
        PAG(1.0, layers=(SINGLE,), joint="image"),
        SoftPAG(1.0, heads=((SINGLE, 1),)),
        TPG(1.0),
        SLG(1.0, layers=(3,), start=0.0, stop=1.0),
    ],
    ids=["pag", "pag-image", "softpag", "tpg", "slg"],
)
def test_perturbations_batched_equal_their_own_calls(pipe, method):
    assert_batched_equals_own_calls(pipe, call, method)


def test_pag_on_the_image_tokens_finds_them_after_the_registers_and_the_text(pipe, monkeypatch):
    """The single-stream blocks' attention runs on [registers, text, image]: joint="image" must act on the image
    block of that sequence, read from the denoiser's register tokens and patch size."""
    from guidance import perturbation

    seen, real = [], perturbation._AttentionHook._image_block

    def spy(self, module, args, kwargs, run):
        seen.append(real(self, module, args, kwargs, run))
        return seen[-1]

    monkeypatch.setattr(perturbation._AttentionHook, "_image_block", spy)
    lengths = []
    attention = dict(pipe.transformer.named_modules())[SINGLE]
    record = lambda module, args, kwargs: lengths.append(kwargs["hidden_states"].shape[1])
    hook = attention.register_forward_pre_hook(record, with_kwargs=True)
    out = {}
    try:
        for joint in ("full", "image"):
            with guide(pipe, PAG(3.0, layers=(SINGLE,), joint=joint)):
                out[joint] = call(pipe, guidance_scale=1.0)
    finally:
        hook.remove()
    transformer, latent = pipe.transformer, 32 // pipe.vae_scale_factor
    text = transformer.register_tokens.shape[1] + auraflow_call_kwargs()["prompt_embeds"].shape[1]
    image = (latent // transformer.config.patch_size) ** 2
    assert set(seen) == {(text, image)} and set(lengths) == {text + image}
    assert np.abs(out["image"] - out["full"]).max() > 1e-4
