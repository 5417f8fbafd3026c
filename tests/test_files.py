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
    with pytest.raises(ValueError, match=r"anim\.\w+: an animated or multi-page image \((3 frames|several pages)\)"):
        open_upload(path)
    single = tmp_path / f"one.{fmt.lower()}"
    frames[0].save(single, format=fmt)
    assert open_upload(single).size == (16, 16)


def _grey_png(bits: int, values: np.ndarray, key: int) -> bytes:
    """A PNG of ``bits``-bit gray levels (1, 2 or 4: Pillow writes none of these with a colour key) whose level
    ``key`` is transparent."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = values.shape
    rows = b"".join(b"\0" + np.packbits(np.unpackbits(row[:, None].astype(np.uint8), axis=1)[:, -bits:]).tobytes()
                    for row in values)  # fmt: skip
    header = struct.pack(">IIBBBBB", width, height, bits, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"tRNS", struct.pack(">H", key))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))  # fmt: skip


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_a_low_bit_depth_gray_colour_key_stays_transparent(tmp_path, bits):
    levels = 2**bits
    values = np.arange(4 * 8).reshape(4, 8) % levels
    path = tmp_path / f"g{bits}.png"
    path.write_bytes(_grey_png(bits, values, key=levels - 1))
    upload = open_upload(path)
    assert upload.image.mode == "RGBA"
    alpha = np.asarray(upload.image)[..., 3]
    np.testing.assert_array_equal(alpha, np.where(values == levels - 1, 0, 255))  # the keyed level, and only it
    gray = np.asarray(upload.image)[..., 0].astype(int)
    np.testing.assert_array_equal(gray, values * 255 // (levels - 1))


def test_a_colour_keyed_grayscale_file_keeps_its_transparency_when_protected(tmp_path):
    gray = Image.fromarray(np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1)), "L")
    path = _file(tmp_path, gray, "k.png", transparency=0)
    upload = open_upload(path)
    assert upload.mode == "L" and upload.image.mode == "RGBA"
    restored = restore_mode(upload.image, upload.mode)
    assert restored.mode == "LA"
    np.testing.assert_array_equal(np.asarray(restored.getchannel("A"))[:, 0], 0)  # the keyed column
    assert np.asarray(restored.getchannel("A"))[:, 1:].min() == 255
    assert restore_mode(Image.new("RGB", (4, 4)), "L").mode == "L"


def test_a_jpeg_of_very_many_scans_is_refused_before_it_is_decoded(tmp_path):
    """Each scan of a progressive JPEG walks the whole image: repeating one makes a small file decode for
    minutes. Refused by counting markers; the same photo with its own scans opens."""
    from apps.files import MAX_JPEG_SCANS

    path = _file(tmp_path, noise_image((64, 48)), "p.jpg", format="JPEG", progressive=True, quality=90)
    data = path.read_bytes()
    assert 1 < data.count(b"\xff\xda") < 20
    assert open_upload(path).size == (64, 48)
    last = data.rindex(b"\xff\xda")
    flood = tmp_path / "flood.jpg"
    flood.write_bytes(data[:-2] + data[last:-2] * MAX_JPEG_SCANS + b"\xff\xd9")
    with pytest.raises(ValueError, match=r"flood\.jpg: a JPEG of \d+ scans"):
        open_upload(flood)


def _tiff(strips: int, width: int = 8, height: int = 8, order: str = "<", big: bool = False) -> bytes:
    """A classic TIFF or a BigTIFF (8-bit gray) of ``width`` x ``height`` whose first directory lists ``strips``
    strips, all pointing at the same bytes."""
    import struct

    offset, entry_size, head = ("Q", 20, 16) if big else ("I", 12, 8)
    magic = {("<", False): b"II*\0", (">", False): b"MM\0*", ("<", True): b"II+\0", (">", True): b"MM\0+"}[order, big]
    header = magic + (struct.pack(order + "HHQ", 8, 0, head) if big else struct.pack(order + "I", head))
    entries = 6
    offsets_at = head + (8 if big else 2) + entries * entry_size + (8 if big else 4)
    counts_at = offsets_at + 4 * strips
    pixels_at = counts_at + 4 * strips
    rows = max(1, height // strips)

    def entry(tag, kind, count, value):  # one value in the entry itself, or where the values are (an offset)
        packed = struct.pack(order + ("H" if kind == 3 else "I") if count == 1 else order + offset, value)
        return struct.pack(order + "HH" + offset, tag, kind, count) + packed.ljust(struct.calcsize(offset), b"\0")

    ifd = struct.pack(order + ("Q" if big else "H"), entries) + b"".join([
        entry(256, 3, 1, width), entry(257, 3, 1, height), entry(258, 3, 1, 8),
        entry(273, 4, strips, offsets_at), entry(278, 3, 1, rows), entry(279, 4, strips, counts_at),
    ]) + bytes(8 if big else 4)  # fmt: skip
    offsets = struct.pack(order + "I" * strips, *[pixels_at] * strips)
    counts = struct.pack(order + "I" * strips, *[width * rows] * strips)
    return header + ifd + offsets + counts + bytes(range(width * height))


@pytest.mark.parametrize(("order", "big"), [("<", False), (">", False), ("<", True)])  # Pillow reads no MM BigTIFF
def test_a_tiff_cut_into_far_more_chunks_than_pixels_is_refused_before_pillow_opens_it(tmp_path, order, big):
    from apps.files import peek

    normal = tmp_path / "rows.tif"
    normal.write_bytes(_tiff(8, order=order, big=big))  # a strip per row: fine
    assert peek(normal) == ("TIFF", "L", (8, 8))
    assert open_upload(normal).size == (8, 8)
    flood = tmp_path / "flood.tif"
    flood.write_bytes(_tiff(20_000, order=order, big=big))
    with pytest.raises(ValueError, match=r"flood\.tif: a TIFF of 8x8 pixels stored in 20000 strips or tiles"):
        peek(flood)


def test_a_camera_jpeg_with_preview_images_is_its_photo_not_a_multi_page_file(tmp_path):
    photo, preview = noise_image((48, 32), seed=1), noise_image((12, 8), seed=2)
    path = tmp_path / "camera.jpg"
    photo.save(path, format="MPO", save_all=True, append_images=[preview])
    assert Image.open(path).format == "MPO"
    upload = open_upload(path)
    assert upload.format == "JPEG" and upload.size == (48, 32)
    expected = np.asarray(Image.open(path).convert("RGB"), dtype=int)  # the first image, the photo
    np.testing.assert_array_equal(np.asarray(upload.image, dtype=int), expected)


def test_output_names_keep_letters_of_any_script():
    from apps.files import safe_stem

    assert safe_stem("写真.jpg") == "写真"
    assert safe_stem("фото_1.png") == "фото_1"
    assert safe_stem("été.png") == "été"
    assert safe_stem("../../etc/passwd") == "passwd"
    assert safe_stem("a b/c:d?.png") == "c_d"
    assert safe_stem("....png") == "image"


def test_a_16_bit_gray_file_with_a_colour_key_keeps_its_transparency_through_the_library():
    values = np.tile(np.arange(0, 65536, 4096, dtype=np.uint16), (16, 1))
    deep = Image.fromarray(values, "I;16")
    deep.info["transparency"] = 0
    clean = to_tensor(deep)
    out = protected_image(clean, clean, 8 / 255, deep)
    assert out.mode == "RGBA"
    alpha = np.asarray(out.getchannel("A"))
    assert alpha[:, 0].max() == 0 and alpha[:, 1:].min() == 255  # the keyed column, and only it
