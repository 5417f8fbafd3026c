"""Tiny random-weight diffusers pipelines for fast, offline tests.

Every builder seeds torch before creating each component, so two calls return
pipelines with identical float32 CPU weights; nothing is downloaded (the
tokenizers are built in memory). ``default_call_kwargs`` gives small, valid
call arguments for any pipeline built here, and ``BUILDERS`` names every
variant::

    pipe = BUILDERS["sd"]()
    out = pipe(**default_call_kwargs(pipe), generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import contextlib
import string
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.models.attention_processor import AttnProcessor
from PIL import Image
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

SEED = 0
PROMPT = "a photo of a tiny squirrel eating a burger"
CLIP_HIDDEN = 32
CLIP_PROJECTION = 32
IMAGE_SIZE = 32

# Ids of the special tokens in the vocabulary built by `clip_tokenizer`:
# 256 byte characters, the same 256 with "</w>", then BOS and EOS (= pad).
CLIP_BOS_ID = 512
CLIP_EOS_ID = 513
CLIP_VOCAB_SIZE = 514
T5_VOCAB_SIZE = 128  # >= len(t5_tokenizer()) == 98


# --------------------------------------------------------------------------- tokenizers


def clip_tokenizer() -> CLIPTokenizer:
    """Byte-level CLIP tokenizer without merges (one token per byte), max length 77."""
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = CLIP_BOS_ID
    vocab["<|endoftext|>"] = CLIP_EOS_ID
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    assert tokenizer.bos_token_id == CLIP_BOS_ID
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == CLIP_EOS_ID
    return tokenizer


def t5_tokenizer() -> T5TokenizerFast:
    """Character-level T5 (Unigram) tokenizer over printable ASCII; pad 0, eos 1, unk 2."""
    chars = [c for c in string.printable if not c.isspace()]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0), *[(c, -2.0) for c in chars]]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


# --------------------------------------------------------------------------- components


def clip_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=CLIP_HIDDEN,
        intermediate_size=37,
        projection_dim=CLIP_PROJECTION,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=CLIP_BOS_ID,
        eos_token_id=CLIP_EOS_ID,
        pad_token_id=CLIP_EOS_ID,
    )


def _clip_text_model(seed: int = SEED) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(clip_config()).eval()


def _clip_text_model_with_projection(seed: int = SEED) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(clip_config()).eval()


def _t5_encoder(d_model: int = 32, seed: int = SEED) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=T5_VOCAB_SIZE,
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def _vae(
    block_out_channels: tuple[int, ...] = (32, 64),
    norm_num_groups: int = 32,
    flow: bool = False,
    seed: int = SEED,
    latent_channels: int = 4,
) -> AutoencoderKL:
    """KL autoencoder (4 latent channels unless told); scale factor ``2 ** (len(block_out_channels) - 1)``.

    ``flow=True`` mirrors the SD3 / Flux VAE config (no quant convs, a shift factor).
    """
    torch.manual_seed(seed)
    n = len(block_out_channels)
    extra: dict[str, Any] = (
        {"use_quant_conv": False, "use_post_quant_conv": False, "shift_factor": 0.0609, "scaling_factor": 1.5035}
        if flow
        else {"scaling_factor": 0.18215}
    )
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=IMAGE_SIZE,
        force_upcast=False,  # everything is float32; avoids SDXL img2img re-casting the VAE on every call
        **extra,
    ).eval()


def tiny_vae(block_out_channels: tuple[int, ...] = (8, 16), seed: int = 0) -> AutoencoderKL:
    """A very small KL autoencoder (4 latent channels, stride ``2 ** (len(block_out_channels) - 1)``) for the
    protection tests."""
    return _vae(block_out_channels, norm_num_groups=4, seed=seed)


def _qwen_vae() -> Any:
    """The tiny Qwen-Image VAE (4 latent channels, stride 8), for Qwen-Image and Krea 2."""
    import diffusers

    return diffusers.AutoencoderKLQwenImage(
        base_dim=24,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ).eval()


def _with_weights(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with its all-zero parameters (zero-initialised output projections and tables) drawn from
    N(0, 0.5), so that a tiny random model's every part acts (seeded by the caller)."""
    with torch.no_grad():
        for parameter in module.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.5)
    return module


def _finish(pipe: DiffusionPipeline) -> DiffusionPipeline:
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            dtypes = {p.dtype for p in module.parameters()}
            assert dtypes == {torch.float32}, f"{name} has parameter dtypes {dtypes}"
    pipe.set_progress_bar_config(disable=True)
    return pipe


class UnlistedAttnProcessor(AttnProcessor):
    """An attention processor outside steerguard's lists: explicit softmax (no SDPA), and its name is not one of
    the value-path processors (a subclass may change what the attention computes)."""

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return super().__call__(*args, **kwargs)


# --------------------------------------------------------------------------- builders


def tiny_sd(prediction_type: str = "epsilon", img2img: bool = False) -> DiffusionPipeline:
    """SD 1.x-style pipeline: UNet (32, 64), CLIP text encoder, DDIM with ``prediction_type``."""
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CLIP_HIDDEN,
        attention_head_dim=4,
        norm_num_groups=32,
    ).eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    pipe = cls(
        vae=_vae(),
        text_encoder=_clip_text_model(),
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    return _finish(pipe)


def _sdxl_unet(cross_attention_dim: int, pooled_dim: int, **extra: Any) -> UNet2DConditionModel:
    """A tiny SDXL-style UNet with ``text_time`` added conditioning: 6 micro-conditioning ints (original size,
    crop, target size) embedded at width 8, beside a pooled text embedding of ``pooled_dim`` (``extra`` adds to or
    replaces the config)."""
    config: dict[str, Any] = dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 1),
        cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + pooled_dim,
        norm_num_groups=32,
    )
    return UNet2DConditionModel(**config | extra).eval()


def tiny_sdxl(img2img: bool = False) -> DiffusionPipeline:
    """SDXL-style pipeline: two CLIP encoders (hidden states concatenated), ``text_time`` added conditioning."""
    torch.manual_seed(SEED)
    # both encoders' hidden states, concatenated; the pooled text_encoder_2 projection
    unet = _sdxl_unet(cross_attention_dim=2 * CLIP_HIDDEN, pooled_dim=CLIP_PROJECTION)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    components: dict[str, Any] = {
        "vae": _vae(),
        "text_encoder": _clip_text_model(seed=SEED),
        "text_encoder_2": _clip_text_model_with_projection(seed=SEED + 1),
        "tokenizer": clip_tokenizer(),
        "tokenizer_2": clip_tokenizer(),
        "unet": unet,
        "scheduler": scheduler,
        "image_encoder": None,
        "feature_extractor": None,
        "add_watermarker": False,
    }
    if img2img:
        pipe: DiffusionPipeline = StableDiffusionXLImg2ImgPipeline(**components, requires_aesthetics_score=False)
    else:
        pipe = StableDiffusionXLPipeline(**components)
    return _finish(pipe)


def tiny_instruct_pix2pix(xl: bool = False) -> DiffusionPipeline:
    """InstructPix2Pix: the SD 1.x-style pipeline (``xl``: SDXL-style, Euler) on a UNet that takes the input image's
    4 latent channels after the latents (8 in, 4 out)."""
    import diffusers

    if xl:
        base = tiny_sdxl()
        torch.manual_seed(SEED)
        unet = _sdxl_unet(cross_attention_dim=2 * CLIP_HIDDEN, pooled_dim=CLIP_PROJECTION, in_channels=8)
        drop = ("image_encoder", "feature_extractor", "unet")
        parts = {k: v for k, v in base.components.items() if k not in drop}
        pipe: DiffusionPipeline = diffusers.StableDiffusionXLInstructPix2PixPipeline(
            **parts, unet=unet, add_watermarker=False
        )
        return _finish(pipe)
    base = tiny_sd()
    torch.manual_seed(SEED)
    config = dict(base.unet.config) | {"in_channels": 8}
    unet = UNet2DConditionModel.from_config(config).eval()
    pipe = diffusers.StableDiffusionInstructPix2PixPipeline(
        **base.components | {"unet": unet}, requires_safety_checker=False
    )
    return _finish(pipe)


def instruct_pix2pix_call_kwargs(batch: int = 2) -> dict[str, Any]:
    """Small valid call kwargs for :func:`tiny_instruct_pix2pix`: ``batch`` instructions on one seeded random 32 px
    image, 3 steps, numpy images out; the pipeline's default image guidance (1.5); no generator nor text guidance."""
    prompts = ["make it snow", "turn the sky red", "add a small boat"][:batch]
    image = random_image(IMAGE_SIZE, seed=SEED + 31)
    return {"prompt": prompts, "image": [image] * batch, "num_inference_steps": 3, "output_type": "np"}


def tiny_sd3(img2img: bool = False, latent_channels: int = 4, num_layers: int = 1) -> DiffusionPipeline:
    """SD3-style MMDiT (``num_layers`` layers, 4 heads of 8) with two projected CLIP encoders, a T5, and flow
    matching.

    ``latent_channels=16`` (SD3's own) is what diffusers' SD3 inpainting pipeline requires."""
    t5_dim = 2 * CLIP_HIDDEN  # CLIP hidden states are concatenated, then zero-padded to the T5 width
    torch.manual_seed(SEED)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=1,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=t5_dim,
        caption_projection_dim=32,  # must equal heads * head_dim
        pooled_projection_dim=2 * CLIP_PROJECTION,
        pos_embed_max_size=64,
    ).eval()
    cls = StableDiffusion3Img2ImgPipeline if img2img else StableDiffusion3Pipeline
    pipe = cls(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(flow=True, latent_channels=latent_channels),
        text_encoder=_clip_text_model_with_projection(seed=SEED),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_clip_text_model_with_projection(seed=SEED + 1),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5_encoder(d_model=t5_dim),
        tokenizer_3=t5_tokenizer(),
        image_encoder=None,
        feature_extractor=None,
    )
    return _finish(pipe)


def _dynamic_shift_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX's flow-matching scheduler: the shift grows with the image's token count (also Qwen-Image's, Chroma's)."""
    return FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def recorded_run(pipe: DiffusionPipeline, run: Callable[[], Any]) -> tuple[list[tuple], list[torch.Tensor]]:
    """``run()`` (a call of ``pipe``, guided or not) recording each denoiser call's ``(hidden_states, timestep,
    output)`` and the prediction each scheduler step receives (after the pipeline's own CFG). Per-sample lists
    (Z-Image's latents and outputs) are recorded stacked."""
    from guidance.pipeline import family_of

    calls: list[tuple] = []
    steps: list[torch.Tensor] = []
    denoiser = getattr(pipe, family_of(pipe).denoiser)
    stacked = lambda value: torch.stack(value) if isinstance(value, list) else value

    def record(module: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # Sana passes it positionally
        named = [kwargs[name] for name in ("timestep", "timesteps") if name in kwargs]  # HiDream: ``timesteps``
        timestep = named[0] if named else args[1]  # Z-Image: ``t``, positionally
        calls.append((stacked(hidden).detach().clone(), timestep, stacked(out[0]).detach().clone()))

    hook = denoiser.register_forward_hook(record, with_kwargs=True)
    scheduler_step = pipe.scheduler.step

    def record_step(output, *args, **kwargs):
        steps.append(output.detach().clone())
        return scheduler_step(output, *args, **kwargs)

    pipe.scheduler.step = record_step
    try:
        run()
    finally:
        hook.remove()
        del pipe.scheduler.step
    return calls, steps


def assert_modular_guider_equals_guide(
    classic: DiffusionPipeline,
    core: type,
    method: Any,
    *,
    modular_kwargs: dict[str, Any],
    classic_kwargs: dict[str, Any],
    own_scale: float,
    output: str = "images",
) -> None:
    """diffusers' modular denoise blocks ``core`` on ``classic``'s transformer and scheduler, called with the
    embeddings (so no text encoder): diffusers' CFG guider at 4 equals the classic pipeline's own CFG (its scale
    argument ``own_scale``), and ``as_guider(CFG(4), method)`` equals ``guide(classic, CFG(4), method)``; the method
    changes the result. ``output``: the classic pipeline's output field of the latents."""
    from diffusers.guiders import ClassifierFreeGuidance

    from guidance import CFG, guide
    from guidance.modular import as_guider

    modular = core().init_pipeline()
    modular.update_components(transformer=classic.transformer, scheduler=classic.scheduler)
    modular.set_progress_bar_config(disable=True)

    def run_modular(guider: Any) -> torch.Tensor:
        modular.update_components(guider=guider)
        return modular(**modular_kwargs, output="latents", generator=torch.Generator().manual_seed(0))

    def run_classic(**extra: Any) -> torch.Tensor:
        call = classic_kwargs | {"output_type": "latent"} | extra
        return getattr(classic(**call, generator=torch.Generator().manual_seed(0)), output)

    own = run_classic(guidance_scale=own_scale)
    torch.testing.assert_close(run_modular(ClassifierFreeGuidance(guidance_scale=4.0)), own, atol=1e-5, rtol=0)
    with guide(classic, CFG(4.0), method):
        expected = run_classic()
    ours = run_modular(as_guider(CFG(4.0), method))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert (ours - own).abs().max() > 1e-3, "the method must change the result"


def apg_reference(pipe: DiffusionPipeline, method: Any, calls: list[tuple], tokens: int) -> list[torch.Tensor]:
    """The guided prediction of each step of a separate-unconditional-call pipeline (FLUX-style) from the
    :func:`recorded_run` ``(cond, uncond)`` outputs, the methods acting on the first ``tokens`` tokens (the paper's
    x0 space with the pipeline's flow schedule; the denoiser saw ``t / 1000``)."""
    from guidance.pipeline import schedule_of
    from guidance.prediction import broadcast

    schedule, state, guided = schedule_of(pipe.scheduler), method.new_state("flux"), []
    for (x, t, cond), (_, _, uncond) in zip(calls[::2], calls[1::2]):
        x, cond, uncond = x[:, :tokens].float(), cond[:, :tokens].float(), uncond[:, :tokens].float()
        a, b = schedule.coefficients(*schedule.alpha_sigma(torch.as_tensor(t).reshape(-1).float() * 1000))
        a, b = broadcast(a, x), broadcast(b, x)
        guided.append(cond + method.update(a * x + b * cond, a * x + b * uncond, state) / b)
    return guided


def assert_apg_acts_on_the_generated_tokens_only(pipe: DiffusionPipeline, call: Callable[[], Any], control: float):
    """Run ``call()`` (a call of ``pipe`` with a reference image, whose tokens follow the generated ones) under
    ``guide(pipe, APG(6.0))``: every step's prediction equals :func:`apg_reference` on the generated tokens, and the
    same formula over every token (reference tokens included) differs by more than ``control``."""
    from guidance import APG, guide

    method = APG(6.0)  # the auto norm threshold and the paper's momentum: both per sample, over its tokens

    def run() -> None:
        with guide(pipe, method):
            call()

    calls, steps = recorded_run(pipe, run)
    generated = steps[0].shape[1]
    assert len(calls) == 2 * len(steps) and calls[0][0].shape[1] > generated  # reference tokens follow
    for ours, reference in zip(steps, apg_reference(pipe, method, calls, generated)):
        torch.testing.assert_close(ours.float(), reference, rtol=1e-4, atol=1e-5)
    everything = apg_reference(pipe, method, calls, calls[0][0].shape[1])
    assert max((e[:, :generated] - s).abs().max().item() for e, s in zip(everything, steps)) > control


def tiny_flux(img2img: bool = False, guidance_embeds: bool = True, in_channels: int = 16) -> DiffusionPipeline:
    """Flux-style transformer (1 double + 1 single block), CLIP pooled + T5 text, flow matching with dynamic shift
    (``in_channels`` above 16: mask / control channels follow the latents, as FLUX Fill and Control take them)."""
    torch.manual_seed(SEED)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=in_channels,  # 4 latent channels packed 2x2, then any extra input channels
        out_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5 width
        pooled_projection_dim=CLIP_HIDDEN,  # CLIPTextModel pooler output
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),  # sums to attention_head_dim
    ).eval()
    scheduler = _dynamic_shift_scheduler()
    cls = FluxImg2ImgPipeline if img2img else FluxPipeline
    pipe = cls(
        scheduler=scheduler,
        vae=_vae(flow=True),
        text_encoder=_clip_text_model(),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_t5_encoder(d_model=32),
        tokenizer_2=t5_tokenizer(),
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )
    return _finish(pipe)


def tiny_kontext(inpaint: bool = False) -> DiffusionPipeline:
    """FLUX Kontext (or Kontext inpainting) on :func:`tiny_flux`'s components: the reference image's latent tokens
    follow the generated ones in the transformer's input."""
    import diffusers

    cls = diffusers.FluxKontextInpaintPipeline if inpaint else diffusers.FluxKontextPipeline
    accepted = cls.__init__.__code__.co_varnames
    return _finish(cls(**{k: v for k, v in tiny_flux().components.items() if k in accepted}))


def kontext_call_kwargs(pipe: DiffusionPipeline, reference: bool = True) -> dict[str, Any]:
    """Small valid call kwargs for :func:`tiny_kontext` (a 48 x 32 reference image unless ``reference`` is False:
    Kontext then generates from text alone), without ``generator`` and guidance settings."""
    kwargs: dict[str, Any] = {
        "prompt": PROMPT,
        "height": IMAGE_SIZE,
        "width": IMAGE_SIZE,
        "num_inference_steps": 3,
        "output_type": "np",
        "max_sequence_length": 64,
        "max_area": IMAGE_SIZE**2,
        "_auto_resize": False,
    }
    if reference:
        kwargs["image"] = random_image(48).crop((0, 0, 48, 32))
    if type(pipe).__name__ == "FluxKontextInpaintPipeline":
        mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
        mask[8:24, 8:24] = 255
        kwargs["image"] = random_image(IMAGE_SIZE, seed=SEED + 5)
        kwargs["mask_image"] = Image.fromarray(mask)
        kwargs["strength"] = 1.0
        if reference:
            kwargs["image_reference"] = random_image(48).crop((0, 0, 48, 32))
    return kwargs


#: FLUX pipelines without true CFG (guidance-distilled models: perturbation guidance only) and the channels their
#: transformer takes beside the 16 packed latent channels (Fill: masked-image latents and the packed 2x2 mask)
FLUX_DISTILLED = {
    "FluxFillPipeline": 16 + 16,
    "FluxControlPipeline": 16,
    "FluxControlImg2ImgPipeline": 16,
    "FluxControlInpaintPipeline": 16,
    "FluxControlNetImg2ImgPipeline": 0,
    "FluxControlNetInpaintPipeline": 0,
}


def tiny_flux_distilled(name: str) -> DiffusionPipeline:
    """One of :data:`FLUX_DISTILLED` on :func:`tiny_flux`'s components (its transformer widened for the extra
    input channels; a ControlNet for the ControlNet ones)."""
    import diffusers

    base = tiny_flux(in_channels=16 + FLUX_DISTILLED[name])
    components = dict(base.components)
    if "ControlNet" in name:
        components["controlnet"] = _controlnet_for(base)
    cls = getattr(diffusers, name)
    accepted = cls.__init__.__code__.co_varnames
    return _finish(cls(**{k: v for k, v in components.items() if k in accepted}))


def flux_distilled_call_kwargs(pipe: DiffusionPipeline) -> dict[str, Any]:
    """Small valid call kwargs for a :func:`tiny_flux_distilled` pipeline (no generator, no guidance settings)."""
    name = type(pipe).__name__
    kwargs = {"prompt": PROMPT, "height": IMAGE_SIZE, "width": IMAGE_SIZE, "num_inference_steps": 3}
    kwargs |= {"output_type": "np", "max_sequence_length": 64}
    if name != "FluxFillPipeline":
        kwargs["control_image"] = random_image(IMAGE_SIZE, seed=SEED + 3)
    if "Inpaint" in name or name == "FluxFillPipeline":
        mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
        mask[8:24, 8:24] = 255
        kwargs["mask_image"] = Image.fromarray(mask)
    if name != "FluxControlPipeline":
        kwargs["image"] = random_image(IMAGE_SIZE)
    if "Img2Img" in name or "Inpaint" in name:
        kwargs["strength"] = 0.99
        kwargs["num_inference_steps"] = 4
    return kwargs


def tiny_qwen(kind: str = "") -> DiffusionPipeline:
    """Qwen-Image (``kind`` "", "img2img" or "inpaint"): a 2-block transformer, a tiny Qwen-Image VAE, no text
    encoder or tokenizer (call it with :func:`qwen_call_kwargs`' embeddings), flow matching with dynamic shift."""
    import diffusers

    torch.manual_seed(SEED)
    transformer = diffusers.QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,  # 4 latent channels packed 2x2
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(8, 4, 4),
    ).eval()
    vae = _qwen_vae()
    scheduler = _dynamic_shift_scheduler()
    name = {
        "": "QwenImagePipeline",
        "img2img": "QwenImageImg2ImgPipeline",
        "inpaint": "QwenImageInpaintPipeline",
        "edit": "QwenImageEditPipeline",
        "edit_plus": "QwenImageEditPlusPipeline",
        "edit_inpaint": "QwenImageEditInpaintPipeline",
        "controlnet": "QwenImageControlNetPipeline",
        "controlnet_inpaint": "QwenImageControlNetInpaintPipeline",
    }
    cls = getattr(diffusers, name[kind])
    parts = {"scheduler": scheduler, "vae": vae, "text_encoder": None, "tokenizer": None, "transformer": transformer}
    if kind.startswith("edit"):
        parts["processor"] = None
    if kind.startswith("controlnet"):  # the inpainting ControlNet also reads the mask (4 channels: packed 2x2)
        torch.manual_seed(SEED + 7)
        config = {key: transformer.config[key] for key in ("patch_size", "in_channels", "out_channels")}
        config |= {key: transformer.config[key] for key in ("attention_head_dim", "num_attention_heads")}
        config |= {"joint_attention_dim": 16, "axes_dims_rope": (8, 4, 4), "num_layers": 1}
        extra = 4 if kind == "controlnet_inpaint" else 0  # the mask, packed 2x2
        parts["controlnet"] = diffusers.QwenImageControlNetModel(**config, extra_condition_channels=extra).eval()
    return _finish(cls(**parts))


def qwen_call_kwargs(pipe: DiffusionPipeline, negative: bool = True) -> dict[str, Any]:
    """Small valid call kwargs for :func:`tiny_qwen`: seeded prompt embeddings (7 tokens) and, with ``negative``,
    negative ones (5 tokens), no generator and no guidance settings."""
    g = torch.Generator().manual_seed(SEED + 11)
    kwargs: dict[str, Any] = {
        "prompt_embeds": torch.randn(1, 7, 16, generator=g),
        "prompt_embeds_mask": torch.ones(1, 7, dtype=torch.long),
        "height": IMAGE_SIZE,
        "width": IMAGE_SIZE,
        "num_inference_steps": 3,
        "output_type": "np",
    }
    if negative:
        kwargs["negative_prompt_embeds"] = torch.randn(1, 5, 16, generator=g)
        kwargs["negative_prompt_embeds_mask"] = torch.ones(1, 5, dtype=torch.long)
    name = type(pipe).__name__
    if "ControlNet" in name:
        kwargs["control_image"] = random_image(IMAGE_SIZE, seed=SEED + 3)
        if "Inpaint" in name:
            mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
            mask[8:24, 8:24] = 255
            kwargs["control_mask"] = Image.fromarray(mask)
        return kwargs
    if "Edit" in name:  # the reference image (48 x 32: its tokens outnumber the 32 x 32 output's)
        kwargs["image"] = random_image(48).crop((0, 0, 48, 32))
    elif "Img2Img" in name or "Inpaint" in name:
        kwargs["image"] = random_image(IMAGE_SIZE)
    if "Img2Img" in name or "Inpaint" in name:
        kwargs["strength"] = 0.99
        kwargs["num_inference_steps"] = 4
    if "Inpaint" in name:
        width, height = kwargs["image"].size
        mask = np.zeros((height, width), dtype=np.uint8)
        mask[8:24, 8:24] = 255
        kwargs["mask_image"] = Image.fromarray(mask)
    return kwargs


class _Qwen21Processor:
    """What Qwen-Image 2.1's pipeline reads off its processor when built (called with prompt embeddings, it never
    tokenizes): the system message's token count and the image-pad token's id."""

    class tokenizer:  # the processor's attribute, lower case
        @staticmethod
        def encode(text: str) -> list[int]:
            return [151655]

    @staticmethod
    def apply_chat_template(messages: Any, tokenize: bool = True, return_dict: bool = False) -> list[list[int]]:
        return [[0] * 12]


def tiny_qwen21() -> DiffusionPipeline:
    """Qwen-Image 2.1: a 2-block single-stream transformer (2 heads of 16) over [text, image] under its block-causal
    mask, a tiny Qwen-Image 2.1 VAE (16 latent channels), flow matching, no text encoder (a stub processor; call it
    with :func:`qwen21_call_kwargs`' embeddings; 64 px make 4 x 4 tokens)."""
    import diffusers

    torch.manual_seed(SEED)
    transformer = diffusers.QwenImage21Transformer2DModel(
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        context_in_dim=32,
        mlp_ratio=2,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    torch.manual_seed(SEED)
    vae = diffusers.AutoencoderKLQwenImage21(
        base_dim=8,
        decoder_base_dim=8,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 16,
        latents_std=[1.0] * 16,
    ).eval()
    parts = {"text_encoder": None, "processor": _Qwen21Processor(), "vae": vae, "transformer": transformer}
    return _finish(diffusers.QwenImage21Pipeline(**parts, scheduler=FlowMatchEulerDiscreteScheduler()))


def qwen21_call_kwargs(batch: int = 2, tokens: int = 7) -> dict[str, Any]:
    """Small valid call kwargs for :func:`tiny_qwen21`: seeded prompt and negative embeddings ``(batch, tokens, 32)``
    with their masks (the last token padding), 64 px, 3 steps, the packed latents as output; no generator nor
    guidance."""
    g = torch.Generator().manual_seed(SEED + 41)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[:, -1] = False
    kwargs: dict[str, Any] = {"height": 64, "width": 64, "num_inference_steps": 3, "output_type": "latent"}
    for prefix in ("", "negative_"):
        kwargs[f"{prefix}prompt_embeds"] = torch.randn(batch, tokens, 32, generator=g)
        kwargs[f"{prefix}prompt_embeds_mask"] = mask.clone()
    return kwargs


def tiny_chroma(kind: str = "") -> DiffusionPipeline:
    """Chroma (``kind`` "" or "img2img"): a FLUX-like transformer (1 double + 1 single block) whose
    modulations come from an approximator, T5 text, flow matching with dynamic shift."""
    import diffusers

    torch.manual_seed(SEED)
    transformer = diffusers.ChromaTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5 width
        axes_dims_rope=(4, 4, 8),
        approximator_num_channels=8,
        approximator_hidden_dim=32,
        approximator_layers=1,
    ).eval()
    scheduler = _dynamic_shift_scheduler()
    name = {"": "ChromaPipeline", "img2img": "ChromaImg2ImgPipeline"}[kind]
    cls = getattr(diffusers, name)
    pipe = cls(
        scheduler=scheduler,
        vae=_vae(flow=True),
        text_encoder=_t5_encoder(d_model=32),
        tokenizer=t5_tokenizer(),
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )
    return _finish(pipe)


def tiny_hunyuandit(controlnet: bool = False) -> DiffusionPipeline:
    """HunyuanDiT: a 2-block transformer with learned sigma (its pipeline computes the rotary grid at stride 8, so
    the VAE is a 4-level tiny one), no text encoders (call it with :func:`hunyuandit_call_kwargs`' embeddings);
    ``controlnet``: the ControlNet pipeline, a 4-block transformer and a ControlNet of its shape (its zero-initialised
    output projections drawn, so the control matters)."""
    import diffusers

    torch.manual_seed(SEED)
    transformer = diffusers.HunyuanDiT2DModel(
        sample_size=16,
        num_layers=4 if controlnet else 2,  # the ControlNet adds to the skips of the blocks past the middle
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        in_channels=4,
        cross_attention_dim=32,
        cross_attention_dim_t5=32,
        pooled_projection_dim=16,
        hidden_size=24,
        text_len=8,
        text_len_t5=8,
    ).eval()
    parts = {"text_encoder": None, "tokenizer": None, "text_encoder_2": None, "tokenizer_2": None}
    parts |= {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    parts |= {"vae": tiny_vae((8, 8, 16, 16)), "transformer": transformer, "scheduler": diffusers.DDPMScheduler()}
    if not controlnet:
        return _finish(diffusers.HunyuanDiTPipeline(**parts))
    torch.manual_seed(SEED + 3)
    config = {k: transformer.config[k] for k in ("num_attention_heads", "attention_head_dim", "in_channels")}
    config |= {k: transformer.config[k] for k in ("patch_size", "sample_size", "hidden_size", "cross_attention_dim")}
    config |= {k: transformer.config[k] for k in ("cross_attention_dim_t5", "pooled_projection_dim", "text_len")}
    net = diffusers.HunyuanDiT2DControlNetModel(
        **config, text_len_t5=transformer.config.text_len_t5, transformer_num_layers=transformer.config.num_layers
    ).eval()
    for p in net.parameters():
        if not p.abs().sum():
            torch.nn.init.normal_(p, std=0.05)
    return _finish(diffusers.HunyuanDiTControlNetPipeline(**parts, controlnet=net))


def hunyuandit_call_kwargs() -> dict[str, Any]:
    """Small valid call kwargs for :func:`tiny_hunyuandit`: seeded BERT- and T5-sized prompt and negative
    embeddings (8 tokens each), no generator and no guidance settings."""
    g = torch.Generator().manual_seed(SEED + 13)
    kwargs: dict[str, Any] = {"height": IMAGE_SIZE, "width": IMAGE_SIZE, "num_inference_steps": 3}
    kwargs |= {"output_type": "np", "use_resolution_binning": False}
    for prefix in ("", "negative_"):
        for suffix in ("", "_2"):
            kwargs[f"{prefix}prompt_embeds{suffix}"] = torch.randn(1, 8, 32, generator=g)
            kwargs[f"{prefix}prompt_attention_mask{suffix}"] = torch.ones(1, 8, dtype=torch.long)
    return kwargs


def tiny_kolors() -> DiffusionPipeline:
    """Kolors: an SDXL-style UNet whose text comes through a projection (``encoder_hid_dim_type="text_proj"``, as
    ChatGLM's 4096-wide states do), no text encoder (call it with :func:`kolors_call_kwargs`' embeddings)."""
    import diffusers

    torch.manual_seed(SEED)
    # the text encoder's width (32) projected to the cross-attention width
    unet = _sdxl_unet(cross_attention_dim=64, pooled_dim=32, encoder_hid_dim=32, encoder_hid_dim_type="text_proj")
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.014, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    pipe = diffusers.KolorsPipeline(vae=_vae(), text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler)
    return _finish(pipe)


def kolors_call_kwargs() -> dict[str, Any]:
    """Small valid call kwargs for :func:`tiny_kolors`: seeded prompt and negative embeddings (sequence and pooled),
    no generator and no guidance settings."""
    g = torch.Generator().manual_seed(SEED + 17)
    kwargs: dict[str, Any] = {"height": IMAGE_SIZE, "width": IMAGE_SIZE, "num_inference_steps": 3, "output_type": "np"}
    for prefix in ("", "negative_"):
        kwargs[f"{prefix}prompt_embeds"] = torch.randn(1, 7, 32, generator=g)
        kwargs[f"{prefix}pooled_prompt_embeds"] = torch.randn(1, 32, generator=g)
    return kwargs


#: the tiny Sana transformers' sizes (2 heads of 4, 8-wide captions, 16x16 latents)
SANA_DIMS: dict[str, int] = {"num_attention_heads": 2, "attention_head_dim": 4, "num_cross_attention_heads": 2}
SANA_DIMS |= {"cross_attention_head_dim": 4, "cross_attention_dim": 8, "caption_channels": 8, "sample_size": 16}


def tiny_sana(controlnet: bool = False, timestep_scale: float = 1.0) -> DiffusionPipeline:
    """Sana: a 2-block linear-attention transformer (``timestep_scale``: what the pipeline multiplies the timestep
    by), a deep-compression autoencoder, flow matching with Sana's shift, no text encoder (call it with
    :func:`sana_call_kwargs`' embeddings); ``controlnet``: the ControlNet pipeline with a 1-block ControlNet."""
    import diffusers

    dims = SANA_DIMS
    torch.manual_seed(SEED)
    transformer = diffusers.SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=2, timestep_scale=timestep_scale, **dims
    ).eval()
    vae = diffusers.AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    ).eval()
    parts = {"tokenizer": None, "text_encoder": None, "vae": vae, "transformer": transformer}
    parts["scheduler"] = FlowMatchEulerDiscreteScheduler(shift=3.0)
    if not controlnet:
        return _finish(diffusers.SanaPipeline(**parts))
    torch.manual_seed(SEED + 1)
    net = diffusers.SanaControlNetModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1, **dims).eval()
    for p in net.parameters():  # a fresh ControlNet's output projections are zero: make the control matter
        torch.nn.init.normal_(p, std=0.05) if p.abs().sum() == 0 else None
    return _finish(diffusers.SanaControlNetPipeline(**parts, controlnet=net))


def tiny_sana_sprint(img2img: bool = False) -> DiffusionPipeline:
    """SANA-Sprint (text- or image-to-image): :func:`tiny_sana`'s autoencoder, a Sana transformer with a guidance
    embedding and SANA-Sprint's RMS-normed queries and keys, the TrigFlow ``SCMScheduler``; no text encoder."""
    import diffusers

    dims = SANA_DIMS
    torch.manual_seed(SEED)
    transformer = diffusers.SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=2, guidance_embeds=True,
        qk_norm="rms_norm_across_heads", **dims,
    ).eval()  # fmt: skip
    cls = diffusers.SanaSprintImg2ImgPipeline if img2img else diffusers.SanaSprintPipeline
    parts = {"tokenizer": None, "text_encoder": None, "vae": tiny_sana().vae, "transformer": transformer}
    return _finish(cls(**parts, scheduler=diffusers.SCMScheduler()))


def sana_call_kwargs(pipe: DiffusionPipeline | None = None) -> dict[str, Any]:
    """Small valid call kwargs for :func:`tiny_sana`: seeded prompt and negative embeddings with their masks (the
    prompt's last token masked out), a control image for the ControlNet pipeline; no generator nor guidance."""
    g = torch.Generator().manual_seed(SEED + 19)
    kwargs: dict[str, Any] = {"height": IMAGE_SIZE, "width": IMAGE_SIZE, "num_inference_steps": 3, "output_type": "np"}
    kwargs |= {"use_resolution_binning": False, "complex_human_instruction": None, "negative_prompt": None}
    for prefix in ("", "negative_"):
        kwargs[f"{prefix}prompt_embeds"] = torch.randn(1, 6, 8, generator=g)
        kwargs[f"{prefix}prompt_attention_mask"] = torch.ones(1, 6, dtype=torch.long)
    kwargs["prompt_attention_mask"][:, -1] = 0
    if pipe is not None and type(pipe).__name__ == "SanaControlNetPipeline":
        kwargs["control_image"] = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    return kwargs


#: the 2-block Wan-style transformer of the Wan family's tiny pipelines (2 heads of 12, patch 1x2x2, 16 latent
#: channels out, 32-wide text), without its input channels
WAN_BLOCKS: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "out_channels": 16,
    "text_dim": 32,
    "freq_dim": 256,
    "ffn_dim": 32,
    "num_layers": 2,
    "rope_max_seq_len": 32,
}


def tiny_wan(two_stages: bool = False, expand_timesteps: bool = False, image: bool = False) -> DiffusionPipeline:
    """Wan text-to-video: a 2-block transformer, a tiny Wan VAE (5 frames of 16 px), flow matching with Wan's shift,
    no text encoder (call it with :func:`wan_call_kwargs`' embeddings); ``two_stages``: Wan 2.2's second
    transformer for the low-noise half of the steps (``boundary_ratio`` 0.5); ``image``: image-to-video (the
    condition's 4 mask and 16 latent channels follow the latents; no image encoder, as Wan 2.2)."""
    import diffusers

    def transformer(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        channels = 36 if image and not expand_timesteps else 16  # TI2V: the image replaces frame 0
        return diffusers.WanTransformer3DModel(**WAN_BLOCKS, in_channels=channels).eval()

    torch.manual_seed(SEED)
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1).eval()
    parts = {
        "tokenizer": None,
        "text_encoder": None,
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=5.0),
    }
    parts |= {"transformer": transformer(SEED), "transformer_2": transformer(SEED + 1) if two_stages else None}
    parts |= {"boundary_ratio": 0.5 if two_stages else None, "expand_timesteps": expand_timesteps}
    if image:
        return _finish(diffusers.WanImageToVideoPipeline(**parts, image_processor=None, image_encoder=None))
    return _finish(diffusers.WanPipeline(**parts))


def tiny_skyreels_v2(image: bool = False) -> DiffusionPipeline:
    """SkyReels V2 text-to-video (``image``: image-to-video, the condition's mask and latents after the latents'
    channels, a tiny CLIP image encoder): a 2-block Wan-style transformer on :func:`tiny_wan`'s VAE and scheduler, no
    text encoder (call it with :func:`wan_call_kwargs`' embeddings)."""
    import diffusers
    from transformers import CLIPImageProcessor

    wan = tiny_wan()
    torch.manual_seed(SEED)
    transformer = diffusers.SkyReelsV2Transformer3DModel(
        **WAN_BLOCKS, in_channels=36 if image else 16, image_dim=32 if image else None
    ).eval()
    parts = {"tokenizer": None, "text_encoder": None, "transformer": transformer, "vae": wan.vae}
    parts["scheduler"] = wan.scheduler
    if image:
        encoder = tiny_svd().image_encoder
        processor = CLIPImageProcessor(crop_size=224, size=224)
        pipe = diffusers.SkyReelsV2ImageToVideoPipeline(**parts, image_encoder=encoder, image_processor=processor)
        return _finish(pipe)
    return _finish(diffusers.SkyReelsV2Pipeline(**parts))


def tiny_wan_vace() -> DiffusionPipeline:
    """Wan VACE: a 2-block Wan transformer with a VACE block on the first (control latents of 96 channels: inactive
    and reactive video latents and the 8x8 mask) on :func:`tiny_wan`'s VAE and scheduler, no text encoder."""
    import diffusers

    wan = tiny_wan()
    torch.manual_seed(SEED)
    transformer = diffusers.WanVACETransformer3DModel(**WAN_BLOCKS, in_channels=16, vace_layers=[0]).eval()
    parts = {"tokenizer": None, "text_encoder": None, "transformer": transformer, "vae": wan.vae}
    return _finish(diffusers.WanVACEPipeline(**parts, scheduler=wan.scheduler))


def tiny_wan_editor(name: str) -> DiffusionPipeline:
    """The editing pipelines built on Wan, on :func:`tiny_wan`'s VAE and scheduler with a 2-block transformer and no
    text encoder: ``"ChronoEditPipeline"`` (image-to-video's layout, a tiny CLIP image encoder) or
    ``"LucyEditPipeline"`` (the input video's 16 latent channels after the latents')."""
    import diffusers
    from transformers import CLIPImageProcessor

    wan = tiny_wan()
    parts = {"tokenizer": None, "text_encoder": None, "vae": wan.vae, "scheduler": wan.scheduler}
    torch.manual_seed(SEED)
    if name == "ChronoEditPipeline":
        transformer = diffusers.ChronoEditTransformer3DModel(**WAN_BLOCKS, in_channels=36, image_dim=32).eval()
        processor = CLIPImageProcessor(crop_size=224, size=224)
        parts |= {"image_encoder": tiny_svd().image_encoder, "image_processor": processor}
        return _finish(diffusers.ChronoEditPipeline(**parts, transformer=transformer))
    transformer = diffusers.WanTransformer3DModel(**WAN_BLOCKS, in_channels=32).eval()
    return _finish(diffusers.LucyEditPipeline(**parts, transformer=transformer))


def wan_call_kwargs(pipe: DiffusionPipeline | None = None) -> dict[str, Any]:
    """Small valid call kwargs for :func:`tiny_wan`: seeded prompt and negative embeddings, 5 frames of 16 px, 4
    steps, a 16 px first frame for image-to-video; no generator nor guidance settings."""
    g = torch.Generator().manual_seed(SEED + 23)
    kwargs: dict[str, Any] = {"height": 16, "width": 16, "num_frames": 5, "num_inference_steps": 4}
    kwargs |= {"output_type": "np", "prompt_embeds": torch.randn(1, 6, 32, generator=g)}
    kwargs["negative_prompt_embeds"] = torch.randn(1, 6, 32, generator=g)
    if pipe is not None and type(pipe).__name__ in ("WanImageToVideoPipeline", "SkyReelsV2ImageToVideoPipeline"):
        kwargs["image"] = noise_image((16, 16), seed=SEED + 29)
    return kwargs


def tiny_flux2(klein: bool = True, distilled: bool = False, inpaint: bool = False) -> DiffusionPipeline:
    """FLUX.2: a 1 double + 1 single block transformer (4 position axes), a tiny FLUX.2 VAE, flow matching with
    dynamic shift, no text encoder (call it with :func:`flux2_call_kwargs`' embeddings). ``klein``: the klein
    pipeline (real CFG; ``distilled``: its distilled checkpoints, no CFG); else FLUX.2 [dev] (guidance-distilled:
    the guidance embedding, no CFG); ``inpaint``: klein's inpainting pipeline (the masked image's tokens follow the
    generated ones)."""
    import diffusers

    torch.manual_seed(SEED)
    transformer = diffusers.Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=not klein,
    ).eval()
    vae = diffusers.AutoencoderKLFlux2(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    ).eval()
    parts = {"scheduler": _dynamic_shift_scheduler(), "vae": vae, "transformer": transformer}
    parts |= {"text_encoder": None, "tokenizer": None}
    if klein:
        cls = diffusers.Flux2KleinInpaintPipeline if inpaint else diffusers.Flux2KleinPipeline
        return _finish(cls(**parts, is_distilled=distilled))
    return _finish(diffusers.Flux2Pipeline(**parts))


def flux2_call_kwargs(pipe: DiffusionPipeline, image: bool = False) -> dict[str, Any]:
    """Small valid call kwargs for :func:`tiny_flux2`: seeded prompt (and for klein negative) embeddings, 32 px, 3
    steps; ``image``: a 64 px reference image (its tokens follow the generated ones); no generator nor guidance."""
    g = torch.Generator().manual_seed(SEED + 31)
    kwargs: dict[str, Any] = {"height": IMAGE_SIZE, "width": IMAGE_SIZE, "num_inference_steps": 3, "output_type": "np"}
    kwargs["prompt_embeds"] = torch.randn(1, 6, 32, generator=g)
    if type(pipe).__name__.startswith("Flux2Klein"):
        kwargs["negative_prompt_embeds"] = torch.randn(1, 6, 32, generator=g)
    if image or type(pipe).__name__ == "Flux2KleinInpaintPipeline":
        kwargs["image"] = noise_image((64, 64), seed=SEED + 37)  # the pipeline takes 64 px and up
    if type(pipe).__name__ == "Flux2KleinInpaintPipeline":  # a 64 px image, its left half masked, 4 steps at 0.9
        mask = np.zeros((64, 64), dtype=np.uint8)
        mask[:, :32] = 255
        kwargs |= {"mask_image": Image.fromarray(mask), "strength": 0.9, "height": 64, "width": 64}
        kwargs["num_inference_steps"] = 4
    return kwargs


def tiny_cogview3plus() -> DiffusionPipeline:
    """CogView3-Plus: a 2-block joint-attention transformer (text first; its blocks return the image stream first;
    4 heads of 8, patch 2), the tiny KL VAE, v-prediction on CogVideoX's DDIM schedule, no text encoder or tokenizer
    (call it with :func:`cogview3plus_call_kwargs`)."""
    import diffusers

    torch.manual_seed(SEED)
    transformer = diffusers.CogView3PlusTransformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        text_embed_dim=24,
        time_embed_dim=16,
        condition_dim=4,
        pos_embed_max_size=16,
        sample_size=16,
    ).eval()
    parts = {"tokenizer": None, "text_encoder": None, "vae": _vae(), "scheduler": diffusers.CogVideoXDDIMScheduler()}
    return _finish(diffusers.CogView3PlusPipeline(**parts, transformer=transformer))


def cogview3plus_call_kwargs(batch: int = 2, tokens: int = 64) -> dict[str, Any]:
    """Small valid call kwargs for :func:`tiny_cogview3plus`: seeded prompt and negative embeddings ``(batch,
    tokens, 24)`` (64 tokens: as many as the 32 px image has, so the block outputs' order cannot be read from their
    shapes), no generator nor guidance."""
    g = torch.Generator().manual_seed(SEED + 89)
    kwargs: dict[str, Any] = {"height": IMAGE_SIZE, "width": IMAGE_SIZE, "num_inference_steps": 3, "output_type": "np"}
    kwargs["prompt_embeds"] = torch.randn(batch, tokens, 24, generator=g)
    kwargs["negative_prompt_embeds"] = torch.randn(batch, tokens, 24, generator=g)
    return kwargs


def tiny_kandinsky5(i2i: bool = False, video: bool = False) -> DiffusionPipeline:
    """Kandinsky 5 text-to-image (``i2i``: image-to-image, one image per call; ``video``: text- or image-to-video on
    a tiny HunyuanVideo VAE, 8x spatial and 4x temporal, 16 latent channels): one text-encoder block, then 2 visual
    blocks of self-attention and cross-attention (model dim 16 in heads of 8, patch 2x2), the tiny flow VAE (16 latent
    channels), flow matching at shift 7, no text encoders or tokenizers (call it with
    :func:`kandinsky5_call_kwargs`). The image pipelines map every request to one of their resolutions (1024 px and
    up in diffusers; 32x32 here) and assume an 8x VAE (2x here). The modulations are drawn at random (they start at
    zero, which leaves every block out)."""
    import diffusers

    torch.manual_seed(SEED)
    transformer = diffusers.Kandinsky5Transformer3DModel(
        in_visual_dim=16,
        in_text_dim=24,
        in_text_dim2=12,
        time_dim=16,
        out_visual_dim=16,
        patch_size=(1, 2, 2),
        model_dim=16,
        ff_dim=32,
        num_text_blocks=1,
        num_visual_blocks=2,
        axes_dims=(2, 2, 4),
        visual_cond=i2i,  # image-to-image: the input image's latents and a mask channel follow the latents
        attention_type="regular",
    ).eval()
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():  # the modulations start at zero: every block would pass its input through
        for module in transformer.modules():
            if type(module).__name__ == "Kandinsky5Modulation":
                module.out_layer.weight.normal_(0.0, 0.3, generator=g)
                module.out_layer.bias.normal_(0.0, 0.3, generator=g)
    if video:
        torch.manual_seed(SEED)
        vae = diffusers.AutoencoderKLHunyuanVideo(
            latent_channels=16,
            down_block_types=("HunyuanVideoDownBlock3D",) * 4,
            up_block_types=("HunyuanVideoUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            norm_num_groups=4,
            spatial_compression_ratio=8,
            temporal_compression_ratio=4,
        ).eval()
        cls = diffusers.Kandinsky5I2VPipeline if i2i else diffusers.Kandinsky5T2VPipeline
        parts = {"text_encoder": None, "tokenizer": None, "text_encoder_2": None, "tokenizer_2": None}
        return _finish(cls(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(), **parts))
    pipe = (diffusers.Kandinsky5I2IPipeline if i2i else diffusers.Kandinsky5T2IPipeline)(
        transformer=transformer,
        vae=_vae(flow=True, latent_channels=16),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )
    pipe.resolutions = [(IMAGE_SIZE, IMAGE_SIZE)]
    pipe.vae_scale_factor_spatial = 2
    return _finish(pipe)


def kandinsky5_call_kwargs(batch: int = 2, tokens: int = 7) -> dict[str, Any]:
    """Small valid call kwargs for :func:`tiny_kandinsky5`: seeded Qwen ``(batch, tokens, 24)`` and pooled CLIP
    ``(batch, 12)`` prompt and negative embeddings with their cumulative sequence lengths, no generator nor
    guidance."""
    g = torch.Generator().manual_seed(SEED + 97)
    kwargs: dict[str, Any] = {"height": IMAGE_SIZE, "width": IMAGE_SIZE, "num_inference_steps": 3, "output_type": "np"}
    for prefix in ("", "negative_"):
        kwargs[f"{prefix}prompt_embeds_qwen"] = torch.randn(batch, tokens, 24, generator=g)
        kwargs[f"{prefix}prompt_embeds_clip"] = torch.randn(batch, 12, generator=g)
        kwargs[f"{prefix}prompt_cu_seqlens"] = torch.arange(batch + 1, dtype=torch.int32) * tokens
    return kwargs


def tiny_cogvideox(pipeline: str = "CogVideoXPipeline") -> DiffusionPipeline:
    """CogVideoX (``pipeline``: one of the served CogVideoX classes): a 2-block joint-attention transformer over
    [text, video] (2 heads of 16, patch 2; its blocks return the video stream first), the tiny CogVideoX VAE (8x
    spatial, 4x temporal), v-prediction on CogVideoX's DDIM schedule, no text encoder or tokenizer (call it with
    :func:`cogvideox_call_kwargs`). Image-to-video puts the image's latents after the latents' channels (dim 2) and
    needs rotary positions."""
    import diffusers

    i2v = pipeline == "CogVideoXImageToVideoPipeline"
    torch.manual_seed(SEED)
    transformer = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,  # the 3D rotary positions split a head into even parts
        in_channels=8 if i2v else 4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=24,
        num_layers=2,
        sample_width=4,
        sample_height=4,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=16,
        use_rotary_positional_embeddings=i2v,
    ).eval()
    torch.manual_seed(SEED)
    vae = diffusers.AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    ).eval()
    parts = {"tokenizer": None, "text_encoder": None, "vae": vae, "scheduler": diffusers.CogVideoXDDIMScheduler()}
    return _finish(getattr(diffusers, pipeline)(**parts, transformer=transformer))


def cogvideox_call_kwargs(batch: int = 1, tokens: int = 16) -> dict[str, Any]:
    """Small valid call kwargs for :func:`tiny_cogvideox`: seeded prompt and negative embeddings ``(batch, 16, 24)``
    (CogVideoX pads its text to ``max_text_seq_length``), 8 frames of 32x32 (3 latent frames of 4x4), no generator
    nor guidance."""
    g = torch.Generator().manual_seed(SEED + 101)
    kwargs: dict[str, Any] = {
        "height": IMAGE_SIZE,
        "width": IMAGE_SIZE,
        "num_frames": 9,
        "num_inference_steps": 3,
        "output_type": "np",
    }
    kwargs["prompt_embeds"] = torch.randn(batch, tokens, 24, generator=g)
    kwargs["negative_prompt_embeds"] = torch.randn(batch, tokens, 24, generator=g)
    return kwargs


def tiny_ltx(image: bool = False) -> DiffusionPipeline:
    """LTX-Video text-to-video (``image``: image-to-video): 2 blocks of self-attention (attn1) and cross-attention
    (attn2) over packed video tokens (4 heads of 8, patch 1), diffusers' tiny LTX VAE (8 latent channels, 4x
    spatial, 4x temporal over the first two levels), flow matching, no text encoder or tokenizer (call it with
    :func:`ltx_call_kwargs`)."""
    import diffusers

    torch.manual_seed(SEED)
    transformer = diffusers.LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        num_layers=2,
        caption_channels=24,
    ).eval()
    torch.manual_seed(SEED)
    vae = diffusers.AutoencoderKLLTXVideo(
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        spatio_temporal_scaling=(True, True, False, False),
        layers_per_block=(1, 1, 1, 1, 1),
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    ).eval()
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    parts = {"tokenizer": None, "text_encoder": None, "vae": vae, "scheduler": FlowMatchEulerDiscreteScheduler()}
    cls = diffusers.LTXImageToVideoPipeline if image else diffusers.LTXPipeline
    return _finish(cls(**parts, transformer=transformer))


def ltx_call_kwargs(batch: int = 2, tokens: int = 7) -> dict[str, Any]:
    """Small valid call kwargs for :func:`tiny_ltx`: seeded prompt and negative embeddings ``(batch, tokens, 24)``
    with their masks (the prompt's last token masked out), 9 frames of 32x32, the latents as output (packed), no
    generator nor guidance."""
    g = torch.Generator().manual_seed(SEED + 103)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[:, -1] = 0
    kwargs: dict[str, Any] = {
        "height": IMAGE_SIZE,
        "width": IMAGE_SIZE,
        "num_frames": 9,
        "num_inference_steps": 3,
        "output_type": "latent",  # the tiny LTX VAE decodes slowly (seconds per call)
    }
    for prefix in ("", "negative_"):
        kwargs[f"{prefix}prompt_embeds"] = torch.randn(batch, tokens, 24, generator=g)
        kwargs[f"{prefix}prompt_attention_mask"] = mask.clone()
    return kwargs


def tiny_hunyuanvideo(image: str | None = None) -> DiffusionPipeline:
    """HunyuanVideo text-to-video: 2 double and 2 single blocks over [video, text] (2 heads of 10, patch 1) after a
    one-block text token refiner, embedded guidance, diffusers' tiny HunyuanVideo VAE (8x spatial, 4x temporal),
    flow matching at shift 7, no text encoders or tokenizers (call it with :func:`hunyuanvideo_call_kwargs`; the
    latents are the output: the tiny VAE decodes slowly). ``image``: image-to-video with that image condition type,
    "latent_concat" (the image's latents and a mask after the latents' channels) or "token_replace" (the image's
    latents as the first frame)."""
    import diffusers

    torch.manual_seed(SEED)
    condition = {} if image is None else {"image_condition_type": image}
    transformer = diffusers.HunyuanVideoTransformer3DModel(
        **condition,
        in_channels=9 if image == "latent_concat" else 4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=2,
        num_single_layers=2,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
    ).eval()
    torch.manual_seed(SEED)
    vae = diffusers.AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        act_fn="silu",
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    ).eval()
    parts = {"text_encoder": None, "tokenizer": None, "text_encoder_2": None, "tokenizer_2": None}
    parts |= {"vae": vae, "scheduler": FlowMatchEulerDiscreteScheduler(shift=7.0), "transformer": transformer}
    if image is not None:
        return _finish(diffusers.HunyuanVideoImageToVideoPipeline(**parts, image_processor=None))
    return _finish(diffusers.HunyuanVideoPipeline(**parts))


def hunyuanvideo_call_kwargs(batch: int = 2, tokens: int = 7) -> dict[str, Any]:
    """Small valid call kwargs for :func:`tiny_hunyuanvideo`: seeded Llama ``(batch, tokens, 16)`` and pooled CLIP
    ``(batch, 8)`` prompt and negative embeddings with their masks (the prompt's last token masked out), 9 frames of
    32x32 (3 latent frames of 4x4), the latents as output, no generator nor guidance."""
    g = torch.Generator().manual_seed(SEED + 107)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[:, -1] = 0
    kwargs: dict[str, Any] = {
        "height": IMAGE_SIZE,
        "width": IMAGE_SIZE,
        "num_frames": 9,
        "num_inference_steps": 3,
        "output_type": "latent",
    }
    for prefix in ("", "negative_"):
        kwargs[f"{prefix}prompt_embeds"] = torch.randn(batch, tokens, 16, generator=g)
        kwargs[f"{prefix}pooled_prompt_embeds"] = torch.randn(batch, 8, generator=g)
        kwargs[f"{prefix}prompt_attention_mask"] = mask.clone()
    return kwargs


def tiny_animatediff(kind: str = "") -> DiffusionPipeline:
    """AnimateDiff: an SD-style UNet (32, 64) with a one-layer motion adapter (4 heads, a motion mid block), the
    tiny VAE, DDIM; ``kind``: "" text-to-video, "video2video", "controlnet" (a ControlNet from the UNet),
    "video2video-controlnet", "sparsectrl" (a SparseCtrl ControlNet on VAE-encoded conditioning frames), "sdxl"
    (SDXL's two text encoders and ``text_time`` conditioning, Euler)."""
    import diffusers

    torch.manual_seed(SEED)
    adapter = diffusers.MotionAdapter(
        block_out_channels=(32, 64),
        motion_layers_per_block=1,
        motion_norm_num_groups=2,
        motion_num_attention_heads=4,
        use_motion_mid_block=True,
    )
    down, up = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    text = {"text_encoder": _clip_text_model(), "tokenizer": clip_tokenizer(), "feature_extractor": None}
    if kind == "sdxl":
        torch.manual_seed(SEED)
        unet = _sdxl_unet(2 * CLIP_HIDDEN, CLIP_PROJECTION, down_block_types=down, up_block_types=up)
        text |= {"text_encoder_2": _clip_text_model_with_projection(SEED + 1), "tokenizer_2": clip_tokenizer()}
        scheduler: Any = EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        )
        pipe = diffusers.AnimateDiffSDXLPipeline(
            vae=_vae(), unet=unet, motion_adapter=adapter, scheduler=scheduler, image_encoder=None, **text
        )
        return _finish(pipe)

    def sd_unet() -> UNet2DConditionModel:
        torch.manual_seed(SEED)
        return UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=list(down),  # SparseCtrl's from_unet rewrites this list in place
            up_block_types=up,
            cross_attention_dim=CLIP_HIDDEN,
            attention_head_dim=4,
            norm_num_groups=2,
        ).eval()

    unet = sd_unet()
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False, steps_offset=1
    )
    parts = {"vae": _vae(), "unet": unet, "motion_adapter": adapter, "scheduler": scheduler, **text}
    if kind in ("controlnet", "video2video-controlnet"):
        torch.manual_seed(SEED + 3)
        controlnet = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
        cls = diffusers.AnimateDiffControlNetPipeline
        if kind == "video2video-controlnet":
            cls = diffusers.AnimateDiffVideoToVideoControlNetPipeline
        pipe = cls(**parts, controlnet=_with_weights(controlnet.eval()))
    elif kind == "sparsectrl":
        sparse = diffusers.SparseControlNetModel.from_unet(sd_unet(), conditioning_channels=4)  # 4 latent channels
        torch.manual_seed(SEED + 3)
        pipe = diffusers.AnimateDiffSparseControlNetPipeline(**parts, controlnet=_with_weights(sparse.eval()))
    elif kind == "video2video":
        pipe = diffusers.AnimateDiffVideoToVideoPipeline(**parts, image_encoder=None)
    else:
        pipe = diffusers.AnimateDiffPipeline(**parts, image_encoder=None)
    pipe.unet.eval()
    return _finish(pipe)


def animatediff_call_kwargs(pipe: DiffusionPipeline, batch: int = 2, frames: int = 4) -> dict[str, Any]:
    """Small valid call kwargs for :func:`tiny_animatediff`: ``batch`` prompts, ``frames`` frames of 32x32 (the
    input video of video-to-video, the conditioning frames of ControlNet: seeded random images), 3 steps, numpy
    frames out; no generator nor guidance. diffusers' AnimateDiff ControlNet pipelines take one prompt (with more,
    they repeat the conditioning frames per frame, not per prompt, and fail); SparseCtrl gets its first and last
    frames (and draws its VAE latents from torch's global generator: seed it before the call)."""
    prompts = [PROMPT, "a red bicycle in the snow", "an owl at night"][:batch]
    kwargs: dict[str, Any] = {"prompt": prompts, "num_inference_steps": 3, "output_type": "np"}
    video = [random_image(IMAGE_SIZE, seed=SEED + 20 + i) for i in range(frames)]
    name = type(pipe).__name__
    if name == "AnimateDiffVideoToVideoPipeline":
        return kwargs | {"video": [video] * batch, "strength": 0.75, "num_inference_steps": 4}
    if name == "AnimateDiffVideoToVideoControlNetPipeline":
        return kwargs | {"video": video, "conditioning_frames": video, "strength": 0.75, "num_inference_steps": 4}
    kwargs |= {"num_frames": frames, "height": IMAGE_SIZE, "width": IMAGE_SIZE}
    if name == "AnimateDiffControlNetPipeline":
        kwargs["conditioning_frames"] = video
    if name == "AnimateDiffSparseControlNetPipeline":
        kwargs |= {"conditioning_frames": [video[0], video[-1]], "controlnet_frame_indices": [0, frames - 1]}
    return kwargs


def tiny_svd() -> DiffusionPipeline:
    """Stable Video Diffusion: a spatio-temporal UNet (32, 64; the input image's 4 latent channels after the
    latents'), a temporal-decoder VAE, a tiny CLIP vision encoder (224 px in 16 patches), Euler with SVD's recipe
    (Karras sigmas, continuous log-sigma timesteps, v-prediction); 4 frames by default."""
    import diffusers
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(SEED)
    unet = diffusers.UNetSpatioTemporalConditionModel(
        sample_size=16,
        in_channels=8,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal"),
        up_block_types=("CrossAttnUpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32,
        num_attention_heads=(2, 4),
        num_frames=4,
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24,
    ).eval()
    torch.manual_seed(SEED)
    vae = diffusers.AutoencoderKLTemporalDecoder(
        block_out_channels=[32, 64],
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        latent_channels=4,
    ).eval()
    torch.manual_seed(SEED)
    config = CLIPVisionConfig(
        hidden_size=32,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=224,  # the pipeline resizes the image to 224 px for its encoder
        intermediate_size=37,
        patch_size=56,
    )
    encoder = CLIPVisionModelWithProjection(config).eval()
    scheduler = diffusers.EulerDiscreteScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        use_karras_sigmas=True,
    )
    pipe = diffusers.StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=encoder,
        unet=unet,
        scheduler=scheduler,
        feature_extractor=CLIPImageProcessor(crop_size=224, size=224),
    )
    return _finish(pipe)


def svd_call_kwargs(batch: int = 2, frames: int = 4) -> dict[str, Any]:
    """Small valid call kwargs for :func:`tiny_svd`: ``batch`` seeded random 32 px images, ``frames`` frames, 3
    steps, the latents as output (the temporal decoder is slow); no generator nor guidance."""
    images = [random_image(IMAGE_SIZE, seed=SEED + 50 + i) for i in range(batch)]
    return {
        "image": images,
        "height": IMAGE_SIZE,
        "width": IMAGE_SIZE,
        "num_frames": frames,
        "num_inference_steps": 3,
        "output_type": "latent",
    }


def tiny_hunyuanvideo15() -> DiffusionPipeline:
    """HunyuanVideo 1.5 text-to-video: 2 double-stream blocks (2 heads of 8, patch 1) after a one-block text refiner,
    the latents beside zero condition latents and a mask (9 input channels), a tiny HunyuanVideo 1.5 VAE (4x spatial,
    4x temporal, 4 latent channels), flow matching at shift 7, diffusers' CFG guider at 4 in its ``guider``
    component, no text encoders (call it with :func:`hunyuanvideo15_call_kwargs`' Qwen and ByT5 embeddings)."""
    import diffusers
    from diffusers.guiders import ClassifierFreeGuidance

    torch.manual_seed(SEED)
    transformer = diffusers.HunyuanVideo15Transformer3DModel(
        in_channels=9,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_refiner_layers=1,
        text_embed_dim=16,
        text_embed_2_dim=8,
        image_embed_dim=12,
        rope_axes_dim=(2, 2, 4),
        target_size=64,
        task_type="t2v",
    ).eval()
    torch.manual_seed(SEED)
    vae = diffusers.AutoencoderKLHunyuanVideo15(
        latent_channels=4,
        block_out_channels=(16, 16, 16),
        layers_per_block=1,
        spatial_compression_ratio=4,
        temporal_compression_ratio=4,
    ).eval()
    parts = {"text_encoder": None, "tokenizer": None, "text_encoder_2": None, "tokenizer_2": None}
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    guider = ClassifierFreeGuidance(guidance_scale=4.0)
    pipe = diffusers.HunyuanVideo15Pipeline(
        **parts, transformer=transformer, vae=vae, scheduler=scheduler, guider=guider
    )
    return _finish(pipe)


def hunyuanvideo15_call_kwargs(batch: int = 1) -> dict[str, Any]:
    """Small valid call kwargs for :func:`tiny_hunyuanvideo15`: seeded Qwen ``(batch, 7, 16)`` and ByT5
    ``(batch, 5, 8)`` prompt and negative embeddings with their masks, 5 frames of 32x32, 3 steps, the latents as
    output; no generator."""
    g = torch.Generator().manual_seed(SEED + 61)
    kwargs: dict[str, Any] = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 3}
    kwargs["output_type"] = "latent"
    for prefix in ("", "negative_"):
        kwargs[f"{prefix}prompt_embeds"] = torch.randn(batch, 7, 16, generator=g)
        kwargs[f"{prefix}prompt_embeds_mask"] = torch.ones(batch, 7, dtype=torch.long)
        kwargs[f"{prefix}prompt_embeds_2"] = torch.randn(batch, 5, 8, generator=g)
        kwargs[f"{prefix}prompt_embeds_mask_2"] = torch.ones(batch, 5, dtype=torch.long)
    return kwargs


def tiny_cogview4() -> DiffusionPipeline:
    """CogView4: a 2-block joint-attention transformer (text first; its blocks return the image stream first), the
    tiny KL VAE, flow matching with CogView4's linear dynamic shift, no text encoder (call it with
    :func:`cogview4_call_kwargs`' embeddings)."""
    import diffusers

    torch.manual_seed(SEED)
    transformer = diffusers.CogView4Transformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=4,
        num_attention_heads=4,
        text_embed_dim=32,
        time_embed_dim=8,
        condition_dim=4,
        pos_embed_max_size=16,
        sample_size=16,
        rope_axes_dim=(4, 4),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_shift=0.25, max_shift=0.75, base_image_seq_len=256, use_dynamic_shifting=True, time_shift_type="linear"
    )
    parts = {"tokenizer": None, "text_encoder": None, "vae": tiny_vae((8, 16)), "scheduler": scheduler}
    return _finish(diffusers.CogView4Pipeline(**parts, transformer=transformer))


def cogview4_call_kwargs(tokens: int = 16) -> dict[str, Any]:
    """Small valid call kwargs for :func:`tiny_cogview4`: seeded prompt and negative embeddings of ``tokens`` tokens
    (64: as many as the 32 px image has, so the block outputs' order cannot be read from their shapes), no generator
    nor guidance."""
    g = torch.Generator().manual_seed(SEED + 41)
    kwargs: dict[str, Any] = {"height": IMAGE_SIZE, "width": IMAGE_SIZE, "num_inference_steps": 3, "output_type": "np"}
    kwargs["prompt_embeds"] = torch.randn(1, tokens, 32, generator=g)
    kwargs["negative_prompt_embeds"] = torch.randn(1, tokens, 32, generator=g)
    return kwargs


def tiny_z_image(pipeline: str = "ZImagePipeline", layers: int = 2) -> DiffusionPipeline:
    """Z-Image (``pipeline``: one of the served Z-Image classes): a ``layers``-block single-stream transformer over
    [image, caption] tokens with one noise and one context refiner, the tiny flow VAE, flow matching, no text
    encoder (call it with :func:`z_image_call_kwargs`' per-sample embeddings). The ControlNet pipelines get a
    tiny ``ZImageControlNetModel`` on block 0."""
    import diffusers

    torch.manual_seed(SEED)
    transformer = diffusers.ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=32,
        n_layers=layers,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=16,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32],
    ).eval()
    with torch.no_grad():  # created with torch.empty
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
    parts: dict[str, Any] = {
        "tokenizer": None,
        "text_encoder": None,
        "vae": _vae((8, 16), norm_num_groups=4, flow=True),
        "scheduler": FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        "transformer": transformer,
    }
    if "ControlNet" in pipeline:
        torch.manual_seed(SEED + 1)
        control = diffusers.ZImageControlNetModel(
            control_layers_places=[0],
            control_refiner_layers_places=[0],
            control_in_dim=4 if pipeline == "ZImageControlNetPipeline" else 9,
            add_control_noise_refiner="control_layers",
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            dim=32,
            n_refiner_layers=1,
            n_heads=2,
            n_kv_heads=2,
            norm_eps=1e-5,
            qk_norm=True,
        ).eval()
        # its output projections start at zero: give them weights so the control acts
        parts["controlnet"] = _with_weights(diffusers.ZImageControlNetModel.from_transformer(control, transformer))
    return _finish(getattr(diffusers, pipeline)(**parts))


def z_image_call_kwargs(batch: int = 1, tokens: tuple[int, int] = (7, 12)) -> dict[str, Any]:
    """Small valid call kwargs for :func:`tiny_z_image`: seeded per-sample prompt and negative embeddings (lists;
    ``tokens``: their lengths, which differ so that the batch is padded), no generator nor guidance."""
    g = torch.Generator().manual_seed(SEED + 43)
    kwargs: dict[str, Any] = {"height": IMAGE_SIZE, "width": IMAGE_SIZE, "num_inference_steps": 3, "output_type": "np"}
    kwargs["prompt_embeds"] = [torch.randn(tokens[0] + i, 16, generator=g) for i in range(batch)]
    kwargs["negative_prompt_embeds"] = [torch.randn(tokens[1] + i, 16, generator=g) for i in range(batch)]
    return kwargs


def tiny_lumina2() -> DiffusionPipeline:
    """Lumina 2: a 2-layer single-stream transformer over [caption, image] tokens (one noise and one context
    refiner), the tiny flow VAE, flow matching, no text encoder (call it with :func:`lumina2_call_kwargs`)."""
    import diffusers

    torch.manual_seed(SEED)
    transformer = diffusers.Lumina2Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=16,
        num_layers=2,
        num_refiner_layers=1,
        num_attention_heads=2,
        num_kv_heads=2,
        multiple_of=16,
        norm_eps=1e-5,
        scaling_factor=1.0,
        axes_dim_rope=[4, 2, 2],
        axes_lens=[64, 32, 32],
        cap_feat_dim=16,
    ).eval()
    parts = {"tokenizer": None, "text_encoder": None, "vae": _vae((8, 16), norm_num_groups=4, flow=True)}
    scheduler = FlowMatchEulerDiscreteScheduler()
    return _finish(diffusers.Lumina2Pipeline(**parts, scheduler=scheduler, transformer=transformer))


def lumina2_call_kwargs(batch: int = 1, tokens: tuple[int, int] = (7, 12)) -> dict[str, Any]:
    """Small valid call kwargs for :func:`tiny_lumina2`: seeded prompt and negative embeddings of 12 tokens with
    masks that keep ``tokens`` of them (sample ``i`` keeps ``i`` fewer), no generator nor guidance."""
    kwargs: dict[str, Any] = {"height": IMAGE_SIZE, "width": IMAGE_SIZE, "num_inference_steps": 3, "output_type": "np"}
    return kwargs | _masked_prompts(SEED + 47, (batch, 12, 16), tokens, "prompt_attention_mask", torch.long)


def _masked_prompts(
    seed: int, shape: tuple[int, ...], tokens: tuple[int, int], mask_name: str, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Seeded prompt and negative embeddings of ``shape`` (batch, length, ...) with masks (``mask_name``,
    ``dtype``) keeping ``tokens`` of them: sample ``i`` keeps ``i`` fewer."""
    g = torch.Generator().manual_seed(seed)
    kwargs = {}
    for prefix, count in zip(("", "negative_"), tokens):
        kwargs[f"{prefix}prompt_embeds"] = torch.randn(*shape, generator=g)
        mask = torch.zeros(shape[:2], dtype=dtype)
        for i in range(shape[0]):
            mask[i, : count - i] = 1
        kwargs[f"{prefix}{mask_name}"] = mask
    return kwargs


def tiny_krea2() -> DiffusionPipeline:
    """Krea 2: a 2-block single-stream transformer over [text, image] tokens (its text fusion stage reads 3 stacked
    text-encoder layers per token), the tiny Qwen-Image VAE, flow matching with dynamic shift, no text encoder (call
    it with :func:`krea2_call_kwargs`)."""
    import diffusers

    torch.manual_seed(SEED)
    transformer = diffusers.Krea2Transformer2DModel(
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=32,
        timestep_embed_dim=8,
        text_hidden_dim=16,
        num_text_layers=3,
        text_num_attention_heads=2,
        text_num_key_value_heads=1,
        text_intermediate_size=16,
        num_layerwise_text_blocks=1,
        num_refiner_text_blocks=1,
        axes_dims_rope=(4, 2, 2),
        rope_theta=1000.0,
    ).eval()
    _with_weights(transformer)  # zero-initialised tables and projections
    vae = _qwen_vae()
    parts = {"scheduler": _dynamic_shift_scheduler(), "vae": vae, "text_encoder": None, "tokenizer": None}
    return _finish(diffusers.Krea2Pipeline(**parts, transformer=transformer, text_encoder_select_layers=(0, 1, 2)))


def krea2_call_kwargs(batch: int = 1, tokens: tuple[int, int] = (7, 12)) -> dict[str, Any]:
    """Small valid call kwargs for :func:`tiny_krea2`: seeded prompt and negative embeddings (3 stacked layers of 12
    tokens) with masks keeping ``tokens`` of them (sample ``i`` keeps ``i`` fewer), no generator nor guidance."""
    kwargs: dict[str, Any] = {"height": IMAGE_SIZE, "width": IMAGE_SIZE, "num_inference_steps": 3, "output_type": "np"}
    return kwargs | _masked_prompts(SEED + 53, (batch, 12, 3, 16), tokens, "prompt_embeds_mask", torch.bool)


#: LongCat-Image Edit works at a 1024 x 1024 area whatever the input's size: the tiny VAE's 7 levels (stride 64)
#: keep its 16 x 16 latents at 8 x 8 packed tokens; the text-to-image calls run at 512 px (4 x 4 tokens)
LONGCAT_SIZE = 512


def tiny_longcat(edit: bool = False) -> DiffusionPipeline:
    """LongCat-Image (or LongCat-Image Edit): a 1 double + 1 single block transformer over [text, image] tokens, a
    7-level KL VAE with 16 latent channels (the pipeline's fixed count), flow matching with dynamic shift, no text
    encoder, tokenizer or processor (call it with :func:`longcat_ovis_call_kwargs`).

    diffusers 0.42's LongCat ``encode_prompt`` reads the batch size from ``len(prompt)`` even when given embeddings
    (``TypeError`` for ``prompt=None``, a wrong reshape for a batch of negative embeddings with the default ``""``);
    the tiny pipeline's ``encode_prompt`` takes it from the embeddings instead and otherwise runs the pipeline's own.
    """
    import diffusers

    torch.manual_seed(SEED)
    transformer = diffusers.LongCatImageTransformer2DModel(
        in_channels=64,  # 16 latent channels packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        pooled_projection_dim=24,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    ).eval()
    vae = _vae((4,) * 7, norm_num_groups=4, flow=True, latent_channels=16)
    cls = diffusers.LongCatImageEditPipeline if edit else diffusers.LongCatImagePipeline
    parts = {"text_encoder": None, "tokenizer": None}
    # the Edit pipeline keeps its processor's image processor at construction: a stand-in, then no processor
    processor = type("NoProcessor", (), {"image_processor": None})()
    pipe = cls(
        scheduler=_dynamic_shift_scheduler(), vae=vae, transformer=transformer, text_processor=processor, **parts
    )
    pipe.register_modules(text_processor=None)
    own = pipe.encode_prompt

    def encode_prompt(prompt=None, *args: Any, prompt_embeds: torch.Tensor | None = None, **kwargs: Any):
        if prompt_embeds is not None:
            prompt = [""] * prompt_embeds.shape[0]
        return own(prompt, *args, prompt_embeds=prompt_embeds, **kwargs)

    pipe.encode_prompt = encode_prompt
    return _finish(pipe)


def tiny_ovis() -> DiffusionPipeline:
    """Ovis-Image: a 1 double + 1 single block transformer over [text, image] tokens, the FLUX-style tiny VAE (4
    latent channels), flow matching with dynamic shift, no text encoder or tokenizer (call it with
    :func:`longcat_ovis_call_kwargs`)."""
    import diffusers

    torch.manual_seed(SEED)
    transformer = diffusers.OvisImageTransformer2DModel(
        in_channels=16,  # 4 latent channels packed 2x2
        out_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    parts = {"text_encoder": None, "tokenizer": None}
    return _finish(
        diffusers.OvisImagePipeline(
            scheduler=_dynamic_shift_scheduler(), vae=_vae(flow=True), **parts, transformer=transformer
        )
    )


def longcat_ovis_call_kwargs(pipe: DiffusionPipeline, batch: int = 1, tokens: int = 7) -> dict[str, Any]:
    """Small valid call kwargs for :func:`tiny_longcat` and :func:`tiny_ovis`: seeded prompt and negative embeddings
    of ``tokens`` tokens (the negative one 5); LongCat-Image Edit gets a square reference image (it works at a
    1024 x 1024 area), LongCat-Image a 512 px size and no prompt rewriting, Ovis-Image the tiny VAE's 32 px and no
    negative prompt. No generator nor guidance settings."""
    g = torch.Generator().manual_seed(SEED + 61)
    kwargs: dict[str, Any] = {"num_inference_steps": 3, "output_type": "np"}
    kwargs["prompt_embeds"] = torch.randn(batch, tokens, 24, generator=g)
    kwargs["negative_prompt_embeds"] = torch.randn(batch, 5, 24, generator=g)
    name = type(pipe).__name__
    if name == "LongCatImageEditPipeline":
        return kwargs | {"image": random_image(64, seed=SEED + 7)}
    if name == "LongCatImagePipeline":
        return kwargs | {"height": LONGCAT_SIZE, "width": LONGCAT_SIZE, "enable_prompt_rewrite": False}
    # Ovis-Image's negative_prompt defaults to "", which its check refuses beside negative_prompt_embeds
    return kwargs | {"height": IMAGE_SIZE, "width": IMAGE_SIZE, "negative_prompt": None}


def tiny_ernie() -> DiffusionPipeline:
    """ERNIE-Image: a 2-block single-stream transformer over [image, text] tokens that runs its blocks
    sequence-first, the tiny FLUX.2 VAE (its latents patchified 2x2 into 16 channels), flow matching, no text
    encoder, tokenizer or prompt enhancer (call it with :func:`ernie_call_kwargs`)."""
    import diffusers

    torch.manual_seed(SEED)
    transformer = diffusers.ErnieImageTransformer2DModel(
        hidden_size=32,
        num_attention_heads=2,
        num_layers=2,
        ffn_hidden_size=32,
        in_channels=16,
        out_channels=16,
        text_in_dim=24,
        rope_axes_dim=(4, 6, 6),  # sums to the head size
    ).eval()
    _with_weights(transformer)  # zero-initialised modulation and output projection
    vae = diffusers.AutoencoderKLFlux2(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    ).eval()
    parts = {"text_encoder": None, "tokenizer": None}
    return _finish(
        diffusers.ErnieImagePipeline(
            transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(), **parts
        )
    )


def ernie_call_kwargs(batch: int = 1, tokens: tuple[int, ...] = (7, 4)) -> dict[str, Any]:
    """Small valid call kwargs for :func:`tiny_ernie`: seeded prompt and negative embeddings, one ``(tokens, 24)``
    tensor per sample (sample ``i`` has ``tokens[i]`` of them, the negative ones 5), no generator nor guidance."""
    g = torch.Generator().manual_seed(SEED + 71)
    kwargs: dict[str, Any] = {"height": IMAGE_SIZE, "width": IMAGE_SIZE, "num_inference_steps": 3, "output_type": "np"}
    kwargs["prompt_embeds"] = [torch.randn(tokens[i], 24, generator=g) for i in range(batch)]
    kwargs["negative_prompt_embeds"] = [torch.randn(5, 24, generator=g) for _ in range(batch)]
    return kwargs


def tiny_auraflow() -> DiffusionPipeline:
    """AuraFlow: 2 MMDiT joint blocks then 2 single-stream blocks over [registers, text, image] tokens (4 heads of
    8, patch 2), the tiny flow VAE, flow matching, no text encoder or tokenizer (call it with
    :func:`auraflow_call_kwargs`). The blocks' modulation is scaled up 4x: at the default initialisation the
    gates are so small that the text moves the output by 1e-4."""
    import diffusers

    torch.manual_seed(SEED)
    transformer = diffusers.AuraFlowTransformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_mmdit_layers=2,
        num_single_dit_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=24,
        caption_projection_dim=32,  # heads * head_dim
        pos_embed_max_size=64,
    ).eval()
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if ".norm1" in name or name.startswith("time_step_proj.linear_2"):
                parameter.mul_(4.0)
    pipe = diffusers.AuraFlowPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=_vae(flow=True),
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    return _finish(pipe)


def auraflow_call_kwargs(batch: int = 2, tokens: int = 7) -> dict[str, Any]:
    """Small valid call kwargs for :func:`tiny_auraflow`: seeded prompt and negative embeddings ``(batch, tokens,
    24)`` with their (all-ones) masks, no generator nor guidance."""
    g = torch.Generator().manual_seed(SEED + 73)
    kwargs: dict[str, Any] = {"height": IMAGE_SIZE, "width": IMAGE_SIZE, "num_inference_steps": 3, "output_type": "np"}
    for prefix in ("", "negative_"):
        kwargs[f"{prefix}prompt_embeds"] = torch.randn(batch, tokens, 24, generator=g)
        kwargs[f"{prefix}prompt_attention_mask"] = torch.ones(batch, tokens)
    return kwargs


def tiny_hidream() -> DiffusionPipeline:
    """HiDream-I1: 2 double-stream then 2 single-stream blocks with mixture-of-experts feed-forwards (4 heads of 8,
    patch 2, 4 routed experts, 2 active), each block fed its own Llama layer; the tiny flow VAE, flow matching, no
    text encoders or tokenizers (call it with :func:`hidream_call_kwargs`). The pipeline resizes every request to
    the area of ``default_sample_size`` latents squared (128 in diffusers, 16 here: 32x32 images); the denoiser pads
    a non-square image's tokens to ``max_seq`` (144 here)."""
    import diffusers

    torch.manual_seed(SEED)
    transformer = diffusers.HiDreamImageTransformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_channels=[32, 16],  # T5, Llama
        text_emb_dim=64,  # the pooled CLIP embeddings
        num_routed_experts=4,
        num_activated_experts=2,
        axes_dims_rope=(4, 2, 2),
        max_resolution=(24, 24),  # max_seq 144 tokens; a square 32x32 image has 64
        llama_layers=(0, 1, 2, 3),
    ).eval()
    pipe = diffusers.HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(flow=True),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
        text_encoder_4=None,
        tokenizer_4=None,
        transformer=transformer,
    )
    pipe.default_sample_size = IMAGE_SIZE // pipe.vae_scale_factor
    return _finish(pipe)


def hidream_call_kwargs(batch: int = 2, t5_tokens: int = 5, llama_tokens: int = 3) -> dict[str, Any]:
    """Small valid call kwargs for :func:`tiny_hidream`: seeded T5 ``(batch, t5_tokens, 32)``, Llama ``(4 layers,
    batch, llama_tokens, 16)`` and pooled ``(batch, 64)`` prompt and negative embeddings, no generator nor
    guidance. The Llama states carry the batch on dim 1, and their 4 layers equal a CFG batch of 2 prompts."""
    g = torch.Generator().manual_seed(SEED + 79)
    kwargs: dict[str, Any] = {"height": IMAGE_SIZE, "width": IMAGE_SIZE, "num_inference_steps": 3, "output_type": "np"}
    for prefix in ("", "negative_"):
        kwargs[f"{prefix}prompt_embeds_t5"] = torch.randn(batch, t5_tokens, 32, generator=g)
        kwargs[f"{prefix}prompt_embeds_llama3"] = torch.randn(4, batch, llama_tokens, 16, generator=g)
        kwargs[f"{prefix}pooled_prompt_embeds"] = torch.randn(batch, 64, generator=g)
    return kwargs


def tiny_prx(pixel: bool = False) -> DiffusionPipeline:
    """PRX (Photoroom): 3 blocks whose one attention runs the image queries over [text, image] keys (4 heads of 8,
    patch 2), flow matching, no text encoder or tokenizer (call it with :func:`prx_call_kwargs`). ``pixel``: the
    PRXPixel pipeline on RGB pixels (no VAE, initial noise scaled by 2), else the tiny flow VAE's latents. The
    blocks' modulation is drawn at random (it starts at zero, which leaves every block out)."""
    import diffusers

    torch.manual_seed(SEED)
    transformer = diffusers.PRXTransformer2DModel(
        in_channels=3 if pixel else 4,
        patch_size=2,
        context_in_dim=24,
        hidden_size=32,
        mlp_ratio=2.0,
        num_heads=4,
        depth=3,
        axes_dim=[4, 4],  # head_dim 8
        bottleneck_size=16 if pixel else None,
    ).eval()
    with torch.no_grad():  # the blocks' modulation starts at zero: every block would pass its input through
        for block in transformer.blocks:
            block.modulation.lin.weight.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(SEED + 1))
    if pixel:
        pipe = diffusers.PRXPixelPipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=None, tokenizer=None
        )
    else:
        pipe = diffusers.PRXPipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(),
            text_encoder=None,
            tokenizer=None,
            vae=_vae(flow=True),
        )
    return _finish(pipe)


def prx_call_kwargs(batch: int = 1, tokens: int = 7) -> dict[str, Any]:
    """Small valid call kwargs for :func:`tiny_prx`: seeded prompt and negative embeddings ``(batch, tokens, 24)``,
    the prompt's last token masked as padding, no resolution binning, no generator nor guidance. diffusers 0.42's
    PRX pipelines make one image per call: with CFG they pass 2 timesteps whatever the batch."""
    g = torch.Generator().manual_seed(SEED + 83)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[:, -1] = False
    kwargs: dict[str, Any] = {
        "height": IMAGE_SIZE,
        "width": IMAGE_SIZE,
        "num_inference_steps": 3,
        "output_type": "np",
        "use_resolution_binning": False,
        "prompt_embeds": torch.randn(batch, tokens, 24, generator=g),
        "negative_prompt_embeds": torch.randn(batch, tokens, 24, generator=g),
        "prompt_attention_mask": mask,
        "negative_prompt_attention_mask": mask.clone(),
    }
    return kwargs


def tiny_hunyuanimage() -> DiffusionPipeline:
    """HunyuanImage 2.1 (diffusers' own tiny test configuration): a 1 double + 1 single block transformer with a
    text token refiner, the tiny HunyuanImage VAE (stride 8), flow matching at shift 7, no text encoders or
    tokenizers (call it with :func:`hunyuanimage_call_kwargs`), diffusers' CFG guider at 4."""
    import diffusers
    from diffusers.guiders import ClassifierFreeGuidance

    torch.manual_seed(SEED)
    transformer = diffusers.HunyuanImageTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=4,
        attention_head_dim=8,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=(1, 1),
        guidance_embeds=False,
        text_embed_dim=32,
        text_embed_2_dim=32,
        rope_axes_dim=(4, 4),
    ).eval()
    torch.manual_seed(SEED)
    vae = diffusers.AutoencoderKLHunyuanImage(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=1,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        sample_size=128,
    ).eval()
    parts = {"text_encoder": None, "tokenizer": None, "text_encoder_2": None, "tokenizer_2": None}
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    guider = ClassifierFreeGuidance(guidance_scale=4.0)
    return _finish(
        diffusers.HunyuanImagePipeline(scheduler=scheduler, vae=vae, transformer=transformer, guider=guider, **parts)
    )


def hunyuanimage_call_kwargs(batch: int = 1, tokens: int = 7) -> dict[str, Any]:
    """Small valid call kwargs for :func:`tiny_hunyuanimage`: seeded prompt and negative embeddings of 7 tokens
    (masks keeping ``tokens`` of them), empty glyph (ByT5) embeddings, so the pipeline takes ``pipe.guider``, not its
    OCR guider; no generator."""
    g = torch.Generator().manual_seed(SEED + 67)
    kwargs: dict[str, Any] = {"height": IMAGE_SIZE, "width": IMAGE_SIZE, "num_inference_steps": 3, "output_type": "np"}
    for prefix in ("", "negative_"):
        mask = torch.zeros(batch, 7, dtype=torch.long)
        mask[:, :tokens] = 1
        kwargs[f"{prefix}prompt_embeds"] = torch.randn(batch, 7, 32, generator=g)
        kwargs[f"{prefix}prompt_embeds_mask"] = mask
        kwargs[f"{prefix}prompt_embeds_2"] = torch.zeros(batch, 5, 32)
        kwargs[f"{prefix}prompt_embeds_mask_2"] = torch.ones(batch, 5, dtype=torch.long)
    return kwargs


def tiny_dit() -> DiTPipeline:
    """Class-conditional DiT with learned sigma (``out_channels = 2 * in_channels``); null class is 1000."""
    torch.manual_seed(SEED)
    transformer = DiTTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        num_embeds_ada_norm=1000,  # DiTPipeline hard-codes the null label 1000 (embedding table gets 1001 rows)
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
    ).eval()
    scheduler = DPMSolverMultistepScheduler(
        beta_schedule="linear",
        beta_start=0.0001,
        beta_end=0.02,
        prediction_type="epsilon",
    )
    id2label = {i: f"class {i}" for i in range(10)}
    pipe = DiTPipeline(transformer=transformer, vae=_vae(), scheduler=scheduler, id2label=id2label)
    _finish(pipe)
    return pipe


def tiny_pixart_sigma() -> PixArtSigmaPipeline:
    """PixArt-Sigma with learned sigma and a T5 encoder.

    ``sample_size=32`` with an 8x VAE (4 blocks) so the pipeline's default resolution binning
    (``ASPECT_RATIO_256_BIN``, which needs sample_size in {32, 64, 128, 256}) stays cheap.
    """
    torch.manual_seed(SEED)
    transformer = PixArtTransformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=3,
        cross_attention_dim=24,  # heads * head_dim
        caption_channels=32,  # T5 width
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    ).eval()
    scheduler = DPMSolverMultistepScheduler(
        beta_schedule="linear",
        beta_start=0.0001,
        beta_end=0.02,
        prediction_type="epsilon",
    )
    pipe = PixArtSigmaPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=_t5_encoder(d_model=32),
        vae=_vae(block_out_channels=(8, 8, 16, 16), norm_num_groups=8),
        transformer=transformer,
        scheduler=scheduler,
    )
    _finish(pipe)
    return pipe


# --------------------------------------------------------------------------- call arguments


def random_image(size: int = IMAGE_SIZE, seed: int = SEED) -> Image.Image:
    """Seeded random RGB PIL image of ``size`` x ``size``."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8))


_IMG2IMG = (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusion3Img2ImgPipeline,
    FluxImg2ImgPipeline,
)
_T5 = (
    StableDiffusion3Pipeline,
    StableDiffusion3Img2ImgPipeline,
    FluxPipeline,
    FluxImg2ImgPipeline,
    PixArtSigmaPipeline,
)


def default_call_kwargs(pipe: DiffusionPipeline) -> dict[str, Any]:
    """Small valid ``pipe(...)`` kwargs (without ``generator``) for a pipeline built by this module.

    Guidance settings are left at each pipeline's default; pass ``guidance_scale`` (or
    ``true_cfg_scale`` with ``negative_prompt`` for Flux) explicitly to control them.
    Image-to-image pipelines get 4 steps at strength 0.75, i.e. 3 denoiser steps: with 3 steps
    the flow-matching ones (SD3, Flux) compute ``t_start = int(3 - 3 * 0.75) = 0`` and start from
    sigma = 1, where the input image is fully replaced by noise.
    """
    kwargs: dict[str, Any] = {"num_inference_steps": 3, "output_type": "np"}
    if isinstance(pipe, DiTPipeline):
        kwargs["class_labels"] = [1]
        return kwargs
    kwargs["prompt"] = PROMPT
    if isinstance(pipe, _IMG2IMG):
        kwargs["image"] = random_image(IMAGE_SIZE)
        kwargs["strength"] = 0.75
        kwargs["num_inference_steps"] = 4
    if not isinstance(pipe, (StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline)):
        kwargs["height"] = kwargs["width"] = 64 if isinstance(pipe, PixArtSigmaPipeline) else IMAGE_SIZE
    if isinstance(pipe, PixArtSigmaPipeline):
        kwargs["use_resolution_binning"] = False
        kwargs["clean_caption"] = False  # True needs beautifulsoup4 + ftfy
    if isinstance(pipe, _T5):
        kwargs["max_sequence_length"] = 64  # the character-level T5 tokenizer needs one token per char
    return kwargs


def tiny_pixel_unet(sample_size: int = 8) -> UNet2DModel:
    """A tiny unconditional pixel-space ``UNet2DModel`` (RGB, channels (8, 16)), seeded, in eval mode."""
    torch.manual_seed(SEED)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


def tiny_latent_unet(channels: int = 4, scale: float | None = None) -> UNet2DModel:
    """A tiny unconditional latent ``UNet2DModel`` (``channels`` in and out, downsampling 2), seeded; with ``scale``
    every weight is redrawn N(0, scale^2) (0: the zero predictor)."""
    torch.manual_seed(SEED)
    model = UNet2DModel(
        sample_size=8,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    if scale is not None:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return model.eval()


def random_pixel_unet(sample_size: int = 8, scale: float = 0.1):
    """``(tiny_pixel_unet, DDPMScheduler)`` with every weight redrawn N(0, scale^2) from seed 0: a random score
    model whose output depends on its input (the EPS and detector tests)."""
    from diffusers import DDPMScheduler

    model = tiny_pixel_unet(sample_size)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return model.eval(), DDPMScheduler(num_train_timesteps=1000)


def smooth_images(n: int, seed: int = 0, size: int = 8, amplitude: float = 0.8) -> torch.Tensor:
    """``n`` smooth RGB images in [-amplitude, amplitude] (upsampled 2x2 noise, seeded): the EPS and detector tests."""
    low = (torch.rand(n, 3, 2, 2, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * amplitude
    return torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)


def guidance_pair(seed: int, shape: tuple[int, ...] = (3, 4, 6, 6), dtype: torch.dtype = torch.float32):
    """Two seeded standard-normal tensors ``(cond, uncond)``: the predictions the guidance math tests combine."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)


def tiny_kandinsky3(img2img: bool = False) -> DiffusionPipeline:
    """Kandinsky 3 (text-to-image, or image-to-image) on diffusers' test-sized UNet, MoVQ and a random T5 encoder
    (no tokenizer: :func:`kandinsky3_call_kwargs` passes the embeddings and masks)."""
    import diffusers

    torch.manual_seed(0)
    unet = diffusers.Kandinsky3UNet(
        in_channels=4,
        time_embedding_dim=4,
        groups=2,
        attention_head_dim=4,
        layers_per_block=3,
        block_out_channels=(32, 64),
        cross_attention_dim=4,
        encoder_hid_dim=32,
    )
    movq = diffusers.VQModel(
        block_out_channels=[32, 64],
        down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        in_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        norm_type="spatial",
        num_vq_embeddings=12,
        out_channels=3,
        up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
        vq_embed_dim=4,
    )
    scheduler = diffusers.DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="squaredcos_cap_v2", clip_sample=True
    )
    text = _t5_encoder(d_model=32)
    cls = diffusers.Kandinsky3Img2ImgPipeline if img2img else diffusers.Kandinsky3Pipeline
    pipe = cls(tokenizer=None, text_encoder=text, unet=unet, scheduler=scheduler, movq=movq)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def kandinsky3_call_kwargs(prompts: int = 1) -> dict[str, Any]:
    """Seeded T5 embeddings and masks for ``prompts`` prompts (one padded), their negatives, 2 steps at 32 px."""
    g = torch.Generator().manual_seed(11)
    mask = torch.ones(prompts, 6, dtype=torch.long)
    mask[-1, 4:] = 0  # the last prompt is padded
    return {
        "prompt_embeds": torch.randn(prompts, 6, 32, generator=g),
        "attention_mask": mask,
        "negative_prompt_embeds": torch.randn(prompts, 6, 32, generator=g),
        "negative_attention_mask": torch.ones(prompts, 6, dtype=torch.long),
        "height": 32,
        "width": 32,
        "num_inference_steps": 2,
        "output_type": "np",
    }


class NoGuardrail:
    """Stands in for ``cosmos_guardrail``'s safety checker (not installed here): every prompt and video passes."""

    def to(self, *args: Any, **kwargs: Any) -> NoGuardrail:
        return self

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, video: Any) -> Any:
        return video


def _cosmos_resize_without_torchvision() -> None:
    """diffusers' Cosmos transformer resizes its padding mask with torchvision (not a dependency here): the same
    nearest-neighbour resize of a tensor, by ``F.interpolate``, where torchvision is missing."""
    import types

    import diffusers.models.transformers.transformer_cosmos as cosmos

    if not hasattr(cosmos, "transforms"):
        resize = lambda t, size, interpolation: torch.nn.functional.interpolate(t, size=size, mode=interpolation)
        cosmos.transforms = types.SimpleNamespace(
            InterpolationMode=types.SimpleNamespace(NEAREST="nearest"),
            functional=types.SimpleNamespace(resize=resize),
        )


def tiny_cosmos2(video: bool = False) -> DiffusionPipeline:
    """Cosmos 2 text-to-image (or video-to-world: its transformer takes the condition mask as a 17th channel) on
    diffusers' test-sized transformer and Wan VAE, a random T5 encoder (no tokenizer: :func:`cosmos2_call_kwargs`
    passes embeddings) and :class:`NoGuardrail`."""
    import diffusers

    _cosmos_resize_without_torchvision()
    torch.manual_seed(0)
    transformer = diffusers.CosmosTransformer3DModel(
        in_channels=17 if video else 16,
        out_channels=16,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        mlp_ratio=2,
        text_embed_dim=32,
        adaln_lora_dim=4,
        max_size=(4, 32, 32),
        patch_size=(1, 2, 2),
        rope_scale=(2.0, 1.0, 1.0),
        concat_padding_mask=True,
        extra_pos_embed_type="learnable",
    )
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True)
    text = _t5_encoder(d_model=32)
    cls = diffusers.Cosmos2VideoToWorldPipeline if video else diffusers.Cosmos2TextToImagePipeline
    pipe = cls(
        text_encoder=text,
        tokenizer=None,
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
        safety_checker=NoGuardrail(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_cosmos25() -> DiffusionPipeline:
    """Cosmos Predict 2.5 (text/image/video-to-world) on the parts of :func:`tiny_cosmos2` ``(video=True)`` and a
    flow UniPC scheduler; no Qwen2.5-VL text encoder (:func:`cosmos2_call_kwargs` passes embeddings)."""
    import diffusers

    parts = tiny_cosmos2(video=True).components
    scheduler = diffusers.UniPCMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0
    )
    pipe = diffusers.Cosmos2_5_PredictBasePipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=parts["transformer"],
        vae=parts["vae"],
        scheduler=scheduler,
        safety_checker=NoGuardrail(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cosmos2_call_kwargs(prompts: int = 1) -> dict[str, Any]:
    """Seeded T5 embeddings for ``prompts`` prompts and their negatives, 3 steps at 32 px."""
    g = torch.Generator().manual_seed(13)
    return {
        "prompt_embeds": torch.randn(prompts, 8, 32, generator=g),
        "negative_prompt_embeds": torch.randn(prompts, 8, 32, generator=g),
        "height": 32,
        "width": 32,
        "num_inference_steps": 3,
        "output_type": "np",
    }


BUILDERS: dict[str, Callable[[], DiffusionPipeline]] = {
    "sd": tiny_sd,
    "sd_v": lambda: tiny_sd(prediction_type="v_prediction"),
    "sd_img2img": lambda: tiny_sd(img2img=True),
    "sdxl": tiny_sdxl,
    "sdxl_img2img": lambda: tiny_sdxl(img2img=True),
    "sd3": tiny_sd3,
    "sd3_2layers": lambda: tiny_sd3(num_layers=2),
    "sd3_img2img": lambda: tiny_sd3(img2img=True),
    "flux": tiny_flux,
    "flux_img2img": lambda: tiny_flux(img2img=True),
    "dit": tiny_dit,
    "pixart_sigma": tiny_pixart_sigma,
}


# --------------------------------------------------------------------------- inpainting and ControlNet variants


def _controlnet_for(pipe: DiffusionPipeline, extra_channels: int = 0) -> torch.nn.Module:
    """A seeded tiny ControlNet matching ``pipe``'s denoiser (its conditioning embedding maps images to latents;
    ``extra_channels``: SD3 inpainting's mask channel beside the control image's latents)."""
    import diffusers

    torch.manual_seed(SEED + 7)
    if hasattr(pipe, "unet"):
        return diffusers.ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32)).eval()
    config = pipe.transformer.config
    keys = ("patch_size", "in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim")
    same = {key: config[key] for key in (*keys, "pooled_projection_dim")}
    if isinstance(pipe.transformer, SD3Transformer2DModel):
        extra = ("sample_size", "out_channels", "caption_projection_dim", "pos_embed_max_size")
        return diffusers.SD3ControlNetModel(
            **same, **{key: config[key] for key in extra}, num_layers=1, extra_conditioning_channels=extra_channels
        ).eval()
    extra = ("guidance_embeds", "axes_dims_rope")
    return diffusers.FluxControlNetModel(
        **same, **{key: config[key] for key in extra}, num_layers=1, num_single_layers=1
    ).eval()


def _inpainting_unet(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """The same UNet with SD-inpainting's 9 input channels (latents, mask, masked-image latents)."""
    torch.manual_seed(SEED)
    return UNet2DConditionModel.from_config({**unet.config, "in_channels": 9}).eval()


def tiny_sd_upscale() -> DiffusionPipeline:
    """SD's x4 upscaler: a 3-level UNet whose input holds the low-res image's 3 channels after the 4 latent ones and
    whose class labels are the noise level (its first two levels' ``attn1`` attend to the text only), a 4x VAE,
    v-prediction DDIM, the tiny SD text encoder (call it with :func:`sd_upscale_call_kwargs`)."""
    import diffusers

    base = tiny_sd()
    torch.manual_seed(SEED)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=7,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=base.unet.config.cross_attention_dim,
        attention_head_dim=8,
        use_linear_projection=True,
        only_cross_attention=(True, True, False),
        num_class_embeds=100,
    ).eval()
    torch.manual_seed(SEED)
    vae = diffusers.AutoencoderKL(
        block_out_channels=[32, 32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        latent_channels=4,
    ).eval()
    return _finish(
        diffusers.StableDiffusionUpscalePipeline(
            unet=unet,
            low_res_scheduler=diffusers.DDPMScheduler(),
            scheduler=diffusers.DDIMScheduler(prediction_type="v_prediction"),
            vae=vae,
            text_encoder=base.text_encoder,
            tokenizer=base.tokenizer,
            max_noise_level=350,
        )
    )


def sd_upscale_call_kwargs() -> dict[str, Any]:
    """Small valid call kwargs for :func:`tiny_sd_upscale`: a 16 px image to upscale to 64 px at noise level 20, 3
    steps, no generator nor guidance."""
    image = random_image(16, seed=SEED + 5)
    return {"prompt": PROMPT, "image": image, "noise_level": 20, "num_inference_steps": 3, "output_type": "np"}


def tiny_sd_depth() -> DiffusionPipeline:
    """SD 2's depth-to-image: the tiny SD with a UNet that takes the depth map's channel after the 4 latent ones, no
    depth estimator (call it with :func:`sd_depth_call_kwargs`' depth map)."""
    import diffusers

    base = tiny_sd()
    torch.manual_seed(SEED)
    unet = diffusers.UNet2DConditionModel.from_config({**base.unet.config, "in_channels": 5}).eval()
    parts = {k: base.components[k] for k in ("vae", "text_encoder", "tokenizer", "scheduler")}
    return _finish(
        diffusers.StableDiffusionDepth2ImgPipeline(**parts, unet=unet, depth_estimator=None, feature_extractor=None)
    )


def sd_depth_call_kwargs() -> dict[str, Any]:
    """Small valid call kwargs for :func:`tiny_sd_depth`: an image, a seeded depth map, strength 0.8 of 4 steps."""
    depth = torch.rand(1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(SEED + 11))
    kwargs: dict[str, Any] = {"prompt": PROMPT, "image": random_image(IMAGE_SIZE), "depth_map": depth}
    return kwargs | {"strength": 0.8, "num_inference_steps": 4, "output_type": "np"}


def variant(family: str, kind: str) -> DiffusionPipeline:
    """``family`` in sd / sdxl / sd3 / flux; ``kind``: inpaint, inpaint9 (SD's 9-channel UNet), controlnet,
    controlnet_img2img, controlnet_inpaint, for SD and SDXL adapter (a T2I-Adapter), and for SDXL controlnet_union,
    controlnet_union_img2img, controlnet_union_inpaint."""
    import diffusers

    if (family, kind) in (("sd3", "inpaint"), ("sd3", "controlnet_inpaint")):
        base = tiny_sd3(latent_channels=16)  # diffusers' SD3 inpainting wants SD3's 16 latent channels
    else:
        base = {"sd": tiny_sd, "sdxl": tiny_sdxl, "sd3": tiny_sd3, "flux": tiny_flux}[family]()
    components = dict(base.components)
    prefix = {"sd": "StableDiffusion", "sdxl": "StableDiffusionXL", "sd3": "StableDiffusion3", "flux": "Flux"}[family]
    if kind == "inpaint9":
        components["unet"] = _inpainting_unet(base.unet)
        kind = "inpaint"
    names = {
        "inpaint": f"{prefix}InpaintPipeline",
        "controlnet": f"{prefix}ControlNetPipeline",
        "controlnet_img2img": f"{prefix}ControlNetImg2ImgPipeline",
        "controlnet_inpaint": f"{prefix}ControlNet{'Inpainting' if family == 'sd3' else 'Inpaint'}Pipeline",
        "controlnet_union": f"{prefix}ControlNetUnionPipeline",
        "controlnet_union_img2img": f"{prefix}ControlNetUnionImg2ImgPipeline",
        "controlnet_union_inpaint": f"{prefix}ControlNetUnionInpaintPipeline",
        "adapter": f"{prefix}AdapterPipeline",
    }
    cls = getattr(diffusers, names[kind])
    if kind.startswith("controlnet_union"):  # SDXL's ControlNet++ (one model, several control modes)
        union = diffusers.ControlNetUnionModel.from_unet(
            base.unet, conditioning_embedding_out_channels=(16, 32), load_weights_from_unet=False
        )
        width = base.unet.config.block_out_channels[0]  # its task transformer is as wide as the first block
        torch.manual_seed(SEED + 7)
        components["controlnet"] = diffusers.ControlNetUnionModel.from_config(
            union.config, num_trans_channel=width, num_proj_channel=width
        ).eval()
    elif kind == "adapter":  # T2I-Adapter: residuals for the UNet's down blocks from the control image
        torch.manual_seed(SEED + 9)
        channels = list(base.unet.config.block_out_channels)
        components["adapter"] = diffusers.T2IAdapter(
            in_channels=3, channels=channels, num_res_blocks=1, downscale_factor=4, adapter_type="full_adapter_xl"
        ).eval()
    elif kind.startswith("controlnet"):
        components["controlnet"] = _controlnet_for(base, 1 if (family, kind) == ("sd3", "controlnet_inpaint") else 0)
    if family == "sdxl" and "requires_aesthetics_score" in cls.__init__.__code__.co_varnames:
        components["requires_aesthetics_score"] = False
    accepted = cls.__init__.__code__.co_varnames
    return _finish(cls(**{k: v for k, v in components.items() if k in accepted}))


def variant_call_kwargs(pipe: DiffusionPipeline) -> dict[str, Any]:
    """Small valid call kwargs for a :func:`variant` pipeline (without ``generator`` and guidance settings)."""
    name = type(pipe).__name__
    kwargs: dict[str, Any] = {"prompt": PROMPT, "num_inference_steps": 3, "output_type": "np"}
    kwargs["height"] = kwargs["width"] = IMAGE_SIZE
    if name.startswith(("StableDiffusion3", "Flux")):
        kwargs["max_sequence_length"] = 64
    control = random_image(IMAGE_SIZE, seed=SEED + 3)
    if "Inpaint" in name:
        mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
        mask[8:24, 8:24] = 255
        kwargs["image"] = random_image(IMAGE_SIZE)
        kwargs["mask_image"] = Image.fromarray(mask)
        kwargs["strength"] = 1.0 if "ControlNet" not in name else 0.99
    elif "Img2Img" in name:
        kwargs["image"] = random_image(IMAGE_SIZE)
        kwargs["strength"] = 0.75
        kwargs["num_inference_steps"] = 4
    if name == "StableDiffusion3ControlNetInpaintingPipeline":  # the image to fill is the control image
        kwargs["control_mask"] = kwargs.pop("mask_image")
        kwargs["control_image"] = kwargs.pop("image")
        del kwargs["strength"]
        return kwargs
    if "Adapter" in name:
        kwargs["image"] = control
        return kwargs
    if "ControlNetUnion" in name:
        kwargs["control_image"], kwargs["control_mode"] = [control], [0]
        return kwargs
    if "ControlNet" in name:
        key = (
            "control_image"
            if name.startswith(("StableDiffusion3", "Flux")) or "Img2Img" in name or "Inpaint" in name
            else "image"
        )
        kwargs[key] = control
    return kwargs


def pipeline_snapshot(pipe: DiffusionPipeline, denoiser: str | None = None) -> dict[str, Any]:
    """What ``guide()`` must leave as it found it: classes, attributes, hooks, processors, modules, weights (of the
    family's denoiser, or of the component ``denoiser``)."""
    from guidance.pipeline import family_of

    denoiser = getattr(pipe, denoiser or family_of(pipe).denoiser)
    return {
        "class": type(pipe),
        "denoiser_class": type(denoiser),
        "denoiser_attrs": sorted(vars(denoiser)),
        "module_state": {
            name: (type(m), sorted(vars(m)), len(m._forward_hooks), len(m._forward_pre_hooks))
            for name, m in denoiser.named_modules()
        },
        "forward": getattr(denoiser.forward, "__func__", None),
        "processors": {k: id(v) for k, v in getattr(denoiser, "attn_processors", {}).items()},
        "modules": {name: id(m) for name, m in pipe.components.items()},
        "scheduler": dict(pipe.scheduler.config),
        "weights": sum(p.double().sum().item() for p in denoiser.parameters()),
    }


def noise_image(size: tuple[int, int] = (24, 20), mode: str = "RGB", seed: int = SEED) -> Image.Image:
    """A PIL image (``size`` is width x height) of seeded uniform noise in 40..214, in ``mode`` (RGB, RGBA, L, LA)."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
    pixels = rng.integers(40, 215, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


@contextlib.contextmanager
def peak_rss_growth() -> Iterator[list[int]]:
    """Measure the process's peak resident memory over the block, sampled every 5 ms: the yielded list holds, after
    the block, the peak growth in bytes over the memory at its start."""
    import psutil

    process, peak, done = psutil.Process(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            done.wait(0.005)

    before = process.memory_info().rss
    growth = [0]
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield growth
    finally:
        done.set()
        watcher.join()
        growth[0] = max(peak[0], process.memory_info().rss) - before


def cmyk_swap_profile() -> bytes:
    """A small valid CMYK ICC profile (v2 printer class, an A2B0 lut16 to Lab on a 2-point grid) that shows cyan
    ink as magenta and magenta ink as cyan: an image converted through it cannot be mistaken for Pillow's naive
    CMYK -> RGB formula (which no ICC profile file ships with Pillow or this project to replace)."""
    import itertools
    import struct

    from PIL import ImageCms

    def s15(value: float) -> bytes:
        return struct.pack(">i", round(value * 65536))

    to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    lut = b"mft2" + bytes(4) + struct.pack(">BBBB", 4, 3, 2, 0) + b"".join(s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
    lut += struct.pack(">HH", 2, 2) + struct.pack(">8H", *([0, 65535] * 4))
    for c, m, y, k in itertools.product((0, 1), repeat=4):  # the first channel varies slowest
        rgb = tuple(round(255 * (1 - v) * (1 - k)) for v in (m, c, y))  # cyan and magenta swapped
        L, a, b = ImageCms.applyTransform(Image.new("RGB", (1, 1), rgb), to_lab).getpixel((0, 0))
        lut += struct.pack(">3H", round(L / 255 * 0xFF00), a * 256, b * 256)  # v2 Lab: a, b offset by 128
    lut += struct.pack(">6H", *([0, 65535] * 3))
    description = b"steerguard test CMYK\0"
    tags = [
        (b"desc", b"desc" + bytes(4) + struct.pack(">I", len(description)) + description + bytes(8 + 3 + 67)),
        (b"wtpt", b"XYZ " + bytes(4) + s15(0.9642) + s15(1.0) + s15(0.8249)),
        (b"cprt", b"text" + bytes(4) + b"public domain\0"),
        (b"A2B0", lut),
    ]
    start = 128 + 4 + 12 * len(tags)
    table = data = b""
    for signature, body in tags:
        data += bytes(-(start + len(data)) % 4)
        table += signature + struct.pack(">II", start + len(data), len(body))
        data += body
    header = struct.pack(">I", start + len(data)) + bytes(4) + struct.pack(">I", 0x02100000) + b"prtrCMYKLab "
    header += bytes(12) + b"acsp" + bytes(28) + s15(0.9642) + s15(1.0) + s15(0.8249)
    return header + bytes(128 - len(header)) + struct.pack(">I", len(tags)) + table + data
