"""The app started as the README starts it (on the embedded demo DiT), called through its API like a program;
the ``protect`` and ``detect`` commands of the CLI."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apps.cli import main as cli_main
from apps.demo import DEMO_DIR
from benchmarks.bench_load import free_port
from tests.factories import noise_image

pytestmark = pytest.mark.skipif(not (DEMO_DIR / "dit").is_dir(), reason="the demo DiT is not in demo_models/")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A valid-looking PNG whose IHDR claims ``width x height`` RGB pixels (the data is a few bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _linf(protected: Image.Image, original: Image.Image) -> int:
    """Budget check as protect.protect defines it: every stored colour value against the original's."""
    a = np.asarray(protected.convert("RGBA"), np.int16)[..., :3]
    b = np.asarray(original.convert("RGBA"), np.int16)[..., :3]
    if original.mode in ("RGBA", "LA"):
        assert protected.getchannel("A").tobytes() == original.getchannel("A").tobytes()  # alpha untouched
    return int(np.abs(a - b).max())


@pytest.fixture(scope="session")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad")
    good = folder / "good.png"
    noise_image().save(good)
    files = {
        "text": (b"just some text, not an image\n", r"not a supported image"),
        "truncated": (good.read_bytes()[:200], r"truncated|corrupt"),
        "bomb": (_bomb_png(), r"50000x50000|too many pixels|limit"),
        "empty": (b"", r"empty"),
    }
    paths = {}
    for name, (data, _) in files.items():
        paths[name] = folder / f"{name}.png"
        paths[name].write_bytes(data)
    return {name: (paths[name], files[name][1]) for name in files}


def detector_patch(directory: Path) -> int:
    """The patch side of the saved detector in ``directory``: its ``patch_size``, else its score model's."""
    meta = json.loads((Path(directory) / "config.json").read_text())
    if meta["config"].get("patch_size"):
        return int(meta["config"]["patch_size"])
    name = meta.get("diffusion_model", "demo/unet_eps").removeprefix("demo/")
    return int(json.loads((DEMO_DIR / name / "unet" / "config.json").read_text())["sample_size"])


@pytest.fixture(scope="session")
def detector_dir(tmp_path_factory) -> Path:
    """The demo photo detector (native-resolution patches) when it is trained, else a tiny one fitted here on the
    demo EPS UNet (seconds)."""
    if (DEMO_DIR / "photo_detector" / "config.json").is_file():
        return DEMO_DIR / "photo_detector"
    if not (DEMO_DIR / "unet_eps").is_dir():
        pytest.skip("no detector in demo_models/ and no demo score model to fit one")
    import torch
    import torch.nn.functional as F

    from apps.models import load_score_model
    from protect import PatchEPSDetector

    unet, scheduler = load_score_model("demo/unet_eps")
    g = torch.Generator().manual_seed(0)
    clean = F.interpolate(torch.rand(8, 3, 4, 4, generator=g) * 1.2 - 0.6, size=32, mode="bilinear")
    adversarial = (clean[:4] + 0.1 * torch.randn(4, 3, 32, 32, generator=g).sign()).clamp(-1, 1)
    detector = PatchEPSDetector(
        unet, scheduler, timesteps=2, epochs=3, kernel_batch_size=4, channels=(4,), feature_dim=8, max_patches=8
    )
    folder = tmp_path_factory.mktemp("detector")
    detector.fit(clean, adversarial, value_range=(-1, 1)).save_pretrained(folder, diffusion_model="demo/unet_eps")
    return folder


@pytest.fixture(scope="module")
def server(detector_dir, tmp_path_factory):
    """The app on a free port, with a Gradio cache of its own: an app's shutdown deletes its cached files, which
    the next module's app (same process, same content-hashed names) may be receiving at that moment."""
    from apps.app import build_app, launch_options

    with pytest.MonkeyPatch.context() as env:
        env.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio-cache")))
        app = build_app("demo/dit", device="cpu", detector=detector_dir)
        port = free_port()
        app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_options())
        yield f"http://127.0.0.1:{port}/"
        app.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


def test_generate_endpoint_and_a_bad_request(client):
    image, caption = client.predict("star", "apg", 6, 0, None, -0.5, "pag", 2, 1, 4, 0, 2, True, api_name="/generate")
    grid = Image.open(image)
    assert grid.size == (2 * 256, 3 * (256 + 18))  # 2 images x (none, cfg, apg = the chosen one), 32 px shown 8x
    assert caption.endswith("row 3: apg 6 + pag 2 + 1 corrector step(s)")  # the chosen method is not repeated
    with pytest.raises(Exception, match=r"not in the list of choices|unknown class"):
        client.predict("unicorn", "apg", 6, 0, None, -0.5, "none", 2, 0, 4, 0, 2, False, api_name="/generate")
    with pytest.raises(Exception, match=r"less than minimum|steps must be between"):
        client.predict("disc", "cfg", 3, 0, None, -0.5, "none", 2, 0, 0, 1, 1, False, api_name="/generate")
    image, _ = client.predict("disc", "cfg", 3, 0, None, -0.5, "tpg", 2, 0, 2, 1, 1, False, api_name="/generate")
    assert Image.open(image).size[0] > 0  # still answering


def _protect(client, *paths, method="photoguard", eps=8, steps=3):
    from gradio_client import handle_file

    return client.predict([handle_file(str(p)) for p in paths], method, eps, steps, 0, api_name="/protect")


def test_protect_endpoint_runs_aspl(client, tmp_path):
    path = tmp_path / "art.png"
    original = noise_image((40, 28))
    original.save(path)
    _, _, files, summary, _ = _protect(client, path, method="aspl", eps=4, steps=2)
    assert "**aspl**" in summary and "2 PGD steps" in summary and len(files) == 1
    assert 0 < _linf(Image.open(files[0]), original) <= 4


def test_protect_endpoint_returns_pngs_within_the_budget(client, tmp_path):
    paths = [tmp_path / "photo.png", tmp_path / "logo.png"]
    originals = [noise_image((24, 20)), noise_image((18, 30), "RGBA", seed=1)]
    for path, image in zip(paths, originals):
        image.save(path)
    gallery, table, files, summary, (before, after) = _protect(client, *paths, method="mist", eps=6)
    assert len(gallery) == 10 and "mist" in summary  # original, protected, perturbation, two SDEdit previews
    assert [row[0] for row in table["data"]] == ["photo", "logo"]
    columns = ("edits PSNR (dB)", "edits PSNR beyond the perturbation (dB)", "after JPEG q75", "after noisy upscaling")
    edits, excess, jpeg, upscaled = (table["headers"].index(c) for c in columns)
    assert all(20 < row[edits] < 80 for row in table["data"])  # the PSNR between the two edits
    assert all(row[excess] >= row[edits] - 0.01 for row in table["data"])  # the carried perturbation left out
    assert "beyond the perturbation" in summary
    for row in table["data"]:  # the survival report: a verdict and the comparison to random noise
        assert all(row[c].startswith(("survives (", "does not survive (")) for c in (jpeg, upscaled)), row
    assert "survive** JPEG q75 and noisy upscaling" in summary
    assert len(files) == 2
    for original, file in zip(originals, files):
        protected = Image.open(file)
        assert protected.format == "PNG" and protected.size == original.size and protected.mode == original.mode
        assert 0 < _linf(protected, original) <= 6
    assert before.endswith(".png") and after.endswith(".png")  # the slider's pair, lossless
    assert np.array_equal(np.asarray(Image.open(after)), np.asarray(Image.open(files[0])))


@pytest.mark.parametrize("method", ["amortized", "amortized-full"])
def test_protect_endpoint_amortized_without_preview(client, tmp_path, method):
    from gradio_client import handle_file

    path = tmp_path / "art.png"
    noise_image((40, 36)).save(path)
    gallery, table, files, summary, _ = client.predict(
        [handle_file(str(path))], method, 8, 1, 0, False, api_name="/protect"
    )
    assert f"**{method}**" in summary
    edits = table["headers"].index("edits PSNR (dB)")
    assert len(gallery) == 3 and "one forward pass" in summary and table["data"][0][edits] is None
    assert table["data"][0][edits + 1] is None
    assert 0 < _linf(Image.open(files[0]), Image.open(path)) <= 8


def test_detect_endpoint_returns_verdicts(client, tmp_path):
    from gradio_client import handle_file

    path = tmp_path / "photo.png"
    noise_image((40, 40)).save(path)
    verdicts, _plot, note, heat = client.predict([handle_file(str(path))], api_name="/detect")
    (entry,) = verdicts["images"]
    assert set(entry) >= {"score", "threshold", "verdict"} and entry["verdict"] in ("clean", "adversarial")
    assert entry["file"] == "photo" and entry["original_size"] == [40, 40]
    assert isinstance(entry["score"], float) and entry["threshold"] == verdicts["threshold"]
    p = entry["patch_size"]
    assert entry["resolution"] == [40, 40] and p in (16, 32)  # native: a grid of the score model's patches
    grid = (40 + p - 1) // p  # the last row and column overlap the previous ones (3x3 of 16 px, 2x2 of 32 px)
    assert entry["tiles"] == grid**2 and entry["patches"] <= grid**2 and verdicts["score_model"]
    assert verdicts["score_dtype"] in ("float32", "bfloat16", "float16")
    assert "native resolution, never resized" in note and verdicts["calibrated_fpr"] == 0.05
    assert len(heat) == (entry["verdict"] == "adversarial")  # a heat map for each flagged image


@pytest.mark.parametrize("kind", ["text", "truncated", "bomb", "empty"])
def test_bad_uploads_give_errors_and_the_server_keeps_answering(client, bad_files, kind, tmp_path):
    from gradio_client import handle_file

    path, message = bad_files[kind]
    with pytest.raises(Exception, match=message):
        _protect(client, path)
    with pytest.raises(Exception, match=message):
        client.predict([handle_file(str(path))], api_name="/detect")
    good = tmp_path / "good.png"
    noise_image((8, 8)).save(good)
    _, _, files, _, _ = _protect(client, good, steps=1)
    assert Image.open(files[0]).size == (8, 8)  # still answering


def test_cli_generate_writes_new_files_only(tmp_path):
    args = ["generate", "ring", "--steps", "2", "--num-images", "1", "--out", str(tmp_path), "--device", "cpu"]
    assert cli_main(args) == 0
    assert cli_main(args) == 0
    assert len(list(tmp_path.glob("*.png"))) == 2  # the second run did not overwrite the first
    assert cli_main([*args, "--sampler", "ddim", "--perturbation", "softpag"]) == 0
    assert len(list(tmp_path.glob("*.png"))) == 3
    assert cli_main([*args[:1], "unicorn", *args[2:]]) == 2


def test_cli_protect_keeps_size_and_mode_and_never_overwrites(tmp_path, bad_files, capsys):
    inputs = []
    for name, mode, size in [("a", "RGB", (20, 16)), ("b", "RGBA", (12, 18)), ("c", "L", (16, 16))]:
        inputs.append(tmp_path / f"{name}.png")
        noise_image(size, mode).save(inputs[-1])
    noise_image((20, 20)).save(tmp_path / "d.jpg", quality=95)
    inputs.append(tmp_path / "d.jpg")
    before = {p: p.read_bytes() for p in inputs}
    out = tmp_path  # the inputs' own folder: outputs must not replace them
    args = ["protect", *map(str, inputs), "--out", str(out), "--eps", "4", "--steps", "2", "--device", "cpu"]
    assert cli_main(args) == 0
    assert cli_main(args) == 0
    assert all(p.read_bytes() == data for p, data in before.items())
    assert len(list(out.glob("*-protected*.png"))) == 8 and len(list(out.glob("report*.json"))) == 2
    report = json.loads((out / "report.json").read_text())
    assert not report["failed"] and len(report["files"]) == 4
    for entry in report["files"]:
        original, protected = Image.open(entry["input"]), Image.open(entry["output"])
        assert protected.size == original.size and protected.mode == original.mode
        assert _linf(protected, original) <= 4
        survival = entry["survival"]  # protect.survival.report on the saved colours: JPEG q75, noisy upscaling
        assert set(survival["purifications"]) == {"jpeg75", "noisy_upscale"} and survival["eps_255"] <= 4 + 1e-4
        assert survival["verdict"] in ("survives", "does not survive")
    assert "2x" in report["survival_rule"]
    assert capsys.readouterr().out.count("  survival: ") == 8  # printed per file
    bad, _ = bad_files["text"]
    assert cli_main(["protect", str(bad), str(inputs[0]), "--out", str(tmp_path / "o"), "--steps", "1"]) == 2
    assert "text.png" in capsys.readouterr().err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert len(report["files"]) == 1 and report["failed"][0]["input"] == str(bad)  # the good file went on


def test_cli_detect_json(tmp_path, detector_dir, bad_files, capsys):
    path = tmp_path / "x.png"
    p = detector_patch(detector_dir)
    noise_image((p, p)).save(path)
    capsys.readouterr()
    assert cli_main(["detect", str(path), str(path), "--json", "--detector", str(detector_dir), "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and lines[0] == lines[1]
    assert lines[0]["file"] == str(path) and lines[0]["verdict"] in ("clean", "adversarial")
    assert isinstance(lines[0]["score"], float) and isinstance(lines[0]["threshold"], float)
    assert lines[0]["resolution"] == [p, p] and lines[0]["patches"] == lines[0]["tiles"] == 1
    assert "patch_scores" not in lines[0]
    assert cli_main(["detect", str(path), "--detector", str(detector_dir), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    model = json.loads((detector_dir / "config.json").read_text()).get("diffusion_model", "demo/unet_eps")
    assert f"scored at the native {p}x{p}: all 1 {p}x{p} patches, score model {model}" in text
    assert "only 1 separate patch: the score of so small an image is noisier" in text  # a caution, not a refusal
    bad, _ = bad_files["bomb"]
    assert cli_main(["detect", str(bad), "--json", "--detector", str(detector_dir)]) == 2
    assert cli_main(["detect", str(path), "--detector", str(tmp_path / "none")]) == 2
    assert "no detector available" in capsys.readouterr().err


def test_without_the_photo_detector_the_default_says_none_is_available(tmp_path, monkeypatch):
    """The default is the native-resolution photo detector; without it there is none (not the 16 px testbed
    detector, which scores fixed-size images only and would be refused as the wrong kind)."""
    import apps.demo
    from apps.services import load_detector

    (tmp_path / "eps_detector").mkdir()
    (tmp_path / "eps_detector" / "config.json").write_text('{"format": "steerguard.eps_detector/1"}')
    monkeypatch.setattr(apps.demo, "DEMO_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no detector available: .*photo_detector holds no saved detector"):
        load_detector(device="cpu")


def test_cli_detect_reports_running_out_of_memory_per_file_and_goes_on(tmp_path, detector_dir, capsys, monkeypatch):
    import torch

    import apps.services

    path = tmp_path / "x.png"
    p = detector_patch(detector_dir)
    noise_image((p, p)).save(path)
    real, calls = apps.services.detect_images, []

    def second_runs_out(detector, images):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real(detector, images)

    monkeypatch.setattr(apps.services, "detect_images", second_runs_out)
    capsys.readouterr()
    code = cli_main(["detect", *[str(path)] * 3, "--json", "--detector", str(detector_dir), "--device", "cpu"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 2 and len(lines) == 3 and "verdict" in lines[0] and "verdict" in lines[2]
    assert lines[1] == {"file": str(path), "error": lines[1]["error"]} and "out of memory" in lines[1]["error"]


def test_cli_protect_splits_files_across_processes(tmp_path):
    """What `accelerate launch` does on several GPUs, here with two CPU processes under torchrun."""
    rng = np.random.default_rng(0)
    inputs = []
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)
        inputs.append(str(path))
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",  # a free one: the default 29500 may still be held by the previous torchrun (TIME_WAIT)
        str(free_port()),
        "-m",
        "apps.cli",
        "protect",
        *inputs,
        "--out",
        str(out),
        "--steps",
        "2",
        "--device",
        "cpu",
    ]
    done = subprocess.run(command, capture_output=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-4000:]  # the workers' traceback, if any
    report = json.loads((out / "report.json").read_text())
    assert report["processes"] == 2
    assert sorted(f["input"] for f in report["files"]) == inputs
    assert len(list(out.glob("*-protected.png"))) == 3


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    command += [str(free_port()), "-m", "apps.cli", *args, "--device", "cpu"]
    return subprocess.run(command, capture_output=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_detect_across_processes_scores_every_file_when_some_fail(tmp_path, detector_dir):
    """A bad file in one process's share must not end the others' (torchrun stops every process when one exits
    non-zero): all good files are scored, in input order, and the failures counted over all processes."""
    p = detector_patch(detector_dir)
    good = []
    for i in range(3):
        good.append(tmp_path / f"good{i}.png")
        noise_image((p, p), seed=i).save(good[-1])
    bad = []
    for i in range(3):
        bad.append(tmp_path / f"bad{i}.png")
        bad[-1].write_bytes(b"not an image")
    inputs = [str(x) for x in (*good, *bad)]  # the second process's share is all bad
    done = _torchrun("detect", *inputs, "--json", "--detector", str(detector_dir))
    assert done.returncode != 0
    lines = [json.loads(line) for line in done.stdout.decode().splitlines() if line.startswith("{")]
    assert [line["file"] for line in lines] == inputs  # every file once, in input order
    assert all("verdict" in line for line in lines[:3]) and all("error" in line for line in lines[3:])
    assert "3 of 6 input(s) failed" in done.stderr.decode()
