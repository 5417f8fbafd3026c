"""guide() on inpainting, ControlNet and T2I-Adapter pipelines (issue #14, item 9): CFG equals the pipeline's own
CFG, CFG+PAG equals diffusers' PAG pipelines for them, APG runs, the perturbations batched equal their own calls
with the ControlNet's and the adapter's residuals, the corrector is refused where it cannot apply."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

from guidance import APG, CFG, PAG, LangevinCorrector, guide
from guidance.pipeline import family_of
from tests.factories import variant, variant_call_kwargs

CASES = [
    ("sd", "inpaint"),
    ("sd", "inpaint9"),
    ("sd", "controlnet"),
    ("sd", "controlnet_img2img"),
    ("sd", "controlnet_inpaint"),
    ("sdxl", "inpaint"),
    ("sdxl", "controlnet"),
    ("sdxl", "controlnet_img2img"),
    ("sdxl", "controlnet_inpaint"),
    ("sdxl", "controlnet_union"),
    ("sdxl", "controlnet_union_img2img"),
    ("sdxl", "controlnet_union_inpaint"),
    ("sd", "adapter"),
    ("sdxl", "adapter"),
    ("sd3", "inpaint"),
    ("sd3", "controlnet"),
    ("sd3", "controlnet_inpaint"),
    ("flux", "inpaint"),
    ("flux", "controlnet"),
]


def gen():
    return torch.Generator().manual_seed(0)


def call(pipe, scale=None, **extra):
    kwargs = variant_call_kwargs(pipe) | extra
    family = family_of(pipe)
    if family.name == "flux":
        kwargs.setdefault("negative_prompt", "")
    if scale is not None:
        kwargs[family.scale_arg] = scale
    return pipe(**kwargs, generator=gen()).images


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_cfg_equals_the_pipelines_own_cfg_and_apg_runs(family, kind):
    pipe = variant(family, kind)
    reference, unguided = call(pipe, scale=4.0), call(pipe, scale=1.0)
    assert np.abs(reference - unguided).max() > 1e-4, "CFG must change this tiny model's output"
    with guide(pipe, CFG(4.0)):
        np.testing.assert_allclose(call(pipe), reference, atol=2e-5)
    with guide(pipe, APG(4.0)):
        apg = call(pipe)
    assert np.isfinite(apg).all() and np.abs(apg - reference).max() > 1e-6
    with guide(pipe, CFG(4.0), PAG(2.0)):  # the perturbed rows get the ControlNet residuals / mask channels too
        pag = call(pipe)
    assert np.isfinite(pag).all() and np.abs(pag - reference).max() > 1e-5


def _diffusers_pag(cls_name, pipe, layers):
    cls = getattr(diffusers, cls_name)
    accepted = cls.__init__.__code__.co_varnames
    theirs = cls(**{k: v for k, v in pipe.components.items() if k in accepted}, pag_applied_layers=layers)
    theirs.set_progress_bar_config(disable=True)
    return theirs


@pytest.mark.parametrize(
    ("family", "kind", "theirs"),
    [
        ("sd", "controlnet", "StableDiffusionControlNetPAGPipeline"),
        ("sd", "inpaint9", "StableDiffusionPAGInpaintPipeline"),
        ("sd", "controlnet_inpaint", "StableDiffusionControlNetPAGInpaintPipeline"),
        ("sdxl", "controlnet", "StableDiffusionXLControlNetPAGPipeline"),
        ("sdxl", "inpaint", "StableDiffusionXLPAGInpaintPipeline"),
        ("sdxl", "controlnet_img2img", "StableDiffusionXLControlNetPAGImg2ImgPipeline"),
    ],
)
def test_cfg_plus_pag_matches_the_diffusers_pag_pipelines(family, kind, theirs):
    pipe = variant(family, kind)
    reference_pipe = _diffusers_pag(theirs, pipe, ["mid"])
    kwargs = variant_call_kwargs(pipe)
    expected = reference_pipe(**kwargs, guidance_scale=4.0, pag_scale=3.0, generator=gen()).images
    assert np.abs(expected - call(pipe, scale=4.0)).max() > 1e-3, "PAG must change this tiny model's output"
    with guide(pipe, CFG(4.0), PAG(3.0, layers="mid")):
        np.testing.assert_allclose(call(pipe), expected, atol=1e-4)


@pytest.mark.parametrize(("family", "kind"), [("sd", "controlnet"), ("sd", "inpaint9")])
def test_corrector_is_refused_where_other_inputs_follow_the_latents(family, kind):
    pipe = variant(family, kind)
    with guide(pipe, CFG(3.0), LangevinCorrector()), pytest.raises(ValueError, match="Langevin corrector"):
        call(pipe)


def tiny_ip_adapter(unet, image_embed_dim=16, seed=0):
    """A random IP-Adapter state dict (image projection + to_k_ip / to_v_ip per cross-attention) for ``unet``."""
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim

    def r(*shape):
        return 0.1 * torch.randn(*shape, generator=g)

    projection = {
        "proj.weight": r(4 * cross, image_embed_dim),
        "proj.bias": r(4 * cross),
        "norm.weight": torch.ones(cross),
        "norm.bias": torch.zeros(cross),
    }
    layers, key = {}, 1
    for name in unet.attn_processors:
        if not name.endswith("attn1.processor"):
            hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
            layers[f"{key}.to_k_ip.weight"], layers[f"{key}.to_v_ip.weight"] = r(hidden, cross), r(hidden, cross)
            key += 2
    return {"image_proj": projection, "ip_adapter": layers}


def test_ip_adapter_cfg_and_pag_match_the_pipeline_and_diffusers_pag():
    from tests.factories import BUILDERS, default_call_kwargs

    pipe = BUILDERS["sd"]()
    pipe.unet._load_ip_adapter_weights([tiny_ip_adapter(pipe.unet)], low_cpu_mem_usage=False)
    kwargs = default_call_kwargs(pipe)
    embeds = torch.randn(1, 1, 16, generator=gen())
    kwargs["ip_adapter_image_embeds"] = [torch.cat([torch.zeros_like(embeds), embeds])]  # negative, positive
    reference = pipe(**kwargs, guidance_scale=4.0, generator=gen()).images
    without = pipe(**kwargs | {"ip_adapter_image_embeds": [torch.zeros(2, 1, 16)]}, guidance_scale=4.0, generator=gen())
    assert np.abs(reference - without.images).max() > 1e-2, "the IP-Adapter must change this tiny model's output"
    with guide(pipe, CFG(4.0)):
        np.testing.assert_allclose(pipe(**kwargs, generator=gen()).images, reference, atol=2e-5)
    expected = _diffusers_pag("StableDiffusionPAGPipeline", pipe, ["mid"])(
        **kwargs, guidance_scale=4.0, pag_scale=2.0, generator=gen()
    ).images
    with guide(pipe, CFG(4.0), PAG(2.0, layers="mid")):
        np.testing.assert_allclose(pipe(**kwargs, generator=gen()).images, expected, atol=1e-4)


@pytest.mark.parametrize(("family", "kind"), [("sd", "adapter"), ("sdxl", "adapter"), ("sdxl", "controlnet")])
def test_perturbations_batched_equal_their_own_calls_with_residuals(family, kind):
    """The T2I-Adapter's and the ControlNet's residuals are rebound with the batch: the perturbed rows get their
    own copies."""
    from guidance import TPG

    pipe = variant(family, kind)
    for method in (PAG(2.0), TPG(1.0)):
        with guide(pipe, CFG(4.0), method):
            batched = call(pipe)
        with guide(pipe, CFG(4.0), method, sequential=True):
            np.testing.assert_allclose(call(pipe), batched, atol=1e-5)
        with guide(pipe, CFG(4.0)):
            assert np.abs(batched - call(pipe)).max() > 1e-4


@pytest.mark.parametrize("kind", ["upscale", "depth"])
def test_the_x4_upscaler_and_depth_to_image(kind):
    """SD's x4 upscaler (the low-res image's channels follow the latents in the UNet's input, its noise level is a
    class label per row) and SD 2's depth-to-image (the depth map's channel follows them): CFG equals the pipeline's
    own, APG acts on the latent channels, the perturbations batched equal their own calls, the corrector is refused
    (it would move the condition's channels)."""
    from guidance import TPG
    from tests.factories import sd_depth_call_kwargs, sd_upscale_call_kwargs, tiny_sd_depth, tiny_sd_upscale
    from tests.family_checks import (
        assert_apg_equals_the_formula,
        assert_batched_equals_own_calls,
        assert_cfg_equals_the_pipelines_own,
        scheduler_x0,
    )

    pipe, kwargs = (
        (tiny_sd_upscale(), sd_upscale_call_kwargs) if kind == "upscale" else (tiny_sd_depth(), sd_depth_call_kwargs)
    )

    def upscale(pipe, **extra):
        return pipe(**kwargs() | extra, generator=gen()).images

    assert_cfg_equals_the_pipelines_own(pipe, upscale, atol=1e-5)
    assert_apg_equals_the_formula(pipe, upscale, "sd", scheduler_x0(pipe), latents=lambda x: x[:, :4])
    for method in (PAG(1.0), TPG(1.0)):
        assert_batched_equals_own_calls(pipe, upscale, method, atol=1e-5)
    with guide(pipe, PAG(1.0), LangevinCorrector()), pytest.raises(ValueError, match="Langevin corrector"):
        upscale(pipe)
