"""apps/device.py: the device and the detector's score-model precision, and what bfloat16 does to the verdicts."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from apps import device as device_module
from apps.device import SCORE_DTYPES, best_device, score_dtype

PHOTO_DETECTOR = Path(__file__).resolve().parents[1] / "demo_models" / "photo_detector"


def test_best_device_is_the_cpu_in_float32_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert best_device() == (torch.device("cpu"), torch.float32)


def test_score_dtype_names_and_auto(monkeypatch):
    assert {name: score_dtype("cpu", name) for name in SCORE_DTYPES} == SCORE_DTYPES
    with pytest.raises(ValueError, match="unknown dtype 'half'"):
        score_dtype("cpu", "half")
    monkeypatch.setattr(device_module, "cpu_has_bf16_matrix_units", lambda: True)
    assert score_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(device_module, "cpu_has_bf16_matrix_units", lambda: False)
    assert score_dtype("cpu") == torch.float32  # emulated bfloat16 would be slower, not faster
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert score_dtype("cuda:1") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert score_dtype("cuda") == torch.float16


def test_the_cpu_probe_answers_a_bool_even_without_torch_s_helper(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert device_module.cpu_has_bf16_matrix_units() is False


@pytest.mark.skipif(not (PHOTO_DETECTOR / "config.json").is_file(), reason="no demo photo detector")
def test_bfloat16_score_model_keeps_the_verdicts_of_float32(tmp_path):
    """The committed photo detector, its score model in float32 (as fitted) and in bfloat16, on a held-out crop
    clean and after FGSM at 8/255: the scores differ by under 3 % of the threshold (measured: under 1.7 %,
    benchmarks/RESULTS.md), the verdicts are the same, and each answer says which precision scored it."""
    from apps.services import detect_images, load_detector
    from benchmarks.bench_detect_photos import crops, signed
    from protect.patches import score_fgsm

    full, half = load_detector(PHOTO_DETECTOR, "cpu", "float32"), load_detector(PHOTO_DETECTOR, "cpu", "bfloat16")
    assert half.denoiser.model.dtype == torch.bfloat16 and full.denoiser.model.dtype == torch.float32
    (array,) = crops(["coffee"], 1, 64, seed=300)
    (x,) = signed([array])
    attacked = score_fgsm(full.denoiser, x, 8 / 255, patch_size=full.patch_size)
    images = [Image.fromarray(array), Image.fromarray(((attacked + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())]
    a, b = detect_images(full, images), detect_images(half, images)
    assert [r["score_dtype"] for r in a + b] == ["float32"] * 2 + ["bfloat16"] * 2
    assert [r["verdict"] for r in a] == [r["verdict"] for r in b]
    assert a[1]["verdict"] == "adversarial"
    for x_, y_ in zip(a, b):
        assert abs(x_["score"] - y_["score"]) < 0.03 * x_["threshold"]
