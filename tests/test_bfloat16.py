"""guide() in bfloat16 on the CPU (the CUDA half-precision checks of ``tests/test_cuda.py`` run only on a GPU): CFG
through guide() equals the pipeline's own CFG within bfloat16 rounding, APG runs and moves the result, and the
output keeps the pipeline's dtype path (no float32 leak into the denoiser's inputs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidance import APG, CFG, PAG, guide
from guidance.pipeline import family_of
from tests import factories as F

#: name: (builder, call kwargs, the pipeline's own CFG arguments, guide()'s extra call arguments, output attribute)
PIPELINES = {
    "sd": (F.tiny_sd, None, {"guidance_scale": 3.0}, {}, "images"),
    "sdxl": (F.tiny_sdxl, None, {"guidance_scale": 3.0}, {}, "images"),
    "sd3": (F.tiny_sd3, None, {"guidance_scale": 3.0}, {}, "images"),
    "flux": (F.tiny_flux, None, {"true_cfg_scale": 3.0, "negative_prompt": ""}, {"negative_prompt": ""}, "images"),
    "dit": (F.tiny_dit, None, {"guidance_scale": 3.0}, {}, "images"),
    "auraflow": (F.tiny_auraflow, F.auraflow_call_kwargs, {"guidance_scale": 3.0}, {}, "images"),
    "hidream": (F.tiny_hidream, F.hidream_call_kwargs, {"guidance_scale": 3.0}, {}, "images"),
    "prx": (F.tiny_prx, F.prx_call_kwargs, {"guidance_scale": 3.0}, {}, "images"),
    "cogview3plus": (F.tiny_cogview3plus, F.cogview3plus_call_kwargs, {"guidance_scale": 3.0}, {}, "images"),
    "kandinsky5": (F.tiny_kandinsky5, F.kandinsky5_call_kwargs, {"guidance_scale": 3.0}, {}, "image"),
    "z_image": (F.tiny_z_image, F.z_image_call_kwargs, {"guidance_scale": 2.0}, {}, "images"),  # c + 2 (c - u)
    "krea2": (F.tiny_krea2, F.krea2_call_kwargs, {"guidance_scale": 2.0}, {}, "images"),
    "lumina2": (F.tiny_lumina2, F.lumina2_call_kwargs, {"guidance_scale": 3.0}, {}, "images"),
    "cogview4": (F.tiny_cogview4, F.cogview4_call_kwargs, {"guidance_scale": 3.0}, {}, "images"),
    "ernie": (F.tiny_ernie, F.ernie_call_kwargs, {"guidance_scale": 3.0}, {}, "images"),
    "sana": (F.tiny_sana, lambda: F.sana_call_kwargs(), {"guidance_scale": 3.0}, {}, "images"),
}


def _first_tensor(value):
    return value if torch.is_tensor(value) else value[0]  # Z-Image: one latent per sample


def _bfloat16(value):
    if torch.is_tensor(value) and value.is_floating_point():
        return value.to(torch.bfloat16)
    return [_bfloat16(v) for v in value] if isinstance(value, list) else value


@pytest.mark.parametrize("name", list(PIPELINES))
def test_cfg_through_guide_equals_the_pipelines_own_cfg_in_bfloat16(name):
    build, call_kwargs, own, extra, output = PIPELINES[name]
    pipe = build().to(torch.bfloat16)
    for component in pipe.components.values():  # as from_pretrained(torch_dtype=...) does (Kandinsky 5)
        for path, module in getattr(component, "named_modules", dict)():
            if any(part in path.split(".") for part in getattr(component, "_keep_in_fp32_modules", None) or ()):
                module.float()
    kwargs = (call_kwargs() if call_kwargs else F.default_call_kwargs(pipe)) | {"output_type": "np"}
    kwargs = {key: _bfloat16(value) for key, value in kwargs.items()}
    run = lambda **more: getattr(pipe(**kwargs | more, generator=torch.Generator().manual_seed(0)), output)
    dtypes = []
    hook = getattr(pipe, family_of(pipe).denoiser).register_forward_pre_hook(
        lambda module, args, kw: dtypes.append(_first_tensor(args[0] if args else next(iter(kw.values()))).dtype),
        with_kwargs=True,
    )
    try:
        reference = run(**own)
        with guide(pipe, CFG(3.0)):
            guided = run(**extra)
        with guide(pipe, APG(3.0), PAG(1.0)):
            apg = run(**extra)
    finally:
        hook.remove()
    assert set(dtypes) == {torch.bfloat16}
    assert np.isfinite(apg).all() and np.abs(apg - guided).max() > 0.01
    # bfloat16 rounding over 3 steps; Sana upcasts its outputs and combines its CFG in float32, while guide() hands
    # back the guided prediction in the denoiser's dtype: one bfloat16 rounding more per step there
    np.testing.assert_allclose(guided, reference, atol=0.08 if name == "sana" else 0.03)
