"""``steerguard evaluate --photos``: native-resolution crops of the held-out photos, protected and measured against
VAEs named like every model of the suite (tiny random AutoencoderKL folders here; demo/<name>; hub ids)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from apps.cli import main as cli_main
from tests.factories import tiny_vae

pytest.importorskip("skimage")
pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def vae_folders(tmp_path_factory):
    """Two tiny random AutoencoderKL folders (stride 2 and 4), saved as safetensors."""
    root = tmp_path_factory.mktemp("vaes")
    folders = []
    for name, blocks in (("a", (8, 16)), ("b", (8, 16, 16))):
        tiny_vae(blocks, seed=len(folders)).save_pretrained(root / name, safe_serialization=True)
        folders.append(str(root / name))
    return folders


def _argv(*extra: str) -> list[str]:
    argv = ["evaluate", "--photos", "-n", "2", "--size", "24", "--steps", "2", "--tile", "16", "--device", "cpu"]
    return [*argv, "--purifications", "none", "jpeg75", *extra]


def test_photo_crops_are_seeded_native_pixels_of_held_out_photos():
    from apps.demo.photos import HELD_OUT, photo_uint8
    from apps.evaluation import photo_crops

    crops, boxes = photo_crops(5, 40, seed=1)
    again, _ = photo_crops(5, 40, seed=1)
    assert crops.shape == (5, 3, 40, 40) and torch.equal(crops, again)
    for crop, box in zip(crops, boxes, strict=True):
        assert box["photo"] in HELD_OUT
        source = photo_uint8(box["photo"])[box["top"] : box["top"] + 40, box["left"] : box["left"] + 40]
        np.testing.assert_allclose(crop.permute(1, 2, 0).numpy() * 255, source, atol=1e-3)
    assert not torch.equal(photo_crops(5, 40, seed=2)[0], crops)
    with pytest.raises(ValueError, match="--size"):
        photo_crops(1, 401)


def test_photo_evaluation_reports_rows_noise_and_worst_case_per_vae(vae_folders, tmp_path, capsys):
    report = tmp_path / "photos.json"
    argv = _argv("--methods", "photoguard", "--vae", vae_folders[0], "--vae", vae_folders[1], "--json", str(report))
    assert cli_main(argv) == 0
    first_text = report.read_text()
    assert cli_main(argv) == 0  # an existing report is never overwritten: the second run writes photos-1.json
    assert report.read_text() == first_text
    first, second = json.loads(first_text), json.loads((tmp_path / "photos-1.json").read_text())
    assert first["rows"] == second["rows"]  # seeded end to end
    rows = {(r["protection"], r["purification"]): r for r in first["rows"]}
    protections = ("clean", "photoguard", "random_noise")
    assert set(rows) == {(p, q) for p in protections for q in ("none", "jpeg75")}
    metrics = [f"latent_distortion_{folder}" for folder in vae_folders]
    for row in rows.values():
        assert all(metric in row for metric in metrics) and "psnr" in row and "ssim" in row
    assert rows[("photoguard", "none")]["linf_255"] <= 8 + 1e-3
    assert rows[("random_noise", "none")]["linf_255"] == pytest.approx(8, abs=1e-3)
    assert rows[("clean", "none")][metrics[0]] == 0
    assert set(first["worst_case"]) == set(metrics)
    for metric in metrics:
        worst = {e["protection"]: e for e in first["worst_case"][metric]}
        assert set(worst) == {"photoguard", "random_noise"}
        assert worst["photoguard"]["value"] == min(rows[("photoguard", q)][metric] for q in ("none", "jpeg75"))
    settings = first["settings"]
    assert settings["data"] == "photos" and settings["attacked_vae"] == vae_folders[0] and settings["size"] == 24
    assert "SDEdit mimicry" in settings["note"] and settings["ldm"] is None and settings["sdedit"] is None
    assert not any(key.startswith("sdedit") for key in rows[("photoguard", "none")])  # no latent model: no mimicry
    out = capsys.readouterr().out
    assert "| photoguard | none |" in out and "| random_noise | jpeg75 |" in out and "worst case" in out


def test_photo_evaluation_runs_the_amortized_protector_against_a_demo_vae(tmp_path):
    """The default protector of a photo evaluation is the photo one; the shapes VAE takes the shapes protector."""
    import warnings

    for vae, protector in (("demo/photo_vae", "demo/photo_protector"), ("demo/vae", "demo_models/protector")):
        report = tmp_path / f"{vae.replace('/', '_')}.json"
        argv = _argv("--methods", "amortized", "--vae", vae, "--ldm", "none", "--json", str(report))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # trained against the VAE it protects for: no mismatch warning
            assert cli_main([*argv, *(["--protector", protector] if vae == "demo/vae" else [])]) == 0
        result = json.loads(report.read_text())
        assert result["settings"]["protector"] == protector
        rows = {(r["protection"], r["purification"]): r for r in result["rows"]}
        assert rows[("amortized", "none")]["linf_255"] <= 8 + 1e-3
        assert rows[("amortized", "none")][f"latent_distortion_{vae}"] > 0


def test_a_hub_id_not_available_offline_is_a_clear_error(vae_folders, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = _argv("--vae", vae_folders[0], "--vae", "nobody-steerguard/no-such-vae")
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "nobody-steerguard/no-such-vae" in err and "HF_HUB_OFFLINE" in err and "Traceback" not in err
    assert cli_main(_argv("--vae", str(tmp_path / "missing" / "vae"))) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli_main(_argv("--vae", str(tmp_path / "empty"))) == 2
    assert "AutoencoderKL folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--methods", "mist", "--ldm", "none"), "mist need a latent diffusion model"),
        (("--methods", "photoguard", "sds", "--ldm", "none"), "sds need a latent diffusion model"),
        (("--methods", "sds-@3", "--ldm", "none"), "sds-@3 need a latent diffusion model"),
        (("-n", "256", "--size", "400", "--steps", "1000"), "megapixel VAE passes"),
        (("--size", "500"), "--size"),
        (("--vae", "demo/vae", "--vae", "demo/vae"), "each once"),
        (("--strengths", "0.3", "--ldm", "none"), "one SDEdit strength and needs a latent model"),
        (("--strengths", "0.3", "0.5"), "one SDEdit strength and needs a latent model"),
        (("--lora-steps", "0"), "--lora-steps does not apply to --photos"),
    ],
)
def test_photo_evaluation_refuses_bad_requests_before_work(extra, message, capsys):
    assert cli_main(_argv(*extra)) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("extra", [("--vae", "demo/vae"), ("--size", "128"), ("--tile", "0"), ("--ldm", "none")])
def test_photo_options_are_for_photos_only(extra, capsys):
    assert cli_main(["evaluate", *extra, "-n", "2"]) == 2
    assert f"{extra[0]} apply to --photos only" in capsys.readouterr().err


def test_evaluate_without_mimics_needs_no_classifier_and_labels_need_a_classifier():
    from protect.evaluate import evaluate

    clean = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    protected = {"p": (clean + 4 / 255).clamp(0, 1)}
    vae = tiny_vae()
    rows = evaluate(clean, protected, vaes={"A": vae}, purifications=("none",), noise_eps=4 / 255)
    assert [r["protection"] for r in rows] == ["clean", "p", "random_noise"]
    assert rows[1]["latent_distortion_A"] > 0 and not any(k.endswith("_accuracy") for k in rows[1])
    with pytest.raises(ValueError, match="classifier"):
        evaluate(clean, protected, torch.zeros(2), mimics={"m": lambda x: x}, purifications=("none",))


def test_carried_over_separates_a_reproduced_perturbation_from_damage():
    """A mimic that reproduces the perturbation (scaled) has share 1 and no excess; one that removes it has no
    change at all; a change orthogonal to the perturbation is all excess, with its own PSNR; evaluate reports
    both per mimic."""
    from protect.evaluate import carried_over, evaluate

    g = torch.Generator().manual_seed(0)
    delta = (torch.rand(2, 3, 8, 8, generator=g) - 0.5) * 0.06
    share, excess = carried_over(0.8 * delta, delta)
    assert torch.allclose(share, torch.ones(2), atol=1e-5) and (excess > 90).all()
    share, excess = carried_over(torch.zeros_like(delta), delta)
    assert torch.equal(share, torch.zeros(2)) and (excess >= 100 - 1e-4).all()
    other = torch.randn(2, 3, 8, 8, generator=g) * 0.02
    flat = delta.flatten(1)
    orth = other.flatten(1) - (other.flatten(1) * flat).sum(1, keepdim=True) / flat.pow(2).sum(1, keepdim=True) * flat
    orth = orth.view_as(delta)
    share, excess = carried_over(orth + 0.5 * delta, delta)
    expected_share = 1 - orth.pow(2).flatten(1).sum(1) / (orth + 0.5 * delta).pow(2).flatten(1).sum(1)
    torch.testing.assert_close(share, expected_share, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(excess, -10 * torch.log10(orth.pow(2).flatten(1).mean(1)), rtol=1e-4, atol=1e-4)
    clean = torch.rand(2, 3, 16, 16, generator=g) * 0.8 + 0.1
    protected = {"copied": clean + 4 / 255}
    rows = evaluate(clean, protected, mimics={"m": lambda x: x}, purifications=("none",), noise_eps=4 / 255)
    row = {r["protection"]: r for r in rows}["copied"]
    assert row["m_carried_share"] == pytest.approx(1.0) and row["m_excess_psnr_to_clean"] > 90
    assert row["m_psnr_to_clean"] == pytest.approx(36.1, abs=0.1)  # the plain measure counts the copy as damage


@pytest.fixture(scope="module")
def ldm_folder(vae_folders, tmp_path_factory):
    """A tiny random latent UNet on the first tiny VAE's latents, saved as apps.demo.train_photo saves photo_ldm."""
    from diffusers import DDPMScheduler

    from tests.factories import tiny_latent_unet

    folder = tmp_path_factory.mktemp("ldm")
    tiny_latent_unet(scale=0.05).save_pretrained(folder / "unet", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    (folder / "latent_vae.json").write_text(json.dumps({"vae": vae_folders[0], "scaling_factor": 0.18215}))
    return str(folder)


def test_photo_evaluation_with_a_latent_model_runs_mist_sds_and_sdedit_mimicry(vae_folders, ldm_folder, tmp_path):
    report = tmp_path / "m.json"
    methods = ("--methods", "photoguard@2", "mist@2", "sds@2", "sds-@2", "aspl@2")
    assert cli_main(_argv(*methods, "--vae", vae_folders[0], "--ldm", ldm_folder, "--json", str(report))) == 0
    result = json.loads(report.read_text())
    rows = {(r["protection"], r["purification"]): r for r in result["rows"]}
    assert rows[("clean", "none")]["sdedit_ssim_to_clean"] == pytest.approx(1.0)
    assert rows[("clean", "jpeg75")]["sdedit_psnr_to_clean"] > 100  # each purification's own clean edit
    for method in ("photoguard@2", "mist@2", "sds@2", "sds-@2", "aspl@2", "random_noise"):
        assert 0 < rows[(method, "none")]["sdedit_ssim_to_clean"] < 1
        assert rows[(method, "none")]["linf_255"] <= 8 + 1e-3
    # the latent model is Mist's semantic part: Mist is not PhotoGuard under another name
    assert rows[("mist@2", "none")]["psnr"] != rows[("photoguard@2", "none")]["psnr"]
    assert rows[("sds-@2", "none")]["psnr"] != rows[("sds@2", "none")]["psnr"]  # the opposite direction
    assert {"sdedit_psnr_to_clean", "sdedit_ssim_to_clean", "sdedit_excess_psnr_to_clean"} <= set(result["worst_case"])
    for method in ("photoguard@2", "random_noise"):
        row = rows[(method, "none")]
        assert 0 <= row["sdedit_carried_share"] <= 1
        assert row["sdedit_excess_psnr_to_clean"] >= row["sdedit_psnr_to_clean"] - 1e-6  # the excess is a part
    assert result["settings"]["ldm"] == ldm_folder and result["settings"]["sdedit"]["strength"] == 0.3


def test_a_latent_model_of_another_vae_is_refused(vae_folders, ldm_folder, capsys):
    assert cli_main(_argv("--vae", vae_folders[1], "--ldm", ldm_folder)) == 2
    err = capsys.readouterr().err
    assert "trained on the latents of" in err and "Traceback" not in err
