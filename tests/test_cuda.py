"""CUDA-only checks: guidance and protection in half precision on a GPU (skipped without CUDA).

``python -m benchmarks.gpu`` runs them on the day a GPU is lent (``pytest -m cuda``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidance import APG, CFG, PAG, guide
from protect import protect
from tests.factories import BUILDERS, default_call_kwargs, tiny_vae

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
EPS = 8 / 255


def run(pipe, **extra):
    kwargs = default_call_kwargs(pipe) | {"output_type": "np"} | extra
    return pipe(**kwargs, generator=torch.Generator("cuda").manual_seed(0)).images


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3", "flux", "dit"])
def test_cfg_through_guide_equals_the_pipelines_own_cfg_in_half_precision(name, dtype):
    pipe = BUILDERS[name]().to("cuda", dtype)
    scale = {"flux": {"true_cfg_scale": 3.0, "negative_prompt": ""}}.get(name, {"guidance_scale": 3.0})
    reference = run(pipe, **scale)
    with guide(pipe, CFG(3.0)):
        guided = run(pipe, **({"negative_prompt": ""} if name == "flux" else {}))
    with guide(pipe, APG(3.0)):
        apg = run(pipe)
    assert np.isfinite(apg).all() and np.abs(apg - guided).max() > 0
    np.testing.assert_allclose(guided, reference, atol=0.03)  # half-precision rounding over 3 steps


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cfg_plus_pag_equals_diffusers_sdxl_pag_pipeline_on_cuda(dtype):
    from diffusers import StableDiffusionXLPAGPipeline

    pipe = BUILDERS["sdxl"]().to("cuda", dtype)
    theirs = StableDiffusionXLPAGPipeline(**pipe.components, pag_applied_layers=["mid"])
    theirs.set_progress_bar_config(disable=True)
    reference = run(theirs, guidance_scale=4.0, pag_scale=2.0)
    with guide(pipe, CFG(4.0), PAG(2.0, layers=("mid",))):
        ours = run(pipe)
    np.testing.assert_allclose(ours, reference, atol=0.03)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_guidance_rescale_and_slg_in_half_precision_equal_the_pipelines_own(dtype):
    """The solved unconditional half (guidance_rescale) and the skipped block's rows (SLG) in half precision."""
    from guidance import SLG

    sdxl = BUILDERS["sdxl"]().to("cuda", dtype)
    reference = run(sdxl, guidance_scale=4.0, guidance_rescale=0.7)
    with guide(sdxl, CFG(4.0)):
        np.testing.assert_allclose(run(sdxl, guidance_rescale=0.7), reference, atol=0.03)
    sd3 = BUILDERS["sd3_2layers"]().to("cuda", dtype)
    window = {"skip_layer_guidance_start": 0.01, "skip_layer_guidance_stop": 0.8}
    reference = run(sd3, guidance_scale=4.0, skip_guidance_layers=[0], skip_layer_guidance_scale=2.8, **window)
    with guide(sd3, CFG(4.0), SLG(2.8, layers=(0,), start=0.01, stop=0.8)):
        np.testing.assert_allclose(run(sd3, guidance_scale=4.0), reference, atol=0.03)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["photoguard", "amortized"])
def test_protection_in_half_precision_keeps_the_budget_and_range_exactly(method, dtype):
    from protect import AmortizedProtector

    torch.manual_seed(0)
    vae = tiny_vae((8, 16)).to("cuda", dtype)
    images = torch.rand(2, 3, 64, 64, device="cuda").to(dtype)
    extra = {"protector": AmortizedProtector(num_experts=3, patch_size=8, hidden=4).to("cuda").eval()}
    if method == "photoguard":
        extra = {"steps": 3, "generator": [torch.Generator("cuda").manual_seed(i) for i in range(2)]}
    out, report = protect(images, method, vae=vae, eps=EPS, **extra)
    assert out.device.type == "cuda" and out.dtype == dtype and out.shape == images.shape
    assert (out.double() - images.double()).abs().max() <= EPS
    assert out.min() >= 0 and out.max() <= 1 and max(report.linf) > 0


def test_the_apps_detect_scores_uploads_on_the_gpu_with_the_cpu_verdicts():
    from PIL import Image

    from apps.services import detect_images, load_detector

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)) for _ in range(2)]
    on_gpu = load_detector(device="cuda", dtype="float32")
    assert on_gpu.reference.device.type == "cuda"
    gpu, cpu = detect_images(on_gpu, images), detect_images(load_detector(device="cpu", dtype="float32"), images)
    for a, b in zip(gpu, cpu):
        assert a["verdict"] == b["verdict"] and a["patches"] == b["patches"]
        assert abs(a["score"] - b["score"]) <= 1e-3 * max(1.0, abs(b["score"]))


def test_the_amortized_protector_runs_where_it_is_with_a_vae_elsewhere():
    """A CPU protector with a CUDA VAE (and the reverse): the gate reads the latents on its own device."""
    from protect import AmortizedProtector

    torch.manual_seed(0)
    protector = AmortizedProtector(num_experts=3, patch_size=8, hidden=4).eval()
    x = torch.rand(1, 3, 24, 40)
    for vae_device, protector_device in (("cuda", "cpu"), ("cpu", "cuda")):
        vae = tiny_vae((8, 16), 0).to(vae_device)
        out, _ = protector.to(protector_device).protect(x.to(protector_device), vae, eps=EPS)
        assert out.device.type == protector_device and (out - x.to(out)).abs().max() <= EPS + 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_aspl_in_half_precision_on_the_gpu(dtype):
    """ASPL with a half-precision VAE and denoiser on CUDA: the fine-tunes run on a float32 copy on the GPU, the
    budget holds exactly, the given denoiser keeps its dtype and weights."""
    from protect import Finetune
    from tests.test_protect import TinyDenoiser

    torch.manual_seed(0)
    vae = tiny_vae((8, 16)).to("cuda", dtype)
    denoiser = TinyDenoiser().to("cuda", dtype)
    before = {k: v.clone() for k, v in denoiser.state_dict().items()}
    images = torch.rand(2, 3, 64, 64, device="cuda").to(dtype)
    out, report = protect(
        images, "aspl", vae=vae, denoiser=denoiser, eps=EPS, steps=4, finetune=Finetune(lr=1e-3, pgd_steps=2),
        generator=torch.Generator("cuda").manual_seed(0),
    )  # fmt: skip
    assert out.device.type == "cuda" and out.dtype == dtype and (out.double() - images.double()).abs().max() <= EPS
    assert all(torch.equal(v, denoiser.state_dict()[k]) for k, v in before.items()) and max(report.linf) > 0


def test_the_schedule_and_denoiser_lookups_make_no_host_sync_after_the_first_step():
    """APG in x0 space and the score samplers read the noise schedule each step: after the first, from a device
    copy (a host-to-device copy per step waits for the queued GPU work; it cost ~5 % per SDXL step on an H200)."""
    from diffusers import EulerDiscreteScheduler

    from guidance.denoisers import DiffusersDenoiser
    from guidance.families import schedule_of

    scheduler = EulerDiscreteScheduler()
    schedule = schedule_of(scheduler)
    denoiser = DiffusersDenoiser(torch.nn.Identity(), scheduler)
    t = torch.tensor([981.0, 500.5], device="cuda")

    def step():
        alpha, sigma = schedule.alpha_sigma(t)
        return alpha, schedule.coefficients(alpha, sigma), denoiser.sigma_to_t(denoiser.t_to_sigma(t))

    step()  # the first step copies the tables
    torch.cuda.set_sync_debug_mode("error")  # a blocking host-device copy now raises
    try:
        alpha, coefficients, round_trip = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert alpha.device.type == coefficients[0].device.type == "cuda"
    torch.testing.assert_close(round_trip, t, rtol=1e-5, atol=1e-3)
