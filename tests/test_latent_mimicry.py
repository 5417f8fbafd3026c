"""SDEdit through an unconditional latent model (the photo mimicry) and classifier-free mimic scoring."""

import pytest
import torch
from diffusers import DDPMScheduler

from protect.evaluate import evaluate, sdedit_unconditional, unet_denoiser, worst_case
from protect.losses import latent
from protect.metrics import psnr_ssim
from tests.factories import tiny_latent_unet, tiny_vae


def test_unet_denoiser_pads_odd_latents_and_crops_back():
    unet = tiny_latent_unet(scale=0.1)
    eps = unet_denoiser(unet)
    z = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500])
    out = eps(z, t)
    assert out.shape == z.shape and out.dtype == torch.float32
    padded = torch.nn.functional.pad(z, (0, 1, 0, 1), mode="replicate")
    with torch.no_grad():
        expected = unet(padded, t).sample[..., :5, :7]
    torch.testing.assert_close(out.detach(), expected)
    assert eps(z, torch.tensor(10)).shape == z.shape  # a scalar timestep broadcasts


def test_sdedit_unconditional_matches_the_ddim_formula():
    """With the zero predictor and one DDIM step from t to the clean end, the edit is decode((z_t) / sqrt(a_t)):
    z0 + sqrt((1 - a_t) / a_t) * noise, decoded."""
    vae, unet = tiny_vae(), tiny_latent_unet(scale=0.0)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    images = torch.rand(2, 3, 10, 14, generator=torch.Generator().manual_seed(2))
    generators = [torch.Generator().manual_seed(5 + i) for i in range(2)]
    out = sdedit_unconditional(vae, unet, scheduler, images, strength=0.05, steps=20, generator=generators)
    assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1
    z0 = latent(vae, images)
    noise = torch.cat(
        [torch.randn((1, *z0.shape[1:]), generator=torch.Generator().manual_seed(5 + i)) for i in range(2)]
    )
    t = 49  # trailing spacing of 20 steps over 1000: the last timestep
    a = scheduler.alphas_cumprod[t]
    z = z0 + ((1 - a) / a).sqrt() * noise
    with torch.no_grad():
        decoded = vae.decode(z / vae.config.scaling_factor).sample
    expected = ((decoded + 1) / 2).clamp(0, 1)[..., :10, :14]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    again = sdedit_unconditional(
        vae,
        unet,
        scheduler,
        images,
        strength=0.05,
        steps=20,
        generator=[torch.Generator().manual_seed(5 + i) for i in range(2)],
    )
    torch.testing.assert_close(again, out)  # deterministic given the seeds (DDIM, not DDPM's fresh noise)
    with pytest.raises(ValueError, match="strength"):
        sdedit_unconditional(vae, unet, scheduler, images, strength=0.0)


def test_evaluate_scores_mimics_without_a_classifier():
    """Photos have no classes: each mimic is scored by PSNR/SSIM of its output to the clean image's mimicry."""
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(3, 3, 16, 16, generator=g)
    protected = {"p": (clean + 0.03 * torch.randn(clean.shape, generator=g)).clamp(0, 1)}
    rows = evaluate(
        clean, protected, mimics={"identity": lambda x: x}, purifications=("none", "blur1"), noise_eps=4 / 255
    )
    by = {(r["protection"], r["purification"]): r for r in rows}
    assert by[("clean", "none")]["identity_ssim_to_clean"] == pytest.approx(1.0)
    psnrs, ssims = psnr_ssim(clean, protected["p"])
    assert by[("p", "none")]["identity_psnr_to_clean"] == pytest.approx(sum(psnrs) / 3, rel=1e-5)
    assert by[("p", "none")]["identity_ssim_to_clean"] == pytest.approx(sum(ssims) / 3, rel=1e-5)
    assert "identity_accuracy" not in by[("p", "none")]
    worst = {w["protection"]: w for w in worst_case(rows, "identity_ssim_to_clean")}
    values = {pur: by[("p", pur)]["identity_ssim_to_clean"] for pur in ("none", "blur1")}
    assert values["none"] != values["blur1"]
    assert worst["p"]["value"] == max(values.values())  # the least damage: the mimicry closest to the clean one
    with pytest.raises(ValueError, match="both classifier= and labels"):
        evaluate(clean, protected, torch.zeros(3), mimics={"identity": lambda x: x}, purifications=("none",))
