"""protect.amortized: the amortized (FastProtect-style) protector, its accelerate training command (protect.train)
and the ``protect --method amortized`` command."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL

from apps.demo import DEMO_DIR
from benchmarks.bench_load import free_port
from protect import AmortizedProtector, protect
from protect.amortized import multi_vae_target_loss, strength_map, target_bank, vae_signature
from protect.losses import latent
from tests.factories import tiny_vae

EPS = 8 / 255
HAS_DEMO = all((DEMO_DIR / name).is_dir() for name in ("vae", "dit", "classifier"))
demo_only = pytest.mark.skipif(not HAS_DEMO, reason="the demo models are not in demo_models/")


def _tiny_vae(seed: int = 0, blocks: int = 2) -> AutoencoderKL:
    return tiny_vae((8, 16, 16)[:blocks], seed)


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    return _tiny_vae()


@pytest.fixture(scope="module")
def protector() -> AmortizedProtector:
    torch.manual_seed(0)
    return AmortizedProtector(num_experts=3, patch_size=8, hidden=4).eval()


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (1, 3, 45, 70), (1, 3, 9, 300), (1, 3, 2, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_any_resolution_budget_and_range(protector, vae, shape, dtype):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    out, info = protector.protect(x, vae, eps=EPS)
    assert out.shape == x.shape and out.dtype == dtype
    assert (out.double() - x.double()).abs().max() <= EPS and out.min() >= 0 and out.max() <= 1
    assert (out != x).any()
    full, _ = protector.protect(x, vae, eps=EPS, min_strength=1.0)
    assert (full.double() - x.double()).abs().max() <= EPS
    assert (full.double() - x.double()).abs().mean() >= (out.double() - x.double()).abs().mean()
    weights = info["weights"]
    assert weights.shape[:2] == (shape[0], 3) and torch.allclose(weights.sum(1), torch.ones(1))
    assert info["target"].shape == (shape[0],)


def test_target_latents_are_periodic_and_cached(protector, vae):
    a = protector.target_latents(vae, 40, 24)  # stride 2, period 8 px = 4 latents
    assert a.shape == (3, 4, 20, 12)
    assert torch.equal(a[..., :4, :4], a[..., 4:8, 8:12])
    calls = []
    handle = vae.encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        assert protector.target_latents(vae, 18, 64).shape == (3, 4, 9, 32)
    finally:
        handle.remove()
    assert calls == []  # one encoded period serves every size: nothing is encoded again


def test_strength_map_spends_more_on_texture():
    flat = torch.full((1, 3, 16, 16), 0.5)
    noisy = torch.rand((1, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(strength_map(flat, 0.25, 0.08), torch.full((1, 1, 16, 16), 0.25))
    assert strength_map(noisy, 0.25, 0.08).mean() > 0.9
    assert target_bank(5, 12).shape == (5, 3, 12, 12) and target_bank(5, 12).min() >= 0


def test_save_load_round_trip(protector, vae, tmp_path):
    protector.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = AmortizedProtector.from_pretrained(str(tmp_path)).eval()
    x = torch.rand(1, 3, 20, 20, generator=torch.Generator().manual_seed(2))
    assert loaded.config.num_experts == 3 and torch.equal(loaded.targets, protector.targets)
    assert torch.equal(loaded.protect(x, vae)[0], protector.protect(x, vae)[0])
    _, report = protect(x, "amortized", vae=vae, protector=str(tmp_path))  # by folder too
    assert report.method == "amortized" and report.losses == [] and max(report.linf) <= EPS


def test_target_latents_are_cached_per_vae_object_never_by_address(monkeypatch):
    import protect.amortized

    # CPython hands a new object a freed one's address: every object "at one address" is that case, every time
    monkeypatch.setattr(protect.amortized, "id", lambda obj: 1, raising=False)
    protector = AmortizedProtector(num_experts=2, patch_size=8, gate_size=16, latent_stride=2)
    first, second = tiny_vae(seed=1), tiny_vae(seed=2)
    old = protector.target_latents(first, 16, 16).clone()
    cached = protector.target_latents(second, 16, 16)
    fresh = AmortizedProtector(num_experts=2, patch_size=8, gate_size=16, latent_stride=2)
    fresh.load_state_dict(protector.state_dict())
    torch.testing.assert_close(cached, fresh.target_latents(second, 16, 16))
    assert not torch.equal(cached, old)


def test_pickled_weights_are_never_read(protector, vae, tmp_path):
    protector.save_pretrained(tmp_path, safe_serialization=False)  # diffusion_pytorch_model.bin: a pickle
    assert not (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    for load in (
        lambda: AmortizedProtector.from_pretrained(str(tmp_path)),
        lambda: protect(torch.rand(1, 3, 16, 16), "amortized", vae=vae, protector=str(tmp_path)),
    ):
        with pytest.raises(OSError, match="safetensors"):
            load()
    with pytest.raises(ValueError, match="safetensors only"):
        AmortizedProtector.from_pretrained(str(tmp_path), use_safetensors=False)


def test_bad_configuration_and_inputs(protector):
    with pytest.raises(ValueError, match="latent"):
        protector.protect(
            torch.rand(1, 3, 16, 16), AutoencoderKL(latent_channels=8, norm_num_groups=8, block_out_channels=(8,))
        )
    with pytest.raises(ValueError, match="min_strength"):
        AmortizedProtector(min_strength=2)
    for eps in (-1, 8, 0.5):  # negative, in levels of 255 (would replace the image), above 64/255
        with pytest.raises(ValueError, match="eps is an L-infinity budget"):
            protector.protect(torch.rand(1, 3, 16, 16), _tiny_vae(), eps=eps)
    with pytest.raises(ValueError, match="min_strength"):
        protector.protect(torch.rand(1, 3, 16, 16), _tiny_vae(), min_strength=1.5)
    with pytest.raises(ValueError, match="amortized' only"):
        protect(torch.rand(1, 3, 16, 16), "photoguard", vae=_tiny_vae(), min_strength=1.0)
    with pytest.raises(ValueError, match="no denoiser"):
        protect(torch.rand(1, 3, 16, 16), "amortized", vae=_tiny_vae(), protector=protector, robust=True)


def test_multi_vae_loss_is_one_without_perturbation(vae):
    other = _tiny_vae(seed=3, blocks=3)  # a different stride: 4
    model = AmortizedProtector(num_experts=2, patch_size=8, hidden=4)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    clean = [latent(v, x) for v in (vae, other)]
    targets = [model.target_latents(v, 16, 16) for v in (vae, other)]
    weights = model.mixture_weights(vae, x)
    loss = multi_vae_target_loss([vae, other], x, clean, targets, weights)
    assert loss.shape == (2,) and torch.allclose(loss, torch.ones(2), atol=1e-5)


def test_training_command_lowers_the_loss_and_saves(tmp_path):
    from apps import train_protector as train

    vae_dir = tmp_path / "vae"
    _tiny_vae().save_pretrained(vae_dir)
    out = tmp_path / "protector"
    argv = ["--vae", str(vae_dir), "--vae", str(vae_dir), "--out", str(out), "--steps", "25", "--batch-size", "8"]
    argv += ["--size", "16", "--patch-size", "8", "--experts", "2", "--robust-prob", "0", "--lr", "0.1"]
    assert train.main(argv) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["final_loss"] < record["first_loss"] - 0.02, record
    loaded = AmortizedProtector.from_pretrained(str(out))
    assert loaded.config.trained_on == [str(vae_dir)] * 2
    assert loaded.trained_for(_tiny_vae()) is True
    with pytest.raises(SystemExit):  # never overwrite a trained protector without --overwrite
        train.main(argv)
    with pytest.raises(SystemExit):
        train.main([*argv, "--overwrite", "--eps", "0"])


def test_training_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """A run killed after its checkpoint resumes there (weights, optimiser, schedule, losses carry on) and refuses a
    checkpoint of other settings."""
    from apps import train_protector as train
    from protect import train as trainer

    vae_dir = tmp_path / "vae"
    _tiny_vae().save_pretrained(vae_dir)
    checkpoint = tmp_path / "run.pt"
    argv = ["--vae", str(vae_dir), "--steps", "12", "--batch-size", "4", "--size", "16", "--patch-size", "8"]
    argv += ["--experts", "2", "--robust-prob", "0", "--checkpoint", str(checkpoint), "--checkpoint-every", "5"]
    saved = []
    real_save = trainer.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        saved.append(state["step"])
        if state["step"] == 10:
            raise KeyboardInterrupt  # the machine goes away after the second checkpoint

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.main([*argv, "--out", str(tmp_path / "a")])
    assert saved == [5, 10] and not (tmp_path / "a" / "config.json").exists()
    state = torch.load(checkpoint, weights_only=True)
    assert state["step"] == 10 and len(state["losses"]) == 10
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    assert train.main([*argv, "--out", str(tmp_path / "a")]) == 0
    record = json.loads((tmp_path / "a" / "training.json").read_text())
    assert record["resumed_at"] == 10 and len(record["losses"]) == 12
    assert record["losses"][:10] == pytest.approx(state["losses"].tolist(), rel=1e-4)
    assert AmortizedProtector.from_pretrained(str(tmp_path / "a")).trained_for(_tiny_vae())
    with pytest.raises(ValueError, match="other settings"):
        train.main([*argv, "--size", "24", "--out", str(tmp_path / "b")])


def test_training_on_the_training_photos(tmp_path):
    """``--data photos`` trains on crops of the photo corpus's training photos, and the record says so."""
    from apps import train_protector as train
    from apps.demo.photos import HELD_OUT

    pytest.importorskip("skimage")
    vae_dir = tmp_path / "vae"
    _tiny_vae().save_pretrained(vae_dir)
    out = tmp_path / "protector"
    argv = ["--data", "photos", "--vae", str(vae_dir), "--out", str(out), "--steps", "2", "--batch-size", "2"]
    assert train.main([*argv, "--size", "16", "--patch-size", "8", "--experts", "2"]) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["data"].startswith("apps.demo.photos.PhotoStream")
    crops = train.PhotoCrops()
    batch = crops(3, torch.Generator().manual_seed(0), 24)
    assert batch.shape == (3, 3, 24, 24) and 0 <= batch.min() and batch.max() <= 1
    (stream,) = crops.streams.values()
    assert not {c.source for c in stream.last_crops} & set(HELD_OUT)


def test_library_training_command_needs_images(capsys):
    from protect import train

    with pytest.raises(SystemExit):  # protect/ knows no demo data: the images come from --images or the caller
        train.main(["--vae", "some/vae", "--out", "nowhere"])
    assert "--images is required" in capsys.readouterr().err


def test_training_command_runs_data_parallel(tmp_path):
    """What `accelerate launch` does on several GPUs, here with two CPU processes under torchrun (gloo)."""
    import os
    import subprocess
    import sys

    vae_dir = tmp_path / "vae"
    _tiny_vae().save_pretrained(vae_dir)
    out = tmp_path / "protector"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_port", str(free_port()), "-m", "apps.train_protector"]  # not the default 29500 (TIME_WAIT)
    command += ["--vae", str(vae_dir), "--out", str(out), "--steps", "3", "--batch-size", "4", "--size", "16"]
    command += ["--patch-size", "8", "--experts", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-4000:]  # the workers' traceback, if any
    record = json.loads((out / "training.json").read_text())
    assert record["processes"] == 2 and record["steps"] == 3
    AmortizedProtector.from_pretrained(str(out))


@demo_only
@pytest.mark.skipif(not (DEMO_DIR / "protector").is_dir(), reason="no trained protector in demo_models/")
def test_committed_protector_beats_noise_in_one_pass(demo):
    pipe, _, images, _ = demo
    model = AmortizedProtector.from_pretrained(str(DEMO_DIR / "protector"))
    protected, report = protect(images, "amortized", vae=pipe.vae, protector=model)
    signs = torch.randint(0, 2, images.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = (images + EPS * signs).clamp(0, 1)
    with torch.no_grad():
        clean = latent(pipe.vae, images)
        moved = (latent(pipe.vae, protected) - clean).flatten(1).norm(dim=1)
        noisy = (latent(pipe.vae, noise) - clean).flatten(1).norm(dim=1)
    assert moved.mean() > 1.5 * noisy.mean(), (moved, noisy)
    assert max(report.linf) <= EPS and min(report.psnr) > 30


@demo_only
@pytest.mark.skipif(not (DEMO_DIR / "protector").is_dir(), reason="no trained protector in demo_models/")
def test_protect_command_with_the_amortized_protector(tmp_path):
    import numpy as np
    from PIL import Image

    from apps.cli import main as cli_main

    source = tmp_path / "art.png"
    pixels = np.random.default_rng(0).integers(30, 220, (48, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(source)
    before = source.read_bytes()
    out = tmp_path / "out"
    assert cli_main(["protect", str(source), "--out", str(out), "--method", "amortized", "--device", "cpu"]) == 0
    assert source.read_bytes() == before
    (png,) = out.glob("*.png")
    protected = np.asarray(Image.open(png), dtype=int)
    assert protected.shape == pixels.shape and 0 < np.abs(protected - pixels).max() <= 8
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] is None and "protector" in report["model"] and report["failed"] == []
    tiny = tmp_path / "one.png"
    Image.new("RGB", (1, 1)).save(tiny)
    assert cli_main(["protect", str(tiny), "--out", str(out), "--method", "amortized", "--device", "cpu"]) == 2
    failed = json.loads((out / "report-1.json").read_text())["failed"]
    assert "2x2" in failed[0]["error"]


def test_protector_records_its_vaes_and_warns_on_another(vae):
    import warnings

    torch.manual_seed(0)
    unrecorded = AmortizedProtector(num_experts=2, patch_size=8, hidden=4).eval()
    recorded = AmortizedProtector(
        num_experts=2, patch_size=8, hidden=4, trained_on=("tiny",), trained_vae_signatures=(vae_signature(vae),)
    ).eval()
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    other = _tiny_vae(seed=1)
    assert recorded.trained_for(vae) is True and recorded.trained_for(other) is False
    assert unrecorded.trained_for(other) is None
    assert recorded.trained_for(_tiny_vae().to(torch.float16)) is True  # a half-precision copy is the same VAE
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recorded.protect(x, vae, eps=EPS)
        unrecorded.protect(x, other, eps=EPS)
    with pytest.warns(UserWarning, match="trained against tiny, and the VAE given is none of them"):
        recorded.protect(x, other, eps=EPS)
    with pytest.warns(UserWarning, match="untested against this VAE"):
        protect(x, "amortized", vae=other, protector=recorded, eps=EPS)


@pytest.mark.skipif(not (DEMO_DIR / "protector").is_dir(), reason="the demo protector is not in demo_models/")
def test_demo_protector_is_trained_for_both_demo_vaes_only():
    protector = AmortizedProtector.from_pretrained(str(DEMO_DIR / "protector"))
    for name in ("vae", "vae_b"):
        demo_vae = AutoencoderKL.from_pretrained(DEMO_DIR / name, use_safetensors=True, local_files_only=True)
        assert protector.trained_for(demo_vae) is True
    sd_like = tiny_vae((8, 16, 16, 16), 0)  # any other 4-channel VAE
    assert protector.trained_for(sd_like) is False


@pytest.mark.skipif(not (DEMO_DIR / "photo_protector").is_dir(), reason="the photo protector is not in demo_models/")
def test_photo_protector_is_trained_for_the_photo_vae_and_beats_noise_on_a_held_out_photo():
    """The app's default protection: one PGD step distilled into a full-resolution U-Net (no fields), recorded
    against demo/photo_vae (not photo_vae_b, not the shapes VAE), and on a native 256 px crop of a held-out photo it
    moves that VAE's latent well past same-budget random noise, within the budget."""
    from apps.demo.photos import photo
    from apps.models import load_vae

    protector = AmortizedProtector.from_pretrained(str(DEMO_DIR / "photo_protector"))
    photo_vae = load_vae("demo/photo_vae")
    assert protector.trained_for(photo_vae) is True and protector.trained_for(load_vae("demo/photo_vae_b")) is False
    shapes_vae = AutoencoderKL.from_pretrained(DEMO_DIR / "vae", use_safetensors=True, local_files_only=True)
    assert protector.trained_for(shapes_vae) is False
    assert protector.generator is not None and not protector.fields.any() and protector.lift is None
    x = (photo("coffee")[:, 100:356, 200:456][None] + 1) / 2
    protected, report = protect(x, "amortized", vae=photo_vae, protector=protector, eps=EPS)
    signs = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = (x + EPS * signs).clamp(0, 1)
    with torch.no_grad():
        clean = latent(photo_vae, x)
        moved = (latent(photo_vae, protected) - clean).norm()
        noisy = (latent(photo_vae, noise) - clean).norm()
    assert moved > 2.5 * noisy, (moved, noisy)
    assert (protected - x).abs().max() <= EPS + 1e-6 and report.psnr[0] > 30


def test_mimicry_shift_is_the_one_step_sdedit_formula():
    """With a linear noise predictor eps(z_t) = c z_t the clean estimates differ by (1 - c sqrt(1 - a)) / sqrt(a)
    times sqrt(a) (z' - z): the shift is (1 - c sqrt(1 - a))^2 mean (z' - z)^2 / mean z^2; 0 without a change;
    gradients reach the protected latents."""
    from protect.amortized import mimicry_shift
    from protect.losses import default_alphas_cumprod

    alphas = default_alphas_cumprod()
    clean = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    protected = (clean + 0.1 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))).requires_grad_()
    c = 0.5
    shift = mimicry_shift(
        lambda z_t, t: c * z_t, alphas, protected, clean, torch.Generator().manual_seed(2), (0.3, 0.3)
    )
    a = alphas[round(0.3 * (len(alphas) - 1))]
    expected = (1 - c * (1 - a).sqrt()) ** 2 * (protected - clean).pow(2).flatten(1).mean(1)
    expected = expected / clean.pow(2).flatten(1).mean(1)
    torch.testing.assert_close(shift, expected.detach(), rtol=1e-4, atol=1e-7)
    shift.sum().backward()
    assert protected.grad.abs().sum() > 0
    unchanged = mimicry_shift(lambda z_t, t: c * z_t, alphas, clean, clean, torch.Generator().manual_seed(2))
    assert torch.allclose(unchanged, torch.zeros(3), atol=1e-10)
    # in image space: the decoded estimates' mean squared difference, unnormalised (a linear "decoder" 2 z: x4)
    pixels = mimicry_shift(
        lambda z_t, t: c * z_t,
        alphas,
        protected,
        clean,
        torch.Generator().manual_seed(2),
        (0.3, 0.3),
        decode=lambda z: 2 * z,
    )
    unnormalised = (1 - c * (1 - a).sqrt()) ** 2 * (protected - clean).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(pixels, 4 * unnormalised.detach(), rtol=1e-4, atol=1e-8)


def test_training_with_a_latent_model_adds_the_mimicry_term(tmp_path):
    from diffusers import DDPMScheduler

    from apps import train_protector as train
    from tests.factories import tiny_latent_unet

    vae_dir, ldm_dir, wrong_dir = tmp_path / "vae", tmp_path / "ldm", tmp_path / "wrong"
    _tiny_vae().save_pretrained(vae_dir)
    for folder, channels in ((ldm_dir, _tiny_vae().config.latent_channels), (wrong_dir, 3)):
        tiny_latent_unet(channels).save_pretrained(folder / "unet")
        DDPMScheduler(num_train_timesteps=100).save_pretrained(folder / "scheduler")
    out = tmp_path / "protector"
    argv = ["--vae", str(vae_dir), "--out", str(out), "--steps", "3", "--batch-size", "2", "--size", "16"]
    argv += ["--patch-size", "8", "--experts", "2", "--robust-prob", "0"]
    assert train.main([*argv, "--ldm", str(ldm_dir), "--mimicry-weight", "2"]) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["ldm"] == str(ldm_dir) and record["mimicry_weight"] == 2.0 and record["mimicry_space"] == "excess"
    assert train.main([*argv, "--overwrite", "--ldm", str(ldm_dir), "--mimicry-space", "latent"]) == 0
    assert json.loads((out / "training.json").read_text())["mimicry_space"] == "latent"
    with pytest.raises(ValueError, match="3-channel latents"):
        train.main([*argv, "--overwrite", "--ldm", str(wrong_dir)])
    with pytest.raises(SystemExit):
        train.main([*argv, "--overwrite", "--ldm", str(ldm_dir), "--mimicry-weight", "-1"])


def test_perturbation_net_any_size_and_a_new_one_changes_nothing(vae):
    """The full-resolution U-Net keeps any image size (sides not a multiple of 8 included); a fresh one outputs zero,
    so adding it to a trained protector leaves its protection bit-identical until it is trained; it is saved and
    loaded with the protector."""
    from protect.amortized import PerturbationNet

    net = PerturbationNet(4)
    for shape in ((2, 3, 16, 16), (1, 3, 13, 37), (1, 3, 3, 5)):
        x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
        out = net(x)
        assert out.shape == x.shape and torch.equal(out, torch.zeros_like(out))
    torch.manual_seed(0)
    plain = AmortizedProtector(num_experts=2, patch_size=8, hidden=4).eval()
    torch.manual_seed(0)
    with_net = AmortizedProtector(num_experts=2, patch_size=8, hidden=4, generator_channels=4).eval()
    x = torch.rand(1, 3, 24, 20, generator=torch.Generator().manual_seed(1))
    assert torch.equal(plain.protect(x, vae)[0], with_net.protect(x, vae)[0])
    with torch.no_grad():
        with_net.generator.conv_out.bias.fill_(100.0)  # saturates tanh: +eps everywhere the budget allows
    out, _ = with_net.protect(x, vae, min_strength=1.0)
    assert torch.allclose(out, (x + EPS).clamp(max=1), atol=1e-6)
    with pytest.raises(ValueError, match="generator_channels"):
        AmortizedProtector(generator_channels=-1)


def test_perturbation_net_runs_large_images_in_tiles_with_the_same_output(monkeypatch):
    """Without gradients an image with a side above ``tile`` runs in tiles of ``tile`` with a ``halo`` of context:
    every tile the net sees is at most tile + 2 halo a side (bounded memory), the output equals the untiled one,
    and the halo covers the net's receptive radius, measured by the gradient of one output pixel."""
    from protect.amortized import PerturbationNet

    torch.manual_seed(0)
    net = PerturbationNet(4).eval()
    for param in net.parameters():  # a trained-like net: the output layer is not zero
        torch.nn.init.normal_(param, std=0.3)
    x = torch.rand(2, 3, 150, 237, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = net(x)
        seen = []
        hook = net.conv_in.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[-2:]))
        monkeypatch.setattr(PerturbationNet, "tile", 64)
        try:
            tiled = net(x)
        finally:
            hook.remove()
    assert len(seen) == 3 * 4 and max(max(s) for s in seen) <= 64 + 2 * net.halo
    # the app's cost model counts exactly the pixels the tiles ran on (halos included), per image
    assert sum(h * w for h, w in seen) == PerturbationNet.processed_pixels(150, 237) > 152 * 240
    monkeypatch.undo()
    assert PerturbationNet.processed_pixels(150, 237) == 152 * 240  # one pass, padded to multiples of 8
    assert tiled.shape == x.shape and torch.allclose(tiled, whole, rtol=1e-4, atol=1e-4)
    probe = torch.rand(1, 3, 128, 128, requires_grad=True)
    radius = 0
    for row, col in ((64, 64), (67, 69), (71, 71)):
        (grad,) = torch.autograd.grad(net(probe)[0, :, row, col].sum(), probe)
        where = grad.abs().sum((0, 1)).nonzero()
        radius = max(radius, (where - torch.tensor([row, col])).abs().max().item())
    assert 16 < radius <= net.halo, radius


def test_a_generator_only_protector_skips_its_zero_fields():
    """With all-zero fields the mixture of fields is skipped at inference: the perturbation is the same as the full
    computation (which training, with gradients, still runs)."""
    torch.manual_seed(0)
    protector = AmortizedProtector(num_experts=2, patch_size=8, hidden=4, residual=False, generator_channels=4)
    with torch.no_grad():
        protector.fields.zero_()
        for param in protector.generator.parameters():
            torch.nn.init.normal_(param, std=0.3)
    vae = _tiny_vae()
    x = torch.rand(1, 3, 24, 40, generator=torch.Generator().manual_seed(1))
    weights, residual = protector.analyse(vae, x)
    full = protector.perturbation(x, weights, EPS, residual)  # gradients on: the fields' mixture is computed
    with torch.no_grad():
        skipped = protector.perturbation(x, weights, EPS, residual)
    assert full.requires_grad and torch.equal(full.detach(), skipped) and skipped.abs().max() > EPS / 4


@pytest.mark.parametrize("tile", [True, False])
def test_the_fields_mixture_is_the_gate_weighted_sum_of_the_covered_fields(vae, tile):
    """``sum_k up(w_k) * cover(field_k)``, accumulated one expert at a time (never a (K, 3, H, W) tensor), equals the
    reference einsum over all experts at once, with and without gradients, and trains the fields and the gate."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    protector = AmortizedProtector(num_experts=3, patch_size=8, hidden=4, residual=False, tile=tile)
    x = torch.rand(2, 3, 20, 36, generator=torch.Generator().manual_seed(2))
    weights, _ = protector.analyse(vae, x)
    gates = F.interpolate(weights, size=(20, 36), mode="bilinear", align_corners=False)
    fields = protector.fields
    resized = F.interpolate(fields, size=(20, 36), mode="bilinear")
    covered = fields.repeat(1, 1, 3, 5)[..., :20, :36] if tile else resized
    mix = torch.einsum("nkhw,kchw->nchw", gates, covered)
    strength = strength_map(x, protector.config.min_strength, protector.config.texture_scale)
    reference = EPS * strength * mix.tanh()
    delta = protector.perturbation(x, weights, EPS)
    torch.testing.assert_close(delta, reference, rtol=1e-5, atol=1e-7)
    delta.square().sum().backward()
    assert protector.fields.grad.abs().sum() > 0 and protector.gate[0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(protector.perturbation(x, weights.detach(), EPS), reference.detach())


def test_training_warm_starts_from_a_protector_and_adds_the_net(tmp_path):
    """--init copies a trained protector's fields, gate and lift; --generator-channels adds the U-Net (trained,
    saved, reloaded); a protector of another shape is refused with a clear message; --target-weight 0 with the
    mimicry term trains on the mimicry alone."""
    from diffusers import DDPMScheduler

    from apps import train_protector as train
    from tests.factories import tiny_latent_unet

    vae_dir, ldm_dir = tmp_path / "vae", tmp_path / "ldm"
    _tiny_vae().save_pretrained(vae_dir)
    tiny_latent_unet(_tiny_vae().config.latent_channels).save_pretrained(ldm_dir / "unet")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(ldm_dir / "scheduler")
    base = ["--vae", str(vae_dir), "--steps", "2", "--batch-size", "2", "--size", "16", "--robust-prob", "0"]
    first = tmp_path / "first"
    assert train.main([*base, "--out", str(first), "--patch-size", "8", "--experts", "2"]) == 0
    source = AmortizedProtector.from_pretrained(str(first))
    second = tmp_path / "second"
    argv = [*base, "--out", str(second), "--patch-size", "8", "--experts", "2", "--init", str(first)]
    argv += ["--generator-channels", "4", "--steps", "1", "--lr", "0", "--gate-lr", "0"]  # no update: a pure copy
    assert train.main(argv) == 0
    loaded = AmortizedProtector.from_pretrained(str(second))
    assert loaded.config.generator_channels == 4 and loaded.generator is not None
    assert torch.equal(loaded.fields, source.fields)
    assert torch.equal(loaded.gate[0].weight, source.gate[0].weight)
    record = json.loads((second / "training.json").read_text())
    assert record["init"] == str(first) and record["generator_channels"] == 4
    with pytest.raises(ValueError, match="do not fit"):
        train.main([*base, "--out", str(tmp_path / "x"), "--patch-size", "8", "--experts", "3", "--init", str(first)])
    third = tmp_path / "third"
    argv = [*base, "--out", str(third), "--patch-size", "8", "--experts", "2", "--generator-channels", "4"]
    assert train.main([*argv, "--ldm", str(ldm_dir), "--target-weight", "0", "--steps", "3"]) == 0
    assert json.loads((third / "training.json").read_text())["target_weight"] == 0.0
    with pytest.raises(SystemExit):
        train.main([*argv, "--overwrite", "--target-weight", "-1"])


def test_one_step_alignment_is_minus_one_for_the_pgd_step_itself(vae):
    """-eps sign(g) at the same random start scores -1, its opposite +1, nothing 0; g is PhotoGuard's gradient."""
    from protect.amortized import one_step_alignment
    from protect.losses import default_target

    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.8 + 0.1
    target = latent(vae, default_target(16, 16)[None])
    start = (torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) * 2 - 1) * EPS
    xs = (x + start).clamp(0, 1).requires_grad_(True)
    ((latent(vae, xs) - target).pow(2).flatten(1).mean(1).sum()).backward()
    step = -EPS * xs.grad.sign()
    for delta, expected in ((step, -1.0), (-step, 1.0), (torch.zeros_like(x), 0.0)):
        score = one_step_alignment(vae, x, delta, target, torch.Generator().manual_seed(5), EPS)
        torch.testing.assert_close(score, torch.full((2,), expected), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("vaes", [1, 2])
def test_training_distils_one_pgd_step_into_the_net_alone(tmp_path, vaes):
    """--generator-only --step-weight: the U-Net alone learns to follow the PGD step on an image it sees every step
    (the alignment, averaged over the VAEs, falls well below 0), the fields stay zero, the lift is gone;
    --generator-only without a U-Net is refused."""
    import numpy as np
    from PIL import Image

    from protect import train

    images, out = tmp_path / "images", tmp_path / "distilled"
    argv = ["--out", str(out), "--steps", "60", "--batch-size", "4", "--size", "16"]
    for seed in range(vaes):
        _tiny_vae(seed).save_pretrained(tmp_path / f"vae{seed}")
        argv += ["--vae", str(tmp_path / f"vae{seed}")]
    images.mkdir()
    pixels = np.random.default_rng(0).integers(30, 220, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(images / "one.png")  # every 16 px crop is this image: its gradient is learnable
    argv += ["--patch-size", "8", "--experts", "2", "--robust-prob", "0", "--gate-lr", "0.01", "--images", str(images)]
    assert train.main([*argv, "--generator-only", "--generator-channels", "4", "--target-weight", "0",
                       "--step-weight", "1"]) == 0  # fmt: skip
    record = json.loads((out / "training.json").read_text())
    assert record["step_weight"] == 1.0 and record["generator_only"] is True
    # two random VAEs' PGD steps disagree in sign on many pixels: their average cannot be followed as closely
    assert record["final_loss"] < (-0.3 if vaes == 1 else -0.15) < record["first_loss"], record
    loaded = AmortizedProtector.from_pretrained(str(out))
    assert loaded.lift is None and torch.equal(loaded.fields, torch.zeros_like(loaded.fields))
    assert len(loaded.config.trained_vae_signatures) == vaes
    with pytest.raises(SystemExit):
        train.main([*argv, "--overwrite", "--generator-only"])


def test_training_under_purification_measures_against_the_clean_image_purified_alike():
    """P(x') and P(x) take the same purification draw (transformation and parameters), and the generator ends
    where one purification leaves it: the training's loss measures the protection, not the purification."""
    from protect.pgd import random_transform
    from protect.purify import EOT, PURIFICATIONS
    from protect.train import purified_pair

    transforms = [PURIFICATIONS[name] for name in EOT]
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 24, 24, generator=g)
    protected = (images + 4 / 255 * torch.randn(images.shape, generator=g).sign()).clamp(0, 1)
    for seed in range(12):  # every transformation is drawn at least once
        rng = torch.Generator().manual_seed(seed)
        purified, reference = purified_pair(transforms, protected, images, rng)
        alone = torch.Generator().manual_seed(seed)
        torch.testing.assert_close(purified, random_transform(transforms, protected, alone))
        assert torch.equal(rng.get_state(), alone.get_state())
        again = torch.Generator().manual_seed(seed)
        torch.testing.assert_close(reference, random_transform(transforms, images, again))
        assert not torch.equal(reference, images)  # purified, not the raw clean image


def test_the_gates_view_covers_the_image_exactly_on_the_latent_grid(protector):
    """The thumbnail's sides are multiples of the VAE's stride, so its latent grid needs no padding and the gate
    weights (and the lift), resized to the image, lie where they were computed (a padded grid was stretched over
    the image: up to ~100 px off at the bottom of a 1000x1500 photo)."""
    from protect.losses import latent, vae_stride

    vae = _tiny_vae(blocks=3)
    stride = vae_stride(vae)
    assert stride == 4
    for h, w in ((37, 37), (1000, 1500), (9, 300), (64, 40)):
        thumb = protector.thumbnail(torch.rand(1, 3, h, w), stride)
        th, tw = thumb.shape[-2:]
        assert th % stride == 0 and tw % stride == 0 and max(th, tw) <= max(protector.config.gate_size, stride)
        factor = min(1.0, protector.config.gate_size / max(h, w))
        for side, t in ((h, th), (w, tw)):  # each side: the nearest multiple of the stride (at least one cell)
            assert abs(t - side * factor) <= stride / 2 or t == stride
    small = torch.rand(2, 3, 36, 40)
    assert torch.equal(protector.thumbnail(small, stride), small)  # nothing to shrink or round
    z = latent(vae, protector.thumbnail(torch.rand(1, 3, 37, 37), stride))
    weights = protector.mixture_weights(vae, torch.rand(1, 3, 37, 37))
    assert weights.shape[-2:] == z.shape[-2:] and z.shape[-1] * stride == 36


def test_budgets_steps_weights_and_generators_are_checked_for_every_method():
    from protect import protect as protect_images
    from protect.pgd import pgd

    vae = _tiny_vae()
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"step must be a step size"):
        pgd(x, lambda v: v.flatten(1).sum(1), eps=4 / 255, step=-0.01, steps=1)
    with pytest.raises(ValueError, match="eps is an L-infinity budget"):
        pgd(x, lambda v: v.flatten(1).sum(1), eps=8, steps=1)
    with pytest.raises(ValueError, match="weight must be"):
        protect_images(x, "photoguard", vae=vae, eps=4 / 255, steps=1, weight=-1.0)
    generators = [torch.Generator().manual_seed(i) for i in range(5)]
    with pytest.raises(ValueError, match="generator"):  # 5 generators for 2 images: refused, not cut to 2
        protect_images(x, "photoguard", vae=vae, eps=4 / 255, steps=1, generator=generators)
    protected, _ = protect_images(x, "photoguard", vae=vae, eps=4 / 255, steps=1, generator=generators[:2])
    assert protected.shape == x.shape
