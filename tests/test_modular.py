"""guidance.modular: the methods as diffusers modular-pipeline guiders, against diffusers' own guiders and, on real
modular SDXL and SD3 pipelines built from the tiny models, against guide() on the classic pipelines."""

import json

import numpy as np
import pytest
import torch

from guidance import APG, CFG, PAG, SLG, TPG, SoftPAG, guide
from guidance.hooks import ACTIVE_RUN, intercepted
from tests.factories import BUILDERS, pipeline_snapshot, tiny_sdxl
from tests.factories import guidance_pair as _pair


def test_modular_guiders_match_diffusers_guiders():
    guiders = pytest.importorskip("diffusers.guiders")
    from guidance.modular import as_guider

    pairs = [
        (as_guider(CFG(5.0)), guiders.ClassifierFreeGuidance(guidance_scale=5.0)),
        (
            as_guider(APG(6.0, eta=0.3, norm_threshold=4.0, momentum=-0.5, space="model")),
            guiders.AdaptiveProjectedGuidance(
                guidance_scale=5.0,
                eta=0.3,
                adaptive_projected_guidance_rescale=4.0,
                adaptive_projected_guidance_momentum=-0.5,
                use_original_formulation=True,
            ),
        ),
    ]
    for run in range(2):  # state resets at step 0 of every run
        for step in range(3):
            c, u = _pair(10 * run + step)
            for ours, theirs in pairs:
                outputs = []
                for guider in (ours, theirs):  # the protocol a modular denoise loop follows
                    guider.set_state(step, 3, torch.tensor(999 - step))
                    batches = guider.prepare_inputs({"prompt_embeds": (torch.ones(1), torch.zeros(1))})
                    for batch in batches:
                        batch.noise_pred = {"pred_cond": c, "pred_uncond": u}[getattr(batch, guider._identifier_key)]
                    outputs.append(guider(batches).pred)
                torch.testing.assert_close(*outputs, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="space='model'"):
        as_guider(APG(5.0))


@pytest.mark.parametrize(
    ("method", "options", "active"),
    [
        (CFG(5.0, start=0.5), {}, [False, False, True, True]),
        (CFG(5.0, stop=0.5), {}, [True, True, False, False]),
        (CFG(5.0, start=0.3, stop=0.8), {}, [False, False, True, True]),  # as guide(): 0.3 <= i / 4 < 0.8
        (CFG(5.0), {"start": 0.25}, [False, True, True, True]),
        (CFG(5.0, start=0.5), {"start": 0.0, "stop": 0.25}, [True, False, False, False]),
    ],
)
def test_modular_guider_follows_the_methods_interval(method, options, active):
    pytest.importorskip("diffusers.guiders")
    from guidance.modular import as_guider

    guider = as_guider(method, **options)
    c, u = _pair(0)
    got = []
    for step in range(4):
        guider.set_state(step, 4, torch.tensor(999 - step))
        batches = guider.prepare_inputs({"prompt_embeds": (torch.ones(1), torch.zeros(1))})
        for batch in batches:
            batch.noise_pred = {"pred_cond": c, "pred_uncond": u}[getattr(batch, guider._identifier_key)]
        pred = guider(batches).pred
        guided = not torch.equal(pred, c)
        assert len(batches) == (2 if guided else 1)
        if guided:
            torch.testing.assert_close(pred, u + 5.0 * (c - u))
        got.append(guided)
    assert got == active
    assert got == [method.active(i / 4) for i in range(4)] or options


def _modular(classic, blocks):
    """The modular pipeline of ``blocks`` on the classic pipeline's components (shared, not copied)."""
    pipe = blocks().init_pipeline()
    pipe.update_components(
        **{k: v for k, v in classic.components.items() if v is not None and k in pipe.component_names}
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl():
    """(classic tiny SDXL pipeline, the modular SDXL pipeline sharing its components)."""
    modular = pytest.importorskip("diffusers.modular_pipelines")
    classic = tiny_sdxl()
    return classic, _modular(classic, modular.StableDiffusionXLAutoBlocks)


PROMPT = {"prompt": "a cat", "negative_prompt": "", "num_inference_steps": 3, "height": 32, "width": 32}


def _run_modular(pipe, guider):
    pipe.update_components(guider=guider)
    return pipe(**PROMPT, generator=torch.Generator().manual_seed(0), output="images", output_type="np")


def _run_classic(pipe, *methods, **extra):
    with guide(pipe, *methods):
        return pipe(**PROMPT, **extra, generator=torch.Generator().manual_seed(0), output_type="np").images


@pytest.mark.parametrize(
    "method",
    [
        PAG(3.0, layers="mid"),
        SoftPAG(3.0, heads=(("mid", 0), ("up_blocks.0", 1)), strength=0.5),
        TPG(2.0),
        SLG(2.0, layers=(0,), start=0.0, stop=1.0),
    ],
    ids=["pag", "softpag", "tpg", "slg"],
)
def test_weak_model_guiders_on_modular_sdxl_equal_guide_on_the_classic_pipeline(sdxl, method):
    classic, modular = sdxl
    before = pipeline_snapshot(classic)
    from guidance.modular import as_guider

    ours = _run_modular(modular, as_guider(CFG(5.0), method))
    np.testing.assert_allclose(ours, _run_classic(classic, CFG(5.0), method), atol=2e-5, rtol=0)
    assert np.abs(ours - _run_classic(classic, CFG(5.0))).max() > 1e-4, "the weak model must matter"
    assert pipeline_snapshot(classic) == before and not intercepted(classic.unet) and ACTIVE_RUN.get() is None


def test_pag_guider_equals_diffusers_perturbed_attention_guidance(sdxl):
    """diffusers' guider perturbs at steps start * n < i < stop * n (step 0 never), so ours starts at 0.3 of 3."""
    from diffusers.guiders import PerturbedAttentionGuidance
    from diffusers.hooks import LayerSkipConfig

    from guidance.modular import as_guider

    _, modular = sdxl
    config = LayerSkipConfig(fqn="mid_block.attentions.0.transformer_blocks", indices=[0], skip_attention_scores=True)
    theirs = PerturbedAttentionGuidance(
        guidance_scale=5.0,
        perturbed_guidance_scale=3.0,
        perturbed_guidance_start=0.0,
        perturbed_guidance_stop=1.0,
        perturbed_guidance_config=config,
    )
    expected = _run_modular(modular, theirs)
    ours = _run_modular(modular, as_guider(CFG(5.0), PAG(3.0, layers="mid", start=0.3)))
    np.testing.assert_allclose(ours, expected, atol=2e-5, rtol=0)
    assert np.abs(ours - _run_modular(modular, as_guider(CFG(5.0)))).max() > 1e-4


def test_pag_alone_on_modular_sd3_equals_guide_on_the_classic_pipeline():
    modular = pytest.importorskip("diffusers.modular_pipelines")
    from guidance.modular import as_guider

    classic = BUILDERS["sd3"]()
    pipe = _modular(classic, modular.StableDiffusion3AutoBlocks)
    ours = _run_modular(pipe, as_guider(PAG(3.0)))
    np.testing.assert_allclose(ours, _run_classic(classic, PAG(3.0), guidance_scale=1.0), atol=2e-5, rtol=0)


def test_a_failed_denoiser_call_leaves_no_weak_model_behind(sdxl):
    """The edits last for one denoiser call: when it raises (the loop never reaches cleanup_models), the next call
    of the denoiser, by anything, runs the plain model; an edit prepared for a call that never comes is removed by
    cleanup_models."""
    from guidance.modular import as_guider

    classic, _ = sdxl
    unet, before = classic.unet, pipeline_snapshot(classic)
    guider = as_guider(PAG(3.0, layers="mid"))
    guider.set_state(0, 3, torch.tensor(999))
    batches = guider.prepare_inputs({"prompt_embeds": (torch.ones(1), torch.zeros(1))})
    assert [getattr(b, guider._identifier_key) for b in batches] == ["pred_cond", "pred_perturbed_0"]
    guider.prepare_models(unet)  # the conditional call: nothing installed
    assert not intercepted(unet)
    guider.cleanup_models(unet)
    guider.prepare_models(unet)  # the weak model's call
    assert intercepted(unet)
    with pytest.raises(Exception):  # noqa: B017  (whatever the UNet raises for a missing argument)
        unet(torch.zeros(1, 4, 4, 4), 999)
    assert pipeline_snapshot(classic) == before and not intercepted(unet) and ACTIVE_RUN.get() is None
    guider.prepare_models(unet)  # prepared, never called
    guider.cleanup_models(unet)
    assert pipeline_snapshot(classic) == before and not intercepted(unet)


def test_guider_refusals_and_saved_configs(tmp_path):
    pytest.importorskip("diffusers.guiders")
    from guidance.modular import SteerguardGuider, as_guider

    with pytest.raises(ValueError, match="space='model'"):
        as_guider(CFG(5.0), APG(5.0))
    with pytest.raises(ValueError, match="at most one"):
        as_guider(CFG(5.0), APG(5.0, space="model"))
    with pytest.raises(ValueError, match="joint='full'"):
        as_guider(PAG(2.0, joint="image"))
    with pytest.raises(ValueError, match="at least one"):
        as_guider()
    with pytest.raises(TypeError, match="guidance methods"):
        as_guider(7.5)
    guider = as_guider(CFG(5.0), SoftPAG(2.0, heads=(("mid", 0),)), TPG(1.0, stop=0.5))
    guider.save_pretrained(tmp_path)
    loaded = SteerguardGuider.from_pretrained(tmp_path)
    assert loaded.methods == guider.methods and loaded.new().methods == guider.methods
    # a guider saved before guiders took several methods: its one method under "method"
    config = json.loads((tmp_path / "guider_config.json").read_text())
    config = {k: v for k, v in config.items() if k != "methods"} | {"method": CFG(4.0).to_dict()}
    (tmp_path / "guider_config.json").write_text(json.dumps(config))
    assert SteerguardGuider.from_pretrained(tmp_path).methods == (CFG(4.0),)
