"""apps/cli.py, the ``steerguard`` command: one runner per subcommand, and its output and input checks (an
``--out`` that names a file is refused before any work, and a folder given as an input is reported as a folder,
not as a missing file)."""

from __future__ import annotations

import pytest
from PIL import Image

from apps import files, services
from apps.cli import RUNNERS, build_parser
from apps.cli import main as cli_main
from apps.cost import Costs
from protect import AMORTIZED_BUDGETS


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the CLI starts protecting or loading a pipeline."""

    def refuse(*args, **kwargs):
        raise AssertionError("the CLI started working before checking --out")

    monkeypatch.setattr(services, "protect_image", refuse)
    monkeypatch.setattr(services, "load_pipeline", refuse)


@pytest.mark.parametrize("command", [["protect", "IMAGE"], ["generate", "star"]])
def test_out_naming_a_file_is_refused_before_working(tmp_path, capsys, no_work, command):
    image = tmp_path / "a.png"
    Image.new("RGB", (16, 16)).save(image)
    existing = tmp_path / "report.txt"
    existing.write_text("keep me")
    argv = [str(image) if a == "IMAGE" else a for a in command]
    assert cli_main([*argv, "--out", str(existing)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert existing.read_text() == "keep me"
    assert cli_main([*argv, "--out", str(existing / "sub")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_a_folder_as_input_is_reported_as_a_folder(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    with pytest.raises(ValueError, match="photos: is a folder, not an image file"):
        files.open_upload(folder)
    with pytest.raises(ValueError, match=r"missing\.png: no such file"):
        files.open_upload(tmp_path / "missing.png")
    assert cli_main(["protect", str(folder), "--out", str(tmp_path / "o"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "is a folder" in err and "no such file" not in err


def test_mist_and_sds_use_the_photo_latent_model_or_refuse(tmp_path, capsys, monkeypatch):
    """Mist without a denoiser was byte-identical to PhotoGuard: the app and the CLI pass the photo latent model
    (the latent diffusion model on the photo VAE) as Mist's semantic part and SDS's model, at any size (tiled),
    and refuse with a clear message when it is missing. Every PGD method of the app has a measured cost."""
    import numpy as np

    from apps.demo import DEMO_DIR

    if not all((DEMO_DIR / name).is_dir() for name in ("photo_vae", "photo_ldm")):
        pytest.skip("the photo VAE and latent model are not in demo_models/")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    kwargs = {"eps": 8 / 255, "steps": 2, "seed": 0, "device": "cpu", "survival": False}
    mist, _ = services.protect_image(image, method="mist", **kwargs)
    photoguard, _ = services.protect_image(image, method="photoguard", **kwargs)
    sds, metrics = services.protect_image(image, method="sds", **kwargs)
    assert not np.array_equal(np.asarray(mist), np.asarray(photoguard))
    assert not np.array_equal(np.asarray(sds), np.asarray(mist)) and 0 < metrics["linf_255"] <= 8
    costs = services.calibrate(Costs("cpu"), device="cpu", tile=32, preview=False)
    pgd = [m for m in services.PROTECT_METHODS if m not in AMORTIZED_BUDGETS]
    assert all(costs[f"pgd_pixel_step:{m}"] > 0 for m in pgd) and {"sds", "aspl"} <= set(pgd)
    assert costs["aspl_finetune_pixel"] > 0
    monkeypatch.setattr(services, "PROTECT_LDM", "demo/no_such_model")
    for method in services.LATENT_METHODS:
        with pytest.raises(ValueError, match="mist, sds, aspl and the mimicry preview need the latent diffusion model"):
            services.protect_image(image, method=method, **kwargs)
    path = tmp_path / "art.png"
    image.save(path)
    argv = ["protect", str(path), "--method", "mist", "--out", str(tmp_path / "o"), "--steps", "1"]
    assert cli_main([*argv, "--device", "cpu"]) == 2
    assert "need the latent diffusion model demo/no_such_model" in capsys.readouterr().err


def test_amortized_full_spends_the_whole_budget_in_the_app_and_the_cli(tmp_path):
    """ "amortized-full" is the photo protector at min_strength 1: on a photo with flat regions it spends the full
    budget there too, so its PSNR is lower than the texture-weighted default's, both within the budget; the CLI
    takes it and reports it as one pass (no steps, no seed)."""
    import json

    import numpy as np

    from apps.demo import DEMO_DIR
    from apps.demo.photos import photo

    if not all((DEMO_DIR / name).is_dir() for name in ("photo_vae", "photo_protector")):
        pytest.skip("the photo VAE and protector are not in demo_models/")
    crop = ((photo("camera")[:, :96, :128] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    image = Image.fromarray(np.ascontiguousarray(crop)).convert("RGB")  # sky: flat, then texture
    kwargs = {"eps": 8 / 255, "device": "cpu", "survival": False}
    _, weighted = services.protect_image(image, method="amortized", **kwargs)
    full_image, full = services.protect_image(image, method="amortized-full", **kwargs)
    assert full["psnr"] < weighted["psnr"] - 1 and weighted["linf_255"] <= 8 and full["linf_255"] <= 8
    flat = np.abs(np.asarray(full_image, dtype=int) - np.asarray(image, dtype=int))[:20]  # the sky rows
    assert np.mean(flat >= 7) > 0.5  # the full budget (rounded to 8-bit) on most flat pixels
    path = tmp_path / "art.png"
    image.save(path)
    argv = ["protect", str(path), "--method", "amortized-full", "--out", str(tmp_path / "o"), "--device", "cpu"]
    assert cli_main(argv) == 0
    (report_path,) = (tmp_path / "o").glob("*.json")
    report = json.loads(report_path.read_text())
    assert report["method"] == "amortized-full" and report["steps"] is None and report["seed"] is None
    assert "amortized protector" in report["model"]


def test_every_subcommand_has_its_runner_in_order():
    assert list(RUNNERS) == ["app", "generate", "protect", "detect", "train", "evaluate"]
    assert "{" + ",".join(RUNNERS) + "}" in build_parser().format_usage()


def test_aspl_in_the_app_and_the_cli_runs_on_crops_at_any_size(tmp_path, monkeypatch):
    """ASPL protects an image of any size through its 128 px crops (not capped at whole-image ASPL's 1024 x 1024),
    fine-tuning a copy of the photo latent model (the same result twice: the cached model is not changed); 60 steps
    unless told, in the CLI's report too."""
    import json

    import numpy as np

    import protect.aspl
    from apps.demo import DEMO_DIR

    if not all((DEMO_DIR / name).is_dir() for name in ("photo_vae", "photo_ldm")):
        pytest.skip("the photo VAE and latent model are not in demo_models/")
    monkeypatch.setattr(protect.aspl, "MAX_PIXELS", 64 * 64)  # this 200 x 136 image is too large for whole images
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (136, 200, 3), dtype=np.uint8))
    kwargs = {"eps": 8 / 255, "seed": 0, "device": "cpu", "survival": False}
    protected, metrics = services.protect_image(image, method="aspl", steps=7, **kwargs)  # two rounds
    sds, _ = services.protect_image(image, method="sds", steps=7, **kwargs)
    again, _ = services.protect_image(image, method="aspl", steps=7, **kwargs)
    assert protected.size == image.size and 0 < metrics["linf_255"] <= 8
    assert not np.array_equal(np.asarray(protected), np.asarray(sds))
    assert np.array_equal(np.asarray(protected), np.asarray(again))  # the cached latent model was not fine-tuned
    assert services.default_steps("aspl") == 60 and services.default_steps("mist") == services.DEFAULT_PGD_STEPS
    small = tmp_path / "small.png"
    image.crop((0, 0, 24, 20)).save(small)
    assert cli_main(["protect", str(small), "--method", "aspl", "--out", str(tmp_path / "o"), "--device", "cpu"]) == 0
    (report,) = (tmp_path / "o").glob("*.json")
    assert json.loads(report.read_text())["steps"] == 60
