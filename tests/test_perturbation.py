"""PAG, SoftPAG and TPG through guide(): against diffusers' PAG pipelines, against each other, on every family."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from guidance import CFG, PAG, TPG, SoftPAG, guide
from guidance.layers import select, self_attention_layers
from guidance.pag import soft_identity
from guidance.pipeline import family_of
from guidance.tpg import shuffle_tokens
from tests.factories import BUILDERS, UnlistedAttnProcessor, default_call_kwargs, pipeline_snapshot
from tests.test_pipeline import assert_images_close, gen, get_pipe, run

FAMILIES = ["sd", "sd_img2img", "sdxl", "sd3", "flux", "flux_img2img", "dit", "pixart_sigma"]


def _diffusers_pag(pipe, layers):
    import diffusers

    cls = {
        "StableDiffusionPipeline": diffusers.StableDiffusionPAGPipeline,
        "StableDiffusionXLPipeline": diffusers.StableDiffusionXLPAGPipeline,
        "StableDiffusion3Pipeline": diffusers.StableDiffusion3PAGPipeline,
        "StableDiffusionImg2ImgPipeline": diffusers.StableDiffusionPAGImg2ImgPipeline,
        "StableDiffusionXLImg2ImgPipeline": diffusers.StableDiffusionXLPAGImg2ImgPipeline,
        "StableDiffusion3Img2ImgPipeline": diffusers.StableDiffusion3PAGImg2ImgPipeline,
        "PixArtSigmaPipeline": diffusers.PixArtSigmaPAGPipeline,
    }[type(pipe).__name__]
    components = {k: v for k, v in pipe.components.items() if k in cls.__init__.__code__.co_varnames}
    return cls(**components, pag_applied_layers=layers)


@pytest.mark.parametrize(
    "name, layers, joint",
    [
        ("sd", ["mid"], "full"),
        ("sdxl", ["mid"], "full"),
        ("sdxl", ["down_blocks.1", "up"], "full"),
        ("sd3", ["blocks.0"], "image"),
        ("sd_img2img", ["mid"], "full"),
        ("sdxl_img2img", ["mid"], "full"),
        ("sd3_img2img", ["blocks.0"], "image"),
        ("pixart_sigma", ["blocks.0"], "full"),
    ],
)
def test_cfg_plus_pag_matches_the_diffusers_pag_pipelines(name, layers, joint):
    pipe = BUILDERS[name]()
    theirs = _diffusers_pag(pipe, layers)
    theirs.set_progress_bar_config(disable=True)
    kwargs = default_call_kwargs(pipe)
    expected = theirs(**kwargs, guidance_scale=4.0, pag_scale=3.0, generator=gen()).images
    with guide(pipe, CFG(4.0), PAG(3.0, layers=tuple(layers), joint=joint)):
        ours = pipe(**kwargs, generator=gen()).images
    no_pag = run(pipe, scale=4.0)
    assert np.abs(expected - no_pag).max() > 1e-3, "PAG must change this tiny model's output"
    assert_images_close(ours, expected, atol=1e-4)
    # without CFG, PAG alone (the pipeline's guidance_scale = 1)
    expected = theirs(**kwargs, guidance_scale=1.0, pag_scale=3.0, generator=gen()).images
    with guide(pipe, PAG(3.0, layers=tuple(layers), joint=joint)):
        ours = pipe(**kwargs, guidance_scale=1.0, generator=gen()).images
    assert_images_close(ours, expected, atol=1e-4)


@pytest.mark.parametrize("name", ["sd", "sd3", "flux", "dit"])
def test_softpag_interpolates_between_no_perturbation_and_pag(name):
    pipe = get_pipe(name)
    denoiser = getattr(pipe, family_of(pipe).denoiser)
    layer, module = next(iter(select(self_attention_layers(denoiser), ["^" + _first_block(pipe)], "layer").items()))
    heads = [(layer, h) for h in range(module.heads)]
    with guide(pipe, CFG(3.0), PAG(2.0, layers=(layer,))):
        pag = run(pipe)
    with guide(pipe, CFG(3.0), SoftPAG(2.0, heads=heads, strength=1.0)):
        soft_one = run(pipe)
    with guide(pipe, CFG(3.0), SoftPAG(2.0, heads=heads, strength=0.0)):
        soft_zero = run(pipe)
    with guide(pipe, CFG(3.0), SoftPAG(2.0, heads=heads[:1], strength=0.5)):
        one_head = run(pipe)
    plain = run(pipe, scale=3.0)
    assert np.abs(pag - plain).max() > 1e-3
    assert_images_close(soft_one, pag, atol=1e-5)
    assert_images_close(soft_zero, plain, atol=1e-5)
    assert np.abs(one_head - plain).max() > 1e-5 and np.abs(one_head - pag).max() > 1e-5


def _first_block(pipe):
    return "mid" if hasattr(pipe, "unet") else "transformer_blocks.0"


def test_soft_identity_is_the_paper_formula():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g) for _ in range(3))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    mixed = soft_identity(out, v, 0.25, heads=[1])
    attention = torch.softmax(q @ k.transpose(-1, -2) / 2, dim=-1)
    soft = 0.75 * attention + 0.25 * torch.eye(5)
    torch.testing.assert_close(mixed[:, 1], soft[:, 1] @ v[:, 1])
    torch.testing.assert_close(mixed[:, [0, 2]], out[:, [0, 2]])
    torch.testing.assert_close(soft_identity(out, v, 1.0), v)


def test_token_shuffle_keeps_tokens_and_norms_and_follows_the_generator():
    h = torch.randn(2, 16, 8, generator=gen())
    a = shuffle_tokens(h, torch.Generator().manual_seed(3))
    b = shuffle_tokens(h, torch.Generator().manual_seed(3))
    c = shuffle_tokens(h, torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    torch.testing.assert_close(a.norm(dim=(1, 2)), h.norm(dim=(1, 2)))
    torch.testing.assert_close(a.norm(dim=2).sort(dim=1).values, h.norm(dim=2).sort(dim=1).values)
    torch.testing.assert_close(a.sum(dim=1), h.sum(dim=1))  # a permutation of the same tokens


@pytest.mark.parametrize("name", FAMILIES)
def test_every_method_runs_on_every_family_batched_and_sequentially(name):
    pipe = get_pipe(name)
    plain = run(pipe, scale=3.0)
    snapshot = pipeline_snapshot(pipe)  # after a first call: FLUX's own cache_context adds a hook registry
    methods = [PAG(2.0), TPG(2.0, seed=1), SoftPAG(2.0, heads=[(0, 0), (0, 1)], strength=0.5)]
    results = {}
    for method in methods:
        with guide(pipe, CFG(3.0), method):
            batched, again = run(pipe), run(pipe)
        with guide(pipe, CFG(3.0), method, sequential=True):
            one_by_one = run(pipe)
        np.testing.assert_array_equal(batched, again)
        assert_images_close(one_by_one, batched, atol=2e-4)
        assert np.abs(batched - plain).max() > 1e-4, f"{method} must change the output"
        results[type(method).__name__] = batched
    with guide(pipe, CFG(3.0), *methods):  # all three together: one denoiser call of five branches
        together = run(pipe)
    assert np.isfinite(together).all()
    assert pipeline_snapshot(pipe) == snapshot
    np.testing.assert_array_equal(run(pipe, scale=3.0), plain)


def test_tpg_is_reproducible_from_its_seed():
    pipe = get_pipe("sd")
    with guide(pipe, TPG(3.0, seed=7)):
        a = run(pipe)
    with guide(pipe, TPG(3.0, seed=7)):
        b = run(pipe)
    with guide(pipe, TPG(3.0, seed=8)):
        c = run(pipe)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-5


def test_perturbed_branch_is_batched_with_the_others():
    pipe = get_pipe("sd")
    sizes = []
    hook = pipe.unet.conv_in.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        with guide(pipe, CFG(3.0), PAG(2.0)):
            run(pipe)
        assert set(sizes) == {3}  # uncond, cond, perturbed in one call
        sizes.clear()
        with guide(pipe, CFG(3.0), PAG(2.0), TPG(2.0)):
            run(pipe)
        assert set(sizes) == {4}
        sizes.clear()
        with guide(pipe, CFG(3.0), PAG(2.0), sequential=True):
            run(pipe)
        assert sizes == [2, 1] * 3
        sizes.clear()
        with guide(pipe, CFG(3.0), PAG(2.0, start=0.5)):  # the interval: the branch is not even computed before
            run(pipe)
        assert sizes == [2, 2, 3]  # steps at fractions 0, 1/3, 2/3 of the run
    finally:
        hook.remove()


def test_layer_selectors_and_their_errors():
    names = [f"transformer_blocks.{i}.attn" for i in range(12)] + ["single_transformer_blocks.1.attn"]
    modules = {name: nn.Identity() for name in names}
    assert list(select(modules, ["blocks.1"], "layer")) == [
        "transformer_blocks.1.attn",
        "single_transformer_blocks.1.attn",
    ]
    assert list(select(modules, ["^transformer_blocks.1"], "layer")) == ["transformer_blocks.1.attn"]
    assert list(select(modules, [10, -1], "layer")) == [
        "transformer_blocks.10.attn",
        "single_transformer_blocks.1.attn",
    ]
    assert list(select(modules, ["transformer_blocks.3.attn"], "layer")) == ["transformer_blocks.3.attn"]
    unet = [f"down_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1" for b in (1, 2) for a in (0, 1)]
    unet_modules = {name: nn.Identity() for name in unet}
    assert list(select(unet_modules, ["down.block_2.attentions_1"], "layer")) == [unet[3]]
    assert list(select(unet_modules, ["down.block_1"], "layer")) == unet[:2]
    with pytest.raises(ValueError, match=r"no layer matches 'blocks\.13'; valid names: transformer_blocks\.0"):
        select(modules, ["blocks.13"], "layer")
    with pytest.raises(ValueError, match="out of range"):
        select(modules, [13], "layer")
    with pytest.raises(ValueError, match="int or a non-empty str"):
        select(modules, [1.5], "layer")
    with pytest.raises(ValueError, match="invalid layer pattern"):
        select(modules, ["blocks.("], "layer")


def test_bad_perturbation_arguments_are_clear_errors():
    pipe = get_pipe("sd")
    with pytest.raises(ValueError, match="no self-attention layer matches 'nope'"):
        with guide(pipe, PAG(2.0, layers=("nope",))):
            pass
    with pytest.raises(ValueError, match="head 99 is out of range"):
        with guide(pipe, SoftPAG(2.0, heads=[("mid", 99)])):
            pass
    assert type(pipe).__name__ == "StableDiffusionPipeline" and "forward" not in vars(pipe.unet)
    with pytest.raises(ValueError, match="strength"):
        SoftPAG(2.0, heads=[(0, 0)], strength=1.5)
    with pytest.raises(ValueError, match="at least one"):
        SoftPAG(2.0)
    with pytest.raises(ValueError, match="non-empty sequence"):
        PAG(2.0, layers=[])
    with pytest.raises(ValueError, match="non-empty sequence"):
        TPG(2.0, layers={"mid"})
    with pytest.raises(ValueError, match="start must be < stop"):
        TPG(2.0, start=0.6, stop=0.5)


def test_one_layer_selector_is_accepted_as_diffusers_pag_applied_layers():
    assert PAG(2.0, layers="mid").layers == ("mid",)
    assert PAG(2.0, layers=["mid", 0]).layers == ("mid", 0)
    assert PAG(2.0, layers=3).layers == (3,)
    assert TPG(2.0, layers="down_blocks.1").layers == ("down_blocks.1",)
    pipe = get_pipe("sd")
    with guide(pipe, PAG(2.0, layers="mid")):
        one = run(pipe)
    with guide(pipe, PAG(2.0, layers=("mid",))):
        np.testing.assert_array_equal(run(pipe), one)


@pytest.mark.parametrize("how", ["slicing", "classic"])
def test_attention_without_sdpa_is_perturbed_on_the_value_path(how):
    """Sliced attention and the classic processor (explicit softmax, no SDPA): PAG and SoftPAG act on the value
    path (``to_out[0]``'s input mixed with ``to_v``'s output) and give what they give on SDPA."""
    from diffusers.models.attention_processor import AttnProcessor

    pipe = BUILDERS["sd"]()
    methods = {
        "pag": (CFG(3.0), PAG(2.0, layers=("mid", "up_blocks.0"))),
        "soft": (SoftPAG(2.0, heads=(("mid", 0), ("up_blocks.0", 1)), strength=0.6),),
    }
    expected = {}
    for key, chosen in methods.items():
        with guide(pipe, *chosen):
            expected[key] = run(pipe)
    if how == "slicing":
        pipe.enable_attention_slicing(1)
    else:
        pipe.unet.set_attn_processor(AttnProcessor())
    processors = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    assert processors == {"SlicedAttnProcessor" if how == "slicing" else "AttnProcessor"}
    snapshot = pipeline_snapshot(pipe)
    for key, chosen in methods.items():
        with guide(pipe, *chosen):
            np.testing.assert_allclose(run(pipe), expected[key], atol=1e-5, rtol=0)
    assert pipeline_snapshot(pipe) == snapshot
    assert np.abs(expected["pag"] - expected["soft"]).max() > 1e-3


def test_other_attention_without_sdpa_is_refused_at_entry():
    pipe = BUILDERS["sd"]()
    pipe.unet.set_attn_processor(UnlistedAttnProcessor())
    snapshot = pipeline_snapshot(pipe)
    with pytest.raises(ValueError, match=r"mid_block.*UnlistedAttnProcessor.*AttnProcessor2_0"):
        with guide(pipe, PAG(2.0)):
            pass
    assert pipeline_snapshot(pipe) == snapshot and type(pipe).__name__ == "StableDiffusionPipeline"
    assert not any(hasattr(m, "_diffusers_hook") for m in pipe.unet.modules())
    with guide(pipe, CFG(3.0)):  # no attention perturbation: any processor is fine
        run(pipe)


def test_attention_that_never_reaches_sdpa_is_refused_at_run_time():
    from diffusers.models.attention_processor import AttnProcessor

    namespace = {"AttnProcessor": AttnProcessor}
    exec(  # a processor whose source cannot be read: the entry check lets it through, the run-time one does not
        "class OpaqueProcessor(AttnProcessor):\n    def __call__(self, *args, **kwargs):\n"
        "        return super().__call__(*args, **kwargs)\n",
        namespace,
    )
    pipe = BUILDERS["sd"]()
    pipe.unet.set_attn_processor(namespace["OpaqueProcessor"]())
    with guide(pipe, PAG(2.0)), pytest.raises(RuntimeError, match="scaled_dot_product_attention"):
        run(pipe)
    assert type(pipe).__name__ == "StableDiffusionPipeline"


def test_flux_without_true_cfg_gets_perturbation_only():
    pipe = get_pipe("flux")
    plain = run(pipe)
    with guide(pipe, PAG(2.0)):
        pag = run(pipe)
    assert np.abs(pag - plain).max() > 1e-4
    kwargs = default_call_kwargs(pipe)
    with guide(pipe, PAG(2.0)):
        again = pipe(**kwargs, generator=gen()).images
    np.testing.assert_array_equal(again, pag)


def _sd3_with_qk_norm(pipe):
    import diffusers

    config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    transformer = diffusers.SD3Transformer2DModel(**config | {"qk_norm": "rms_norm"}).eval()
    transformer.load_state_dict(pipe.transformer.state_dict(), strict=False)  # the norms start at weight 1
    pipe.transformer = transformer
    return pipe


@pytest.mark.parametrize("qk_norm", [False, True])
def test_sd3_joint_modes_against_the_diffusers_sd3_pag_pipeline(qk_norm):
    # README "SD3 and diffusers' PAG": diffusers' joint PAG processor keeps image-to-text attention and drops
    # QK-norm in every branch of the chosen layers; joint="image" is the same perturbation with QK-norm kept.
    pipe = BUILDERS["sd3"]()
    if qk_norm:
        _sd3_with_qk_norm(pipe)
    theirs = _diffusers_pag(pipe, ["blocks.0"])
    theirs.set_progress_bar_config(disable=True)
    kwargs = default_call_kwargs(pipe)
    expected = theirs(**kwargs, guidance_scale=4.0, pag_scale=3.0, generator=gen()).images
    pag_effect = np.abs(expected - run(pipe, scale=4.0)).max()
    ours = {}
    for joint in ("full", "image"):
        with guide(pipe, CFG(4.0), PAG(3.0, layers=("blocks.0",), joint=joint)):
            ours[joint] = pipe(**kwargs, generator=gen()).images
    full, image = (np.abs(ours[j] - expected).max() for j in ("full", "image"))
    assert full > pag_effect  # measured 0.116 vs 0.052 (QK-norm off), 0.136 vs 0.055 (on)
    if qk_norm:
        assert image > 1e-2  # measured 0.054: diffusers drops the QK-norm, we keep it
    else:
        assert image < 1e-4


def test_a_new_perturbation_is_a_perturbation_subclass_with_its_edits():
    import dataclasses

    from guidance.method import AttentionEdit, Perturbation

    @dataclasses.dataclass(frozen=True)
    class MidIdentity(Perturbation):  # PAG on the middle block, written against the public base class
        def edits(self, denoiser):
            return dict.fromkeys(select(self_attention_layers(denoiser), ["mid"], "layer"), AttentionEdit())

    @dataclasses.dataclass(frozen=True)
    class Unknown(Perturbation):
        def edits(self, denoiser):
            return {"mid_block.attentions.0.transformer_blocks.0.attn1": "shuffle"}

    pipe = get_pipe("sd")
    with guide(pipe, CFG(3.0), PAG(2.0, layers="mid")):
        expected = run(pipe)
    with guide(pipe, CFG(3.0), MidIdentity(2.0)):
        assert_images_close(run(pipe), expected, atol=0)
    snapshot = pipeline_snapshot(pipe)
    with pytest.raises(TypeError, match="unknown edit"), guide(pipe, CFG(3.0), PAG(2.0), Unknown(1.0)):
        pass
    assert pipeline_snapshot(pipe) == snapshot


def test_tpg_auto_takes_the_official_down_blocks_2_where_the_unet_has_them():
    from diffusers import UNet2DConditionModel

    sdxl_like = UNet2DConditionModel(  # SDXL's block layout at toy widths: attention in down_blocks.1 and .2
        block_out_channels=(8, 16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 3),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=8,
        attention_head_dim=(2, 4, 8),
        sample_size=8,
    )
    shuffled = TPG(3.0).edits(sdxl_like)
    expected = [f"down_blocks.2.attentions.0.transformer_blocks.{i}" for i in range(3)]
    assert sorted(shuffled) == expected
    assert all(name.startswith("mid_block.") for name in TPG(3.0, layers="mid").edits(sdxl_like))
    tiny = get_pipe("sd").unet  # two down blocks: PAG's default, the middle block
    assert all(name.startswith("mid_block") for name in TPG(3.0).edits(tiny))


def test_flux_single_stream_blocks_know_where_the_image_tokens_are(monkeypatch):
    """FLUX's single-stream blocks join text and image before attention: joint="image" must still act on the
    image block of that sequence (it acted on the whole joint sequence, as "full")."""
    from guidance import perturbation
    from guidance.layers import self_attention_layers

    pipe = get_pipe("flux")
    single = next(name for name in self_attention_layers(pipe.transformer) if name.startswith("single"))
    seen, real = [], perturbation._AttentionHook._image_block

    def spy(self, module, args, kwargs, run):
        seen.append(real(self, module, args, kwargs, run))
        return seen[-1]

    monkeypatch.setattr(perturbation._AttentionHook, "_image_block", spy)
    out = {}
    for joint in ("full", "image"):
        with guide(pipe, PAG(3.0, layers=(single,), joint=joint)):
            out[joint] = run(pipe)
    with guide(pipe, PAG(0.0, layers=(single,))):
        base = run(pipe)
    shapes = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: shapes.append((k["encoder_hidden_states"].shape[1], k["hidden_states"].shape[1])),
        with_kwargs=True,
    )
    try:
        run(pipe)
    finally:
        hook.remove()
    assert seen and set(seen) == set(shapes) and len(set(shapes)) == 1  # (text tokens, image tokens)
    assert np.abs(out["image"] - out["full"]).max() > 1e-4 and np.abs(out["image"] - base).max() > 1e-4


def test_joint_image_identity_keeps_the_calls_own_padding_mask_and_arguments():
    """joint="image" recomputes attention with the identity mask: the call's own mask (here text padding), its
    scale and its causal flag must stay in that recomputation, on the perturbed rows."""
    from guidance import perturbation

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 4, generator=g) for _ in range(3))
    padding = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    padding[1, :, :, 1] = False  # row 1: text token 1 is padding
    image = (2, 4)  # tokens 2..5 are the image
    identity = perturbation._image_identity_mask(6, 6, image, q)
    mode = perturbation._AttentionMode([(slice(1, 2), None, 1.0, image)], 2, "attn")
    with mode:
        out = perturbation.SDPA(q, k, v, attn_mask=padding, scale=0.3)
    own = torch.zeros(1, 1, 6, 6).masked_fill(~padding[1:2], float("-inf"))
    expected = perturbation.SDPA(q[1:2], k[1:2], v[1:2], attn_mask=identity + own, scale=0.3)
    torch.testing.assert_close(out[1:2], expected)
    torch.testing.assert_close(out[:1], perturbation.SDPA(q[:1], k[:1], v[:1], attn_mask=padding[:1], scale=0.3))
    with perturbation._AttentionMode([(slice(0, 2), None, 1.0, image)], 2, "attn"):
        causal = perturbation.SDPA(q, k, v, is_causal=True)
    reference = perturbation.SDPA(q, k, v, attn_mask=identity + torch.full((6, 6), float("-inf")).triu(1))
    torch.testing.assert_close(causal, reference)


def test_diffusers_native_sdpa_backends_are_accepted_and_perturbed_alike():
    pipe = get_pipe("flux")
    with guide(pipe, PAG(3.0)):
        default = run(pipe)
    pipe.transformer.set_attention_backend("_native_math")
    try:
        with guide(pipe, PAG(3.0)):
            math_backend = run(pipe)
    finally:
        pipe.transformer.set_attention_backend("native")
    assert_images_close(math_backend, default, atol=1e-5)
