"""Per-image protections (PhotoGuard, Mist, Diff-Protect SDS+/SDS-) and their batched PGD, on tiny 32x32 images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from apps.demo import DEMO_DIR
from protect.amortized import AmortizedProtector
from protect.losses import encoder_loss, latent, multi_vae_loss, sds_loss
from protect.pgd import pgd
from protect.protect import METHODS, ProtectionReport, default_target, protect
from tests.factories import peak_rss_growth, tiny_vae

EPS = 8 / 255


def _tiny_vae(seed: int = 0) -> AutoencoderKL:
    return tiny_vae((8, 16), seed)


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    if (DEMO_DIR / "vae").is_dir():
        from apps.demo import load_vae

        return load_vae()
    return _tiny_vae()


class TinyDenoiser(torch.nn.Module):
    """eps(z_t, t): a 3x3 convolution scaled by the timestep (an ``nn.Module``: ASPL fine-tunes it)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv(z_t) * (1 + t.view(-1, 1, 1, 1) / 1000)


@pytest.fixture(scope="module")
def denoiser():
    return TinyDenoiser()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    from apps.demo import generate

    return (generate(2, torch.Generator().manual_seed(0))[0] + 1) / 2


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def protector() -> AmortizedProtector:
    torch.manual_seed(0)
    return AmortizedProtector(num_experts=3, patch_size=8, hidden=4).eval()


def _run(images, vae, denoiser, method, protector=None, **kwargs):
    kwargs.setdefault("steps", 4)
    if method == "amortized":
        for key in ("step", "robust"):
            kwargs.pop(key, None)
        return protect(images, method, vae=vae, protector=protector, **kwargs)
    return protect(images, method, vae=vae, denoiser=denoiser if method != "photoguard" else None, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_budget_and_range_hold_exactly(images, vae, denoiser, protector, method, dtype):
    x = images.to(dtype)
    out, report = _run(x, vae, denoiser, method, protector, generator=_gen(), step=EPS)  # big steps: the faces
    assert out.dtype == dtype and out.shape == x.shape
    assert (out.double() - x.double()).abs().max() <= EPS
    assert out.min() >= 0 and out.max() <= 1
    assert isinstance(report, ProtectionReport) and len(report.psnr) == len(report.ssim) == 2
    assert all(0 < v <= EPS for v in report.linf) and len(report.losses) == (0 if method == "amortized" else 4)


@pytest.mark.parametrize("method", ["photoguard", "mist"])
def test_loss_decreases(images, vae, denoiser, method):
    extra = {"denoiser": denoiser} if method == "mist" else {}
    _, report = protect(images, method, vae=vae, steps=15, generator=_gen(), **extra)
    first, last = np.mean(report.losses[0]), np.mean(report.losses[-1])
    assert last < 0.9 * first, report.losses


def test_protection_moves_latent_far_more_than_noise(images, vae):
    out, _ = protect(images, "photoguard", vae=vae, steps=15, generator=_gen())
    noise = (images + EPS * torch.randn(images.shape, generator=_gen(1)).sign()).clamp(0, 1)
    with torch.no_grad():
        clean = latent(vae, images)
        moved = (latent(vae, out) - clean).pow(2).flatten(1).mean(1)
        noisy = (latent(vae, noise) - clean).pow(2).flatten(1).mean(1)
    assert (moved > 3 * noisy).all(), (moved, noisy)


@pytest.mark.parametrize("method", METHODS)
def test_seeded_runs_reproduce(images, vae, denoiser, protector, method):
    a, _ = _run(images, vae, denoiser, method, protector, steps=3, generator=_gen(7), robust=True)
    b, _ = _run(images, vae, denoiser, method, protector, steps=3, generator=_gen(7), robust=True)
    c, _ = _run(images, vae, denoiser, method, protector, steps=3, generator=_gen(8), robust=True)
    assert torch.equal(a, b) and torch.equal(a, c) == (method == "amortized")  # amortized: no randomness


@pytest.mark.parametrize("method", ["photoguard", "mist", "sds", "sds-"])
def test_per_image_generators_make_results_batch_independent(images, vae, denoiser, method):
    both, _ = _run(images, vae, denoiser, method, steps=3, generator=[_gen(3), _gen(4)], robust=True)
    second, _ = _run(images[1:], vae, denoiser, method, steps=3, generator=[_gen(4)], robust=True)
    assert torch.allclose(both[1:], second, atol=1e-6)
    with pytest.raises(ValueError, match="one per image"):
        _run(images, vae, denoiser, method, steps=1, generator=[_gen(3)])


def test_sds_gradient_is_the_score_distillation_formula(images, vae, denoiser):
    """Diff-Protect's SDS gradient (Xue et al. 2024, the official ``pgd_sds``): ``J_E(x)^T (eps_hat(z_t, t) - eps)``
    with the denoiser's Jacobian skipped, for the same t and eps draws; SDS+ (ascent) minimises its negative, SDS-
    the formula itself, and the value is the per-image denoising loss."""
    from protect.losses import default_alphas_cumprod

    x = images.clone().requires_grad_(True)
    z = latent(vae, x)
    generator = _gen(5)
    t = torch.randint(1000, (2,), generator=generator)
    eps = torch.randn(z.shape, generator=generator)
    a = default_alphas_cumprod()[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        residual = denoiser(a.sqrt() * z + (1 - a).sqrt() * eps, t) - eps
    (reference,) = torch.autograd.grad((z * residual).sum(), x)
    for ascent, sign in ((False, 1), (True, -1)):
        x = images.clone().requires_grad_(True)
        value = sds_loss(vae, denoiser, x, ascent=ascent, generator=_gen(5))
        (grad,) = torch.autograd.grad(value.sum(), x)
        torch.testing.assert_close(grad, sign * reference, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(value, sign * residual.pow(2).flatten(1).mean(1))


@pytest.mark.parametrize("method", ["sds", "sds-"])
def test_sds_methods_run_pgd_on_their_direction(images, vae, denoiser, method):
    """``protect(method="sds-")`` is PGD on the SDS- loss and "sds" on SDS+: the same draws, opposite steps."""
    from functools import partial

    out, report = protect(images, method, vae=vae, denoiser=denoiser, steps=2, generator=_gen(2))
    generator = _gen(2)  # one stream for the start and the loss's draws, as protect() shares it
    loss = partial(sds_loss, vae, denoiser, ascent=method == "sds", generator=generator)
    expected = pgd(images, loss, eps=EPS, steps=2, generator=generator)
    assert report.method == method and torch.equal(out, expected)


def test_losses_are_per_image(images, vae, denoiser):
    assert encoder_loss(vae, images).shape == (2,)
    assert torch.allclose(multi_vae_loss([vae, vae], images), 2 * encoder_loss(vae, images))
    assert sds_loss(vae, denoiser, images, generator=_gen()).shape == (2,)
    with pytest.raises(ValueError, match="target latents"):
        multi_vae_loss([vae], images, [None, None])


@pytest.mark.parametrize(
    ("images", "kwargs", "match"),
    [
        (torch.rand(3, 32, 32), {}, "shape"),
        (torch.rand(1, 4, 32, 32), {}, "shape"),
        (torch.rand(1, 3, 1, 1), {}, "2x2"),
        (torch.rand(1, 3, 32, 32) * 2, {}, r"\[0, 1\]"),
        (torch.full((1, 3, 32, 32), float("nan")), {}, "NaN"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), {}, "float"),
        (torch.zeros(1, 3, 1, 1).expand(1, 3, 4097, 4096), {}, "cap"),
        (torch.rand(1, 3, 32, 32), {"method": "glaze"}, "unknown method"),
        (torch.rand(1, 3, 32, 32), {"eps": 2.0}, r"eps=8/255"),
        (torch.rand(1, 3, 32, 32), {"eps": 65 / 255}, "L-infinity budget"),
        (torch.rand(1, 3, 32, 32), {"eps": 0.0}, "L-infinity budget"),
        (torch.rand(1, 3, 32, 32), {"eps": -1 / 255}, "L-infinity budget"),
        (torch.rand(1, 3, 32, 32), {"eps": float("nan")}, "L-infinity budget"),
        (torch.rand(1, 3, 32, 32), {"method": "amortized", "eps": 2.0}, "L-infinity budget"),
        (torch.rand(1, 3, 32, 32), {"method": "sds"}, "denoiser"),
        (torch.rand(1, 3, 32, 32), {"method": "sds-"}, "'sds-' needs a denoiser"),
        (torch.rand(1, 3, 32, 32), {"method": "mist"}, "needs a denoiser"),
        (torch.rand(1, 3, 32, 32), {"target": "noise"}, "unknown target"),
        (torch.rand(1, 3, 32, 32), {"weight": 2.0}, "weight"),
        (torch.rand(1, 3, 32, 32), {"robust": ("sharpen",)}, "transforms"),
        (torch.rand(1, 3, 32, 32), {"method": "amortized"}, "needs protector"),
        ("image.png", {}, "tensor or a list"),
    ],
)
def test_bad_inputs_raise(vae, images, kwargs, match):
    with pytest.raises(ValueError, match=match):
        protect(images, vae=vae, steps=1, **kwargs)


def test_pil_round_trip_keeps_size_mode_and_budget(images, vae):
    pil = [Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for x in images]
    out, report = protect(pil, vae=vae, steps=3, generator=_gen())
    assert [(im.size, im.mode) for im in out] == [(im.size, im.mode) for im in pil]
    for a, b in zip(out, pil):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 8
    assert max(report.linf) <= EPS


def test_rgba_inputs_keep_their_alpha(vae):
    source = Image.new("RGBA", (32, 32), (200, 10, 10, 128))
    out, _ = protect([source], vae=vae, steps=1, generator=_gen())
    assert out[0].mode == "RGBA" and out[0].getchannel("A").getextrema() == (128, 128)
    change = np.abs(np.asarray(out[0], dtype=int)[..., :3] - np.asarray(source, dtype=int)[..., :3]).max()
    assert change <= 8  # every stored colour within the 8/255 budget


def test_pgd_without_random_start_or_steps_is_identity(images):
    out = pgd(images, lambda x: x.flatten(1).sum(1), steps=0, random_start=False)
    assert torch.equal(out, images)
    assert default_target(32, 32).shape == (3, 32, 32)


def test_tiles_cover_the_image_tile_major():
    from protect.protect import tiles

    x = torch.arange(2 * 10 * 7, dtype=torch.float32).view(2, 1, 10, 7)
    crops = tiles(x, 4)  # rows at 0, 4, 6 (the last overlaps), columns at 0, 3
    assert crops.shape == (6 * 2, 1, 4, 4)
    assert torch.equal(crops[2 * 5 + 1], x[1, :, 6:10, 3:7]) and torch.equal(crops[2 * 2], x[0, :, 4:8, 0:4])
    assert torch.equal(tiles(x, 16), x)  # larger than the image: the image itself


def test_tiled_attack_never_encodes_more_than_a_tile(images, vae):
    sizes = []
    hook = vae.encoder.register_forward_pre_hook(lambda module, args: sizes.append(tuple(args[0].shape[-2:])))
    try:
        big = torch.nn.functional.interpolate(images, scale_factor=2, mode="nearest")  # 2 x 64 x 64
        out, report = protect(big, "photoguard", vae=vae, steps=6, generator=_gen(), tile=16)
    finally:
        hook.remove()
    assert set(sizes) == {(16, 16)}  # the target's tiles and every PGD step: cost in proportion to the pixels
    assert (out - big).abs().max() <= EPS and np.mean(report.losses[-1]) < np.mean(report.losses[0])
    whole, _ = protect(images, "photoguard", vae=vae, steps=2, generator=_gen())
    one_tile, _ = protect(images, "photoguard", vae=vae, steps=2, generator=_gen(), tile=64)
    assert torch.equal(whole, one_tile)
    with pytest.raises(ValueError, match="tile must be"):
        protect(images, "photoguard", vae=vae, steps=1, tile=4)


@pytest.mark.parametrize("method", ["mist", "sds", "sds-"])
def test_tiled_attacks_stay_batch_independent(images, vae, denoiser, method):
    both, _ = _run(images, vae, denoiser, method, steps=2, generator=[_gen(3), _gen(4)], tile=16)
    second, _ = _run(images[1:], vae, denoiser, method, steps=2, generator=[_gen(4)], tile=16)
    assert torch.allclose(both[1:], second, atol=1e-6)


def test_on_step_reports_progress_and_cancels(images, vae, protector):
    from protect.protect import Cancelled, Step

    seen: list[Step] = []
    protect(images, "photoguard", vae=vae, steps=3, generator=_gen(), on_step=seen.append)
    assert [(s.step, s.total) for s in seen] == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert seen[0].loss is None and seen[1].loss.shape == (2,) and seen[-1].eta == 0
    assert [s.elapsed for s in seen] == sorted(s.elapsed for s in seen)
    calls = []
    with pytest.raises(Cancelled, match="after 2 of 50"):
        protect(images, "photoguard", vae=vae, steps=50, on_step=lambda s: calls.append(s.step) or s.step < 2)
    assert calls == [0, 1, 2]  # stopped at the step it was told, not at the end

    def stop(step):
        raise Cancelled("client gone")

    with pytest.raises(Cancelled, match="client gone"):
        protect(images, "photoguard", vae=vae, steps=5, on_step=stop)
    seen.clear()
    protect(images, "amortized", vae=vae, protector=protector, on_step=seen.append)
    assert [(s.step, s.total) for s in seen] == [(0, 1), (1, 1)]


def test_sizes_are_reported_width_by_height(vae):
    with pytest.raises(ValueError, match=r"got 3x1 \(width x height\)"):
        protect(torch.rand(1, 3, 1, 3), "photoguard", vae=vae, steps=1)


def test_a_2048_photo_is_protected_within_the_budget_in_bounded_memory(protector):
    """PhotoGuard on a 2048x2048 photo (1 step) encodes at most TILE_BATCH tiles at a time, so its activation
    memory is that of 4 tiles whatever the image size, keeps the L-inf budget exactly, and the process's peak memory
    grows by less than 2 GB (~1.1 GB here: image-sized buffers; all 64 tiles in one pass took ~3.4 GB more); the
    amortized protector runs on it in one pass within the budget, with a full-resolution U-Net in bounded memory."""
    from apps.demo.photos import photo
    from apps.demo.train_photo import make_photo_vae, seeded
    from protect.protect import TILE_BATCH

    vae = seeded(0, make_photo_vae).eval()  # the photo demo VAE's design (stride 8, attention-free), random weights
    image = torch.nn.functional.interpolate((photo("astronaut")[None] + 1) / 2, size=(2048, 2048), mode="bilinear")
    image = image.clamp(0, 1)
    shapes = []
    hook = vae.encoder.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    try:
        with peak_rss_growth() as growth:
            out, report = protect(image, "photoguard", vae=vae, steps=1, generator=_gen(), tile=256)
    finally:
        hook.remove()
    assert {s[1:] for s in shapes} == {(3, 256, 256)} and max(s[0] for s in shapes) == TILE_BATCH
    assert sum(s[0] for s in shapes) == 2 * 64  # the target's 64 tiles, then one step over the 64 tiles
    assert out.shape == image.shape and (out - image).abs().max() <= EPS + 1e-7 and report.linf[0] <= EPS + 1e-7
    assert (out - image).abs().max() > EPS / 2  # it did spend the budget
    assert growth[0] < 2e9, f"peak memory grew by {growth[0] / 1e6:.0f} MB"
    amortized, report = protect(image, "amortized", vae=vae, protector=protector)
    assert amortized.shape == image.shape and (amortized - image).abs().max() <= EPS + 1e-7
    torch.manual_seed(0)  # the default protector's design: a 16-channel full-resolution U-Net, run in 1024 px tiles
    with_net = AmortizedProtector(num_experts=3, patch_size=8, hidden=4, generator_channels=16).eval()
    protect(image[..., :64, :64], "amortized", vae=vae, protector=with_net)  # warm-up
    with peak_rss_growth() as growth:
        amortized, report = protect(image, "amortized", vae=vae, protector=with_net)
    assert amortized.shape == image.shape and (amortized - image).abs().max() <= EPS + 1e-7
    assert growth[0] < 1.2e9, f"peak memory grew by {growth[0] / 1e6:.0f} MB"  # ~0.8 GB; 1.8 GB untiled
