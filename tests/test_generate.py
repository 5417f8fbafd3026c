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


@pytest.mark.parametrize(
    ("build", "match"),
    [
        ("img2img", r"makes images from an input image \(image\)"),
        ("fill", r"makes images from an input image \(image, mask_image\)"),
        ("pix2pix", r"makes images from an input image \(image\)"),
        ("pag", "guide\\(\\) cannot serve StableDiffusionPAGPipeline"),
    ],
)
def test_generate_refuses_pipelines_it_cannot_drive_with_the_reason(build, match):
    """Image-to-image pipelines (InstructPix2Pix among them), one without a CFG scale argument (FLUX Fill) and a
    conditional UNet pipeline that guide() does not serve (diffusers' own PAG pipeline) are refused with a message,
    never run as an unconditional model or half-called."""
    import diffusers

    from apps.generate import generate, is_unconditional
    from tests.factories import BUILDERS, tiny_flux_distilled

    if build == "img2img":
        pipe = BUILDERS["sd_img2img"]()
    elif build == "fill":
        pipe = tiny_flux_distilled("FluxFillPipeline")
    else:
        components = BUILDERS["sd"]().components
        cls = {
            "pix2pix": diffusers.StableDiffusionInstructPix2PixPipeline,
            "pag": diffusers.StableDiffusionPAGPipeline,
        }[build]
        accepted = cls.__init__.__code__.co_varnames
        pipe = cls(**{k: v for k, v in components.items() if k in accepted}, requires_safety_checker=False)
    assert not is_unconditional(pipe)
    with pytest.raises(ValueError, match=match):
        generate(pipe, Request("a cat", method="none", steps=2, num_images=1))


def test_flux_kontext_is_accepted_for_generation_from_the_prompt_alone():
    """Kontext's ``image`` is optional (text-to-image without one; its run is in tests/test_kontext.py)."""
    from apps.generate import check_generates_from_text
    from tests.factories import tiny_flux_distilled, tiny_kontext

    check_generates_from_text(tiny_kontext())
    with pytest.raises(ValueError, match="input image"):
        check_generates_from_text(tiny_kontext(inpaint=True))
    with pytest.raises(ValueError, match=r"\(image, control_image\)"):
        check_generates_from_text(tiny_flux_distilled("FluxControlImg2ImgPipeline"))


def test_a_video_pipeline_guide_serves_is_refused_for_image_generation():
    from apps.generate import check_generates_from_text
    from tests.factories import tiny_sana, tiny_wan

    check_generates_from_text(tiny_sana())
    with pytest.raises(ValueError, match="makes videos"):
        check_generates_from_text(tiny_wan())
