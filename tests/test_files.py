"""What users upload beyond plain RGB: CMYK with its ICC profile, colour profiles, PNG colour keys, transparency,
grayscale and deep integer images, through protect.images and the app's file handling (apps.files)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from apps.files import open_upload, perturbation_image, restore_mode, save_new
from protect.images import has_alpha, matching_profile, protected_image, stored_rgb, to_8bit, to_tensor
from tests.factories import cmyk_swap_profile, noise_image

SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _file(tmp_path, image, name, **save):
    path = tmp_path / name
    image.save(path, **save)
    return path


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_goes_through_its_own_icc_profile(tmp_path, fmt):
    magenta = Image.new("CMYK", (8, 8), (0, 255, 0, 0))
    with_profile = _file(tmp_path, magenta, f"m.{fmt.lower()}", format=fmt, icc_profile=cmyk_swap_profile())
    upload = open_upload(with_profile)
    r, g, b = np.asarray(upload.image, dtype=int).reshape(-1, 3).mean(0)
    assert upload.mode == "CMYK" and upload.icc_profile is None  # sRGB now: the CMYK profile is not carried over
    assert r < 60 and g > 190 and b > 190, (r, g, b)  # the profile's colour (cyan), not the naive formula's magenta
    detect = np.asarray(open_upload(with_profile, purpose="detect").image, dtype=int)
    assert np.abs(detect - np.asarray(upload.image, dtype=int)).max() <= 1
    library = to_tensor(Image.open(with_profile))  # protect() on the PIL image reads it the same way
    assert (library * 255 - torch.from_numpy(np.asarray(upload.image, np.float32)).permute(2, 0, 1)).abs().max() <= 1
    plain = open_upload(_file(tmp_path, magenta, f"p.{fmt.lower()}", format=fmt))  # no profile: Pillow's formula
    r, g, b = np.asarray(plain.image, dtype=int).reshape(-1, 3).mean(0)
    assert r > 190 and g < 60 and b > 190


def test_an_rgb_files_profile_goes_with_its_protected_copy(tmp_path):
    image = noise_image((16, 16))
    upload = open_upload(_file(tmp_path, image, "a.png", icc_profile=SRGB))
    assert upload.icc_profile == SRGB
    clean = to_tensor(upload.image)
    out = protected_image(clean + 0.01, clean, 8 / 255, upload.image)
    saved = save_new(restore_mode(out, upload.mode, upload.icc_profile), tmp_path / "out", "a-protected")
    assert Image.open(saved).info.get("icc_profile") == SRGB
    gray = Image.new("L", (4, 4))
    assert matching_profile(gray, SRGB) is None and matching_profile(Image.new("RGB", (4, 4)), SRGB) == SRGB
    assert matching_profile(Image.new("RGB", (4, 4)), cmyk_swap_profile()) is None
    assert matching_profile(Image.new("RGB", (4, 4)), b"not a profile") is None
    gray.info["icc_profile"] = SRGB  # a mismatched profile is not written
    assert "icc_profile" not in Image.open(save_new(gray, tmp_path / "out", "g")).info


def test_png_colour_keys_are_transparency():
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[0, 0] = (10, 20, 30)
    for array, key in [(rgb, (10, 20, 30)), (np.full((4, 4), 7, np.uint8), 7)]:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, "PNG", transparency=key)
        image = Image.open(buffer)
        assert has_alpha(image)
        assert stored_rgb(image).getpixel((0, 0)) == (255, 255, 255)  # the keyed colour is transparent: on white
    deep = np.full((4, 4), 4000, np.uint16)
    deep[1, 1] = 1234
    buffer = io.BytesIO()
    Image.fromarray(deep).save(buffer, "PNG", transparency=4000)
    eight = to_8bit(Image.open(buffer))
    assert eight.mode == "LA" and eight.getchannel("A").getpixel((0, 0)) == 0
    assert eight.getchannel("A").getpixel((1, 1)) == 255 and eight.getpixel((1, 1))[0] == round(1234 / 65535 * 255)


def test_deep_integer_images_are_read_or_refused_never_guessed(tmp_path):
    sixteen = Image.fromarray(np.full((4, 4), 65535 // 2, np.int32), "I")
    assert to_8bit(sixteen).getpixel((0, 0)) == round(32767 / 65535 * 255)
    signed = Image.fromarray(np.array([[-5, 100], [70000, 3]], np.int32), "I")
    with pytest.raises(ValueError, match="32-bit integer image with values from -5 to 70000"):
        to_8bit(signed)
    path = _file(tmp_path, signed, "s.tif", format="TIFF")
    with pytest.raises(ValueError, match=r"s\.tif: a 32-bit integer image"):
        open_upload(path)


def test_the_amplified_perturbation_of_a_transparent_upload_is_its_stored_colours():
    colours = np.zeros((8, 8, 4), np.uint8)  # transparent black everywhere but one opaque red pixel
    colours[0, 0] = (200, 0, 0, 255)
    original = Image.fromarray(colours, "RGBA")
    protected = colours.copy()
    protected[..., :3] += 2  # +2 levels everywhere, the alpha untouched
    panel = np.asarray(perturbation_image(original, Image.fromarray(protected, "RGBA"), 8 / 255), dtype=int)
    assert np.all(panel == round(127.5 + 2 * 127.5 / 8))  # one value: +2 levels, transparent pixels included


def test_la_keeps_its_alpha_and_is_protected_in_its_stored_values():
    la = Image.merge("LA", (Image.new("L", (4, 4), 90), Image.new("L", (4, 4), 0)))
    clean = to_tensor(la)
    assert torch.allclose(clean, torch.full((3, 4, 4), 90 / 255))  # stored values, not composited on white
    out = protected_image(clean + 4 / 255, clean, 8 / 255, la)
    assert out.mode == "RGBA" and out.getchannel("A").getpixel((0, 0)) == 0
    assert restore_mode(out, "LA").mode == "LA"


def test_a_grayscale_files_metrics_measure_the_gray_file_it_gets(tmp_path):
    from apps.cli import main as cli_main

    path = _file(tmp_path, noise_image((24, 24), "L"), "g.png")
    out = tmp_path / "out"
    assert cli_main(["protect", str(path), "--method", "amortized-full", "--out", str(out), "--device", "cpu"]) == 0
    (report,) = out.glob("report*.json")
    (entry,) = json.loads(report.read_text())["files"]
    stored = np.asarray(Image.open(entry["output"]), dtype=int)
    original = np.asarray(Image.open(path), dtype=int)
    assert Image.open(entry["output"]).mode == "L" and entry["output_mode"] == "L"
    assert entry["linf_255"] == np.abs(stored - original).max() <= 8
    mse = ((stored - original) ** 2).mean() / 255**2
    assert entry["psnr"] == pytest.approx(10 * np.log10(1 / mse), abs=0.05)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_animated_and_multi_page_images_are_refused_not_cut_to_one_frame(tmp_path, fmt):
    frames = [noise_image((16, 16), seed=i) for i in range(3)]
    path = tmp_path / f"anim.{fmt.lower()}"
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:])
    with pytest.raises(ValueError, match=r"anim\.\w+: an animated or multi-page image \(3 frames\)"):
        open_upload(path)
    single = tmp_path / f"one.{fmt.lower()}"
    frames[0].save(single, format=fmt)
    assert open_upload(single).size == (16, 16)
