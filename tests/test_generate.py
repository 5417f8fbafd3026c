"""apps/generate.py: a generation request's showcase rows and the labelled image grid."""

from __future__ import annotations

import pytest

from apps.generate import Request, grid, showcase


def test_showcase_rows_are_distinct_and_labelled():
    rows = showcase(Request("star", method="apg", scale=8, norm_threshold="off", momentum=-0.5))
    assert [r.describe() for r in rows] == ["no CFG", "cfg 8", "apg 8", "apg 8 (no threshold)"]
    assert [r.describe() for r in showcase(Request("star", method="apg", scale=8, momentum=-0.5))] == [
        "no CFG",
        "cfg 8",
        "apg 8",
    ]  # the chosen method is not repeated
    assert len(showcase(Request("star", method="cfg", scale=3, norm_threshold="off"))) == 3
    with pytest.raises(ValueError, match="norm_threshold must be > 0"):
        Request("star", norm_threshold=0.0)  # 0 is refused, not read as the default
    with pytest.raises(ValueError, match="'off'"):
        Request("star", norm_threshold="none")
    from PIL import Image

    sheet = grid([Image.new("RGB", (8, 8), "red")] * 4, columns=2, scale=2, labels=["a", "b"])
    assert sheet.size == (32, 2 * (16 + 18))
    assert sheet.getpixel((20, 20)) == (255, 0, 0) and sheet.getpixel((20, 2)) == (255, 255, 255)
    with pytest.raises(ValueError, match="labels"):
        grid([Image.new("RGB", (8, 8))] * 2, columns=1, labels=["a"])
