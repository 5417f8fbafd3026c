"""protect.images: the tensor protect() perturbs for each mode, EXIF orientation, the 8-bit budget."""

import io

import numpy as np
import torch
from PIL import Image

from protect.images import budget_levels, composite_rgb, has_alpha, oriented, protected_image, to_8bit, to_tensor


def test_modes_become_the_tensor_protect_perturbs():
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    assert torch.equal(to_tensor(rgba), torch.zeros(3, 32, 32))  # RGBA: the stored colours, alpha kept aside
    la = Image.new("LA", (32, 32), (0, 0))
    assert torch.equal(to_tensor(la), torch.zeros(3, 32, 32))  # LA too: the stored values
    pa = Image.new("P", (32, 32), 0)
    pa.info["transparency"] = 0
    assert torch.equal(to_tensor(pa), torch.ones(3, 32, 32))  # other transparent modes: composited on white
    gray16 = Image.fromarray(np.full((32, 32), 65535 // 2, dtype=np.uint16))
    assert gray16.mode.startswith("I") and torch.allclose(to_tensor(gray16), torch.full((3, 32, 32), 0.5), atol=1 / 255)
    assert to_8bit(gray16).mode == "L" and to_8bit(la) is la
    gray = to_tensor(Image.new("L", (32, 32), 51))
    assert torch.allclose(gray, torch.full((3, 32, 32), 0.2))
    assert has_alpha(la) and not has_alpha(Image.new("RGB", (2, 2)))
    assert composite_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied_once():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buffer = io.BytesIO()
    Image.new("RGB", (32, 16)).save(buffer, "JPEG", exif=exif.tobytes())
    image = Image.open(buffer)
    assert to_tensor(image).shape == (3, 32, 16)
    upright = oriented(image)
    assert upright.size == (16, 32) and oriented(upright) is upright  # nothing left to turn


def test_protected_image_rounds_within_the_budget():
    clean = torch.full((3, 4, 4), 100 / 255)
    x = clean + torch.linspace(-0.2, 0.2, 48).reshape(3, 4, 4)
    assert budget_levels(8 / 255) == 8.0
    out = np.asarray(protected_image(x, clean, 8 / 255, Image.new("RGB", (4, 4))), dtype=int)
    assert np.abs(out - 100).max() == 8
