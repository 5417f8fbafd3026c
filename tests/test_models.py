"""apps/models.py: model names (``demo/<name>``, hub ids, paths) and the one score-model loader."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMPipeline

from apps.models import load_score_model, resolve
from tests.factories import random_pixel_unet


@pytest.fixture(scope="module")
def unet():
    return random_pixel_unet()


def test_resolve_keeps_hub_ids_and_paths():
    assert resolve("google/ddpm-cifar10-32") == "google/ddpm-cifar10-32"
    assert resolve("some/folder/here") == "some/folder/here"


def test_score_model_loads_from_a_bare_unet_folder(unet, tmp_path):
    unet[0].save_pretrained(tmp_path / "bare")
    unet[1].save_pretrained(tmp_path / "bare")  # scheduler_config.json beside config.json
    model, scheduler = load_score_model(str(tmp_path / "bare"))
    assert model.config.sample_size == 8 and scheduler.config.num_train_timesteps == 1000
    with pytest.raises(ValueError, match="expected a diffusers pipeline folder"):
        load_score_model(str(tmp_path))


def test_score_model_loads_a_pipeline_folder_in_eval_mode_with_the_same_weights(unet, tmp_path):
    DDPMPipeline(unet=unet[0], scheduler=unet[1]).save_pretrained(tmp_path / "pipe")
    model, scheduler = load_score_model(str(tmp_path / "pipe"), "cpu")
    assert not model.training and model.dtype == torch.float32
    for (name, p), q in zip(model.state_dict().items(), unet[0].state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert torch.equal(scheduler.alphas_cumprod, unet[1].alphas_cumprod)


def test_score_model_dtype_is_passed_to_from_pretrained(unet, tmp_path):
    DDPMPipeline(unet=unet[0], scheduler=unet[1]).save_pretrained(tmp_path / "pipe")
    model, _ = load_score_model(str(tmp_path / "pipe"), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in model.parameters())
    reference = unet[0].state_dict()["conv_in.weight"].to(torch.bfloat16)
    assert torch.equal(model.state_dict()["conv_in.weight"], reference)


def test_score_model_refuses_a_conditional_or_latent_model(tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel

    model = UNet2DModel(
        sample_size=8, in_channels=4, out_channels=3, block_out_channels=(8,), layers_per_block=1,
        down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=4,
    )  # fmt: skip
    model.save_pretrained(tmp_path / "odd")
    DDPMScheduler().save_pretrained(tmp_path / "odd")
    with pytest.raises(ValueError, match="not an unconditional model"):
        load_score_model(str(tmp_path / "odd"))


def test_dtype_keyword_follows_the_installed_diffusers(monkeypatch):
    import importlib.metadata

    from protect.loading import dtype_option

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.39.0")
    assert dtype_option(torch.float16) == {"torch_dtype": torch.float16}  # older models ignore ``dtype``
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.40.0")
    assert dtype_option(torch.float16) == {"dtype": torch.float16}


def test_loaders_give_the_asked_dtype_without_a_deprecation_warning(unet, tmp_path):
    """Every loader passes the dtype keyword the installed diffusers wants: the weights come back in that dtype
    and no FutureWarning about ``torch_dtype`` is raised (diffusers >= 0.40 warns on every such load)."""
    import warnings

    from apps.demo import DEMO_DIR, load_classifier, load_dit_pipeline
    from apps.services import load_pipeline, set_max_pipelines
    from protect.loading import load_vae

    DDPMPipeline(unet=unet[0], scheduler=unet[1]).save_pretrained(tmp_path / "pipe")
    if not (DEMO_DIR / "dit").is_dir():
        pytest.skip("the demo models are not in demo_models/")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        models = [
            load_score_model(str(tmp_path / "pipe"), dtype=torch.float64)[0],
            load_vae(str(DEMO_DIR / "vae"), dtype=torch.float64),
            load_classifier(dtype=torch.float64),
            load_dit_pipeline(dtype=torch.float64).transformer,
        ]
        try:
            set_max_pipelines(1)
            models.append(load_pipeline("demo/unet", "cpu", torch.float64).unet)
        finally:
            set_max_pipelines(4)
    assert [m.dtype for m in models] == [torch.float64] * len(models)
    assert not [w for w in caught if "torch_dtype" in str(w.message)]
