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
    assert "not trained yet" in settings["note"]
    out = capsys.readouterr().out
    assert "| photoguard | none |" in out and "| random_noise | jpeg75 |" in out and "worst case" in out


def test_photo_evaluation_runs_the_amortized_protector_against_a_demo_vae(tmp_path):
    report = tmp_path / "r.json"
    assert cli_main(_argv("--methods", "amortized", "--vae", "demo/vae", "--json", str(report))) == 0
    rows = {(r["protection"], r["purification"]): r for r in json.loads(report.read_text())["rows"]}
    assert rows[("amortized", "none")]["linf_255"] <= 8 + 1e-3
    assert rows[("amortized", "none")]["latent_distortion_demo/vae"] > 0


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
        (("--methods", "mist"), "mist and sds need"),
        (("-n", "256", "--size", "400", "--steps", "1000"), "megapixel VAE passes"),
        (("--size", "500"), "--size"),
        (("--vae", "demo/vae", "--vae", "demo/vae"), "each once"),
        (("--strengths", "0.3"), "--strengths do not apply to --photos"),
        (("--lora-steps", "0"), "--lora-steps do not apply to --photos"),
    ],
)
def test_photo_evaluation_refuses_bad_requests_before_work(extra, message, capsys):
    assert cli_main(_argv(*extra)) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("extra", [("--vae", "demo/vae"), ("--size", "128"), ("--tile", "0")])
def test_photo_options_are_for_photos_only(extra, capsys):
    assert cli_main(["evaluate", *extra, "-n", "2"]) == 2
    assert f"{extra[0]} apply to --photos only" in capsys.readouterr().err


def test_evaluate_without_mimics_needs_no_classifier_and_mimics_need_one():
    from protect.evaluate import evaluate

    clean = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    protected = {"p": (clean + 4 / 255).clamp(0, 1)}
    vae = tiny_vae()
    rows = evaluate(clean, protected, vaes={"A": vae}, purifications=("none",), noise_eps=4 / 255)
    assert [r["protection"] for r in rows] == ["clean", "p", "random_noise"]
    assert rows[1]["latent_distortion_A"] > 0 and not any(k.endswith("_accuracy") for k in rows[1])
    with pytest.raises(ValueError, match="classifier"):
        evaluate(clean, protected, mimics={"m": lambda x: x}, purifications=("none",))
