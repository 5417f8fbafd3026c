"""Anti-DreamBooth ASPL (protect.aspl): the rounds alternate as the paper's Algorithm 1 (the surrogate starts from
the attacker's model and learns the clean images; the attacker's model learns the perturbed ones and goes on from
there), PGD continues across rounds inside one budget, the given denoiser is never changed, LoRA fine-tunes run on
a real UNet, and bad settings are refused."""

from __future__ import annotations

import pytest
import torch

import protect.aspl as aspl_module
from protect import Finetune, protect
from protect.losses import latent
from tests.factories import tiny_vae
from tests.test_protect import TinyDenoiser

EPS = 8 / 255


@pytest.fixture(scope="module")
def vae():
    return tiny_vae((8, 16))


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _attention_unet():
    """A tiny latent UNet2DModel with self-attention (to_q, to_k, to_v, to_out: what LoRA adapts)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=4,
    ).eval()


def _weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_rounds_alternate_as_the_papers_algorithm(images, vae, monkeypatch):
    """Per round: fit(clean) from theta, then PGD, then fit(perturbed) from theta again; theta goes on from the
    perturbed fit. Recorded through the fine-tune function: what it trained on and the weights it started from."""
    fits, real_fit = [], aspl_module._fit

    def recording_fit(model, params, optimizer, z, steps, alphas, generator, chunk=None):
        start = [p.detach().clone() for p in params]
        real_fit(model, params, optimizer, z, steps, alphas, generator, chunk)
        fits.append((z.clone(), start, [p.detach().clone() for p in params]))

    monkeypatch.setattr(aspl_module, "_fit", recording_fit)
    denoiser = TinyDenoiser()
    steps = []
    out, report = protect(
        images,
        "aspl",
        vae=vae,
        denoiser=denoiser,
        steps=5,
        finetune=Finetune(steps=2, pgd_steps=2, lr=1e-2),
        generator=torch.Generator().manual_seed(3),
        on_step=lambda s: steps.append(s.step),
    )
    assert len(fits) == 6 and len(report.losses) == 5 and steps == [0, 1, 2, 3, 4, 5]  # rounds of 2, 2, 1 steps
    with torch.no_grad():
        clean, protected = latent(vae, images), latent(vae, out)
    theta = [p.detach().clone() for p in denoiser.parameters()]
    for r in range(3):
        (z_clean, start_clean, _), (z_pert, start_pert, end_pert) = fits[2 * r], fits[2 * r + 1]
        torch.testing.assert_close(z_clean, clean)  # the surrogate learns the clean images
        assert not torch.allclose(z_pert, clean)  # the attacker's model learns the perturbed ones
        for a, b, c in zip(start_clean, start_pert, theta):
            torch.testing.assert_close(a, c)  # both start from the attacker's model
            torch.testing.assert_close(b, c)
        theta = end_pert
    torch.testing.assert_close(fits[-1][0], protected)  # the last fit saw the images returned


def test_the_given_denoiser_is_not_changed(images, vae):
    denoiser = TinyDenoiser()
    before, flags = _weights(denoiser), [p.requires_grad for p in denoiser.parameters()]
    out, _ = protect(images, "aspl", vae=vae, denoiser=denoiser, steps=3, finetune=Finetune(lr=1e-2))
    after = _weights(denoiser)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in denoiser.parameters()] == flags and denoiser.training
    assert (out - images).abs().max() <= EPS + 1e-7 and (out - images).abs().max() > EPS / 4


def test_fine_tuning_changes_the_attack(images, vae):
    """The same draws with a learning rate that moves the surrogate: a different perturbation (the PGD really
    attacks the fine-tuned model, not the given one)."""
    runs = {
        lr: protect(
            images,
            "aspl",
            vae=vae,
            denoiser=TinyDenoiser(),
            steps=6,
            finetune=Finetune(steps=3, pgd_steps=2, lr=lr),
            generator=torch.Generator().manual_seed(5),
        )[0]
        for lr in (1e-12, 1e-1)
    }
    assert not torch.equal(runs[1e-12], runs[1e-1])


def test_lora_fine_tunes_a_unet(images, vae):
    unet = _attention_unet()
    before = _weights(unet)
    out, report = protect(
        images, "aspl", vae=vae, denoiser=unet, steps=4, finetune=Finetune(rank=2, lr=1e-3, pgd_steps=2)
    )
    assert len(report.losses) == 4 and (out - images).abs().max() <= EPS + 1e-7
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert not any("lora" in name for name, _ in unet.named_parameters())


def test_with_tiles_the_set_is_the_crops_and_the_work_is_chunked(vae, monkeypatch):
    """``tile``: every fine-tune trains on all the crops of all the images (tile-major), the PGD loss is the mean
    over each image's crops, and no denoiser call sees more than TILE_BATCH crops per image; an image too large
    for whole-image ASPL is protected in tiles."""
    from protect.tiling import TILE_BATCH, tiles

    images = torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(1))
    fits, sizes, real_fit, real_loss = [], [], aspl_module._fit, aspl_module.denoising_loss

    def recording_fit(model, params, optimizer, z, steps, alphas, generator, chunk=None):
        fits.append((z.clone(), chunk))
        real_fit(model, params, optimizer, z, steps, alphas, generator, chunk)

    def recording_loss(model, z, **kwargs):
        sizes.append(z.shape[0])
        return real_loss(model, z, **kwargs)

    monkeypatch.setattr(aspl_module, "_fit", recording_fit)
    monkeypatch.setattr(aspl_module, "denoising_loss", recording_loss)
    monkeypatch.setattr(aspl_module, "MAX_PIXELS", 32 * 32)  # 48 x 40 is "too large" for whole images now
    options = {"vae": vae, "denoiser": TinyDenoiser(), "steps": 2, "finetune": Finetune(steps=2, pgd_steps=2)}
    with pytest.raises(ValueError, match="resize the images"):
        protect(images, "aspl", **options)
    gens = [torch.Generator().manual_seed(s) for s in (4, 5)]
    out, report = protect(images, "aspl", tile=16, generator=gens, **options)
    crops = tiles(images, 16)  # 3 x 3 crops of each image (the last row and column overlap)
    assert crops.shape[0] == 18 and len(fits) == 2 and len(report.losses) == 2
    with torch.no_grad():
        torch.testing.assert_close(fits[0][0], latent(vae, crops))  # the surrogate learns the clean crops
    assert fits[0][1] == TILE_BATCH * 2 and max(sizes) <= TILE_BATCH * 2 and sizes.count(18) == 0
    assert (out - images).abs().max() <= EPS + 1e-7 and (out - images).abs().max() > EPS / 4
    again, _ = protect(images, "aspl", tile=16, generator=[torch.Generator().manual_seed(s) for s in (4, 5)], **options)
    assert torch.equal(out, again)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"denoiser": lambda z, t: z}, ValueError, "nn.Module"),
        ({"target": "zero"}, ValueError, "no target"),
        ({"method": "photoguard", "denoiser": None}, ValueError, "finetune applies to method 'aspl' only"),
        ({"finetune": Finetune(rank=2)}, ValueError, "LoRA target modules"),
        ({"denoiser": None}, ValueError, "needs a denoiser"),
        ({"images": torch.zeros(1, 3, 1, 1).expand(1, 3, 1025, 1024)}, ValueError, "resize the images"),
    ],
)
def test_bad_settings_are_refused(images, vae, kwargs, error, match):
    options = {"method": "aspl", "denoiser": TinyDenoiser(), "steps": 1, "finetune": Finetune()} | kwargs
    with pytest.raises(error, match=match):
        protect(options.pop("images", images), vae=vae, **options)


@pytest.mark.parametrize(
    "settings",
    [{"steps": 0}, {"pgd_steps": 1.5}, {"lr": 0.0}, {"lr": float("nan")}, {"rank": 0}, {"rank": True}],
)
def test_finetune_settings_are_checked(settings):
    with pytest.raises(ValueError, match="Finetune"):
        Finetune(**settings)


def test_a_half_precision_denoiser_is_fine_tuned_in_float32_on_a_copy(images, vae):
    denoiser = TinyDenoiser().to(torch.bfloat16)
    out, report = protect(images, "aspl", vae=vae, denoiser=denoiser, steps=2, finetune=Finetune(lr=1e-2))
    assert {p.dtype for p in denoiser.parameters()} == {torch.bfloat16}
    assert (out - images).abs().max() <= EPS + 1e-7 and torch.isfinite(torch.tensor(report.losses)).all()


def test_lora_runs_reproduce_from_the_generator(images, vae):
    """The LoRA adapters' init comes from the generator, not from torch's global one."""
    unet = _attention_unet()
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        out, _ = protect(
            images, "aspl", vae=vae, denoiser=unet, steps=2, finetune=Finetune(rank=2, lr=1e-2, pgd_steps=2),
            generator=torch.Generator().manual_seed(4),
        )  # fmt: skip
        runs.append(out)
    assert torch.equal(*runs)
