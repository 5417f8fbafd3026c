"""protect.purifiers: noisy upscaling, DiffPure and IMPRESS built from the caller's models (tiny random ones and the
committed demo/unet and demo/vae): bounded, known changes, shapes, seeds, errors, tiling and its cost."""

import math
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel

from protect.purifiers import (
    ADAM_STEP_BOUND,
    diffpure,
    diffpure_evaluations,
    diffpure_tile,
    impress,
    impress_round_trips,
    model_purifications,
    noisy_upscale,
    vae_roundtrip,
)
from protect.purify import Purification

DEMO = Path(__file__).resolve().parents[1] / "demo_models"


def tiny_unet(attention: bool = True, zero: bool = False, classes: int | None = None) -> UNet2DModel:
    torch.manual_seed(0)
    down = ("DownBlock2D", "AttnDownBlock2D") if attention else ("DownBlock2D", "DownBlock2D")
    up = ("AttnUpBlock2D", "UpBlock2D") if attention else ("UpBlock2D", "UpBlock2D")
    unet = UNet2DModel(
        sample_size=16,
        block_out_channels=(8, 16),
        down_block_types=down,
        up_block_types=up,
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
        add_attention=attention,
        num_class_embeds=classes,
    ).eval()
    if zero:  # eps = 0 everywhere: DiffPure's result has a closed form
        torch.nn.init.zeros_(unet.conv_out.weight)
        torch.nn.init.zeros_(unet.conv_out.bias)
    return unet


@pytest.fixture(scope="module")
def demo_unet():
    unet = UNet2DModel.from_pretrained(DEMO / "unet", subfolder="unet").eval()
    return unet, DDPMScheduler.from_pretrained(DEMO / "unet", subfolder="scheduler")


@pytest.fixture(scope="module")
def demo_vae():
    return AutoencoderKL.from_pretrained(DEMO / "vae").eval()


def photo(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth images in [0.2, 0.8] (no clipping of small changes): upsampled random colours."""
    small = torch.rand(n, 3, size // 8, size // 8, generator=torch.Generator().manual_seed(seed))
    return 0.2 + 0.6 * torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear")


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


# ----------------------------------------------------------------------------- noisy upscaling


def test_noisy_upscale_changes_a_flat_image_by_the_low_passed_noise():
    flat = torch.full((2, 3, 32, 32), 0.5)
    assert torch.allclose(noisy_upscale(flat, std=0.0), flat, atol=1e-6)  # the bicubic round trip keeps flat images
    out = noisy_upscale(flat, std=0.05, seed=1)
    assert 0.5 * 0.05 <= rms(out, flat) <= 0.05  # the noise, low-passed by the bicubic round trip
    assert abs((out - flat).mean().item()) < 0.01
    assert torch.equal(noisy_upscale(flat, std=0.05, seed=1), out) and not torch.equal(noisy_upscale(flat), out)
    assert torch.equal(noisy_upscale(flat[:1], std=0.05, seed=1), out[:1])  # image i: seed + i, whatever the batch


def test_noisy_upscale_uses_a_learned_upscaler_and_checks_its_size():
    x = photo(1, 16).double()
    calls = []

    def nearest(images):
        calls.append(images.shape)
        return torch.nn.functional.interpolate(images, scale_factor=2, mode="nearest")

    out = noisy_upscale(x, std=0.0, upscaler=nearest)
    assert calls == [x.shape] and out.dtype == torch.float64 and out.shape == x.shape
    assert rms(out, x) < 0.01  # nearest x2 then an antialiased bicubic /2: close to the input
    with pytest.raises(ValueError, match="upscaler returned"):
        noisy_upscale(x, upscaler=lambda images: images)
    with pytest.raises(ValueError, match="std must lie"):
        noisy_upscale(x, std=2.0)


# ----------------------------------------------------------------------------- DiffPure


def test_diffpure_with_a_zero_noise_predictor_matches_the_closed_form():
    """eps = 0: DDIM keeps the first clean-image estimate, x + sqrt((1 - a) / a) noise / 2 at t*, clipped."""
    unet, scheduler = tiny_unet(attention=False, zero=True), DDPMScheduler(num_train_timesteps=1000)
    x = photo(2, 24)
    out = diffpure(x, unet, scheduler, t_star=0.1, steps=5, seed=7, tile=None)
    a = scheduler.alphas_cumprod[99].double().item()
    noise = torch.cat([torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(7 + i)) for i in range(2)])
    expected = (x + math.sqrt((1 - a) / a) * noise / 2).clamp(0, 1)
    assert torch.allclose(out, expected, atol=1e-5)
    assert rms(out, x) == pytest.approx(math.sqrt((1 - a) / a) / 2, rel=0.1)  # the known amount (few clipped)


def test_diffpure_reads_the_prediction_type():
    unet, x = tiny_unet(attention=False, zero=True), photo(1, 16)
    sample = DDPMScheduler(num_train_timesteps=1000, prediction_type="sample")  # predicts x0 = 0: mid-grey
    assert torch.allclose(diffpure(x, unet, sample, steps=3), torch.full_like(x, 0.5), atol=1e-6)
    v = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")  # v = 0: x0 = sqrt(a) x_t
    a = v.alphas_cumprod[99].double().item()
    noise = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = ((math.sqrt(a) * (math.sqrt(a) * (2 * x - 1) + math.sqrt(1 - a) * noise)).clamp(-1, 1) + 1) / 2
    assert torch.allclose(diffpure(x, unet, v, steps=1), expected, atol=1e-5)  # one step: the first estimate
    with pytest.raises(ValueError, match="prediction type"):
        diffpure(x, unet, DDPMScheduler(prediction_type="flow"))


def test_diffpure_with_the_demo_unet_changes_an_image_by_a_bounded_amount(demo_unet):
    unet, scheduler = demo_unet
    x = photo(2, 32)
    out = diffpure(x, unet, scheduler, t_star=0.1, steps=5, seed=0)
    a = scheduler.alphas_cumprod[99].item()
    injected = math.sqrt((1 - a) / a) / 2  # the noise at t*, in [0, 1] units (0.17)
    assert 0.005 < rms(out, x) < 0.5 * injected  # the model removes most of the noise it was given
    assert out.shape == x.shape and out.dtype == x.dtype and 0 <= out.min() and out.max() <= 1
    assert torch.equal(diffpure(x, unet, scheduler, t_star=0.1, steps=5, seed=0), out)
    assert not torch.equal(diffpure(x, unet, scheduler, t_star=0.1, steps=5, seed=1), out)
    single = diffpure(x[1:], unet, scheduler, t_star=0.1, steps=5, seed=1)  # image 1 of the batch drew seed + 1
    assert torch.allclose(single, out[1:], atol=1e-5)


def test_diffpure_tiles_match_the_whole_image_where_both_apply(demo_unet):
    unet, scheduler = demo_unet
    assert diffpure_tile(unet) == 16 and diffpure_tile(tiny_unet(attention=False)) is None
    one_tile = photo(1, 16)
    whole = diffpure(one_tile, unet, scheduler, steps=4, tile=None)
    assert torch.allclose(diffpure(one_tile, unet, scheduler, steps=4, tile=16), whole, atol=1e-5)
    x = photo(1, 32)
    tiled, untiled = diffpure(x, unet, scheduler, steps=4), diffpure(x, unet, scheduler, steps=4, tile=None)
    assert rms(tiled, untiled) < min(0.05, 0.8 * rms(untiled, x))  # tiles vs whole: less than DiffPure's change


def test_diffpure_costs_linear_in_the_pixels():
    unet, scheduler = tiny_unet(attention=True), DDPMScheduler(num_train_timesteps=1000)
    rows = []
    unet.register_forward_hook(lambda module, args, output: rows.append(args[0].shape))
    for side in (16, 40, 64, 128):
        rows.clear()
        diffpure(torch.rand(2, 3, side, side // 2 + 8), unet, scheduler, steps=3)
        calls = sum(shape[0] for shape in rows) // 2  # per image
        assert all(shape[-2:] == (16, 16) for shape in rows)  # every call sees one 16 px tile
        assert calls == diffpure_evaluations(side, side // 2 + 8, steps=3, tile=16)
        stride = 12  # 16 - 16 // 4
        assert calls <= 3 * math.ceil(side / stride) * math.ceil((side // 2 + 8) / stride)  # linear in pixels
    assert diffpure_evaluations(1024, 1024, steps=10, tile=64) == 10 * 21 * 21


def test_diffpure_keeps_dtype_and_refuses_bad_input():
    unet, scheduler = tiny_unet(attention=False), DDPMScheduler(num_train_timesteps=1000)
    x = photo(1, 20).double()
    out = diffpure(x, unet, scheduler, steps=2)  # 20 px: padded to the UNet's multiple and cropped back
    assert out.dtype == torch.float64 and out.shape == x.shape
    for bad, match in [
        (x[0], "shape"),
        (x * 3, r"\[0, 1\]"),
        ((x * 255).byte(), "float"),
        (torch.zeros(1, 3, 4097, 4096), "pixel cap"),
    ]:
        with pytest.raises(ValueError, match=match):
            diffpure(bad, unet, scheduler)
    for options, match in [
        ({"t_star": 0.9}, "t_star"),
        ({"steps": 0}, "steps"),
        ({"steps": 101}, "steps"),
        ({"t_star": 0.005, "steps": 10}, "exceed"),
        ({"tile": 4}, "tile"),
        ({"tile": 16, "overlap": 16}, "overlap"),
    ]:
        with pytest.raises(ValueError, match=match):
            diffpure(x, unet, scheduler, **options)
    with pytest.raises(ValueError, match="unconditional"):
        diffpure(x, tiny_unet(attention=False, classes=4), scheduler)


# ----------------------------------------------------------------------------- IMPRESS


def test_impress_moves_toward_vae_consistency_within_adams_bound(demo_vae):
    x = photo(2, 32)
    steps, lr = 10, 0.005
    out = impress(x, demo_vae, steps=steps, lr=lr)
    change = (out - x).abs().max().item()
    assert 1 / 255 < change <= steps * lr * ADAM_STEP_BOUND  # the known bound: Adam's step x steps
    with torch.no_grad():
        before = (vae_roundtrip(demo_vae, x) - x).pow(2).mean()
        after = (vae_roundtrip(demo_vae, out) - out).pow(2).mean()
    assert after < 0.8 * before  # what IMPRESS optimises went down
    assert out.shape == x.shape and out.dtype == x.dtype and 0 <= out.min() and out.max() <= 1
    assert torch.equal(impress(x, demo_vae, steps=steps, lr=lr), out)  # deterministic: no random draw
    assert torch.allclose(impress(x[:1], demo_vae, steps=steps, lr=lr), out[:1], atol=1e-5)  # batch-independent


def test_impress_tiles_round_trip_one_crop_at_a_time(demo_vae):
    sizes = []
    hook = demo_vae.encoder.register_forward_hook(lambda module, args, output: sizes.append(tuple(args[0].shape)))
    try:
        out = impress(photo(1, 40), demo_vae, steps=2, tile=16)
    finally:
        hook.remove()
    assert sizes == [(1, 3, 16, 16)] * (3 * 3 * 2)  # 3 x 3 crops (the last ones overlap), per step
    assert impress_round_trips(40, 40, steps=2, tile=16) == 3 * 3 * 2 and impress_round_trips(8, 8, steps=2) == 2
    assert impress_round_trips(1024, 1024, steps=50) == 50 * 8 * 8  # linear in the pixels
    assert out.shape == (1, 3, 40, 40)
    weight_only = impress(photo(1, 16), demo_vae, steps=3, weight=1e6, lr=0.01)
    assert (weight_only - photo(1, 16)).abs().max() < 0.02  # a huge proximity weight keeps x' near x
    for options, match in [({"steps": 0}, "steps"), ({"lr": 1.0}, "lr"), ({"tile": 2}, "tile")]:
        with pytest.raises(ValueError, match=match):
            impress(photo(1, 16), demo_vae, **options)


# ----------------------------------------------------------------------------- the table


def test_model_purifications_are_fixed_entries_for_the_callers_models(demo_vae):
    unet, scheduler = tiny_unet(attention=False), DDPMScheduler(num_train_timesteps=1000)
    assert list(model_purifications()) == ["noisy_upscale"]
    table = model_purifications(vae=demo_vae, pixel_model=(unet, scheduler), impress_steps=2, diffpure_steps=2)
    assert list(table) == ["noisy_upscale", "diffpure", "impress"]
    x = photo(2, 16)
    for name, entry in table.items():
        assert isinstance(entry, Purification) and not entry.random
        y = entry(x)
        assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1 and not torch.equal(y, x)
        assert torch.equal(entry(x), y), name
        with pytest.raises(ValueError, match="takes no generator"):
            entry(x, torch.Generator())
    assert "bicubic" in table["noisy_upscale"].description and "L2" in table["impress"].description
