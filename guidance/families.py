"""Which diffusers pipelines ``guide()`` serves, how each lays out its guidance branches, and their noise schedules.

A :class:`Family` names the pipeline classes it serves, the denoiser attribute, the branch layout of one step,
the argument that switches the unconditional branch on and the call arguments refused inside ``guide()``.
:func:`schedule_of` reads a scheduler's noise schedule and prediction type (duck-typed);
:func:`steps_of_the_call` how many denoising steps the running call makes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import prediction as P


@dataclasses.dataclass(frozen=True)
class Family:
    """How a family of pipelines lays out its guidance branches."""

    name: str
    classes: tuple[str, ...]
    denoiser: str
    #: "uncond_cond" / "cond_uncond": one batched call, halves in this order;
    #: "sequential": a conditional call, then an unconditional one (FLUX true CFG);
    #: "text_image_uncond": one batched call of three thirds, text and image, image alone, neither
    #: (InstructPix2Pix: ``u + s (c - c_I) + s_I (c_I - u)``, ``s_I`` the call's :attr:`image_scale_arg`)
    layout: str
    #: the ``__call__`` argument whose value > 1 switches the unconditional branch on
    scale_arg: str
    #: the denoiser sees ``timestep / timestep_divisor`` (FLUX: 1000)
    timestep_divisor: float = 1.0
    #: the denoiser's config entry the pipeline multiplies the timestep by (Sana's ``timestep_scale``)
    timestep_scale_key: str | None = None
    #: a second denoiser the pipeline switches to for its low-noise steps (Wan 2.2's ``transformer_2``), and the
    #: argument holding that stage's CFG scale (None in the call: the first stage's)
    second_denoiser: str | None = None
    second_scale_arg: str | None = None
    #: call arguments that would bypass or double the guidance, with the reason
    refused: tuple[tuple[str, str], ...] = ()
    #: denoiser arguments without a batch dimension
    unbatched: tuple[str, ...] = ()
    #: joint attention puts the text tokens before the image tokens (FLUX) rather than after (SD3)
    text_first: bool = False
    #: "sequential" layout: the negative embeddings that together switch the pipeline's true CFG on
    negative_embeds: tuple[str, ...] = ()
    #: "sequential" layout: the pipeline runs its unconditional call whenever its scale is above 1, with an empty
    #: negative prompt unless given one (Chroma); else only with a negative prompt or embeddings (FLUX true CFG)
    negative_by_default: bool = False
    #: the denoiser sees ``(divisor - t) / divisor``, time running from 0 at pure noise (Z-Image)
    timestep_reversed: bool = False
    #: the denoiser returns the negated prediction of the schedule's type (Z-Image: x0 - noise, the pipeline
    #: negates it into the flow velocity)
    output_sign: float = 1.0
    #: the pipeline's CFG is ``c + s (c - u)`` (Z-Image): ``s + scale_offset`` is its weight ``w`` in
    #: ``u + w (c - u)``, and it runs the unconditional branch when ``w > 1``
    scale_offset: float = 0.0
    #: the pipeline runs its unconditional branch when that weight ``w`` is above this (Kandinsky 3 combines
    #: ``c + s (c - u)`` but tests ``s > 1``: ``w > 2``)
    cfg_above: float = 1.0
    #: the call argument that makes the pipeline rescale its CFG result against the conditional prediction
    rescale_arg: str = "guidance_rescale"
    #: denoiser arguments that hold one tensor per sample in a list (Z-Image's latents and captions)
    list_args: tuple[str, ...] = ()
    #: whether the pipeline skips its unconditional branch at a step that its CFG mode would otherwise run, from
    #: the pipeline, the call's arguments, the timestep argument the denoiser gets, the step's index and the call's
    #: number of steps (Z-Image's ``cfg_truncation``, Lumina 2's ``cfg_trunc_ratio``)
    cfg_cut: Callable[[Any, dict[str, Any], Any, int, int], bool] | None = None
    #: the denoiser's attention runs on one sequence of image and text tokens whose split the engine does not
    #: read (Z-Image): the image-only identity (``PAG(joint="image")``) is refused
    single_sequence: bool = False
    #: denoiser arguments laid out on the batch's padded token sequence (Z-Image's ControlNet samples): with
    #: them, ``sequential=True`` runs each perturbed branch on the whole batch (the cond rows alone would be
    #: padded to another length)
    padded_args: tuple[str, ...] = ()
    #: the denoiser's blocks take their hidden states as ``(tokens, batch, channels)`` (ERNIE-Image): the token
    #: shuffle and the skipped rows act on their dim 1 (the denoiser's own inputs stay batch-first)
    sequence_first: bool = False
    #: the pipeline config flag that switches its CFG off for a guidance-distilled checkpoint (FLUX.2 klein's
    #: ``is_distilled``; Krea 2's flag of that name only changes the schedule)
    distilled_flag: str | None = None
    #: the (text, image) token counts of the joint sequence that the denoiser builds from image latents
    #: ``(B, C, H, W)`` and its text, as a function of the denoiser, the latents and the denoiser call's keyword
    #: arguments (AuraFlow: learned register tokens before the text, one image token per patch; HiDream: the image
    #: before its T5 and Llama tokens): where ``PAG(joint="image")`` finds the image tokens in single-stream blocks
    joint_tokens: Callable[[Any, Tensor, dict[str, Any]], tuple[int, int]] | None = None
    #: denoiser arguments whose batch is not their first dimension, with that dimension (HiDream's Llama states
    #: ``(layers, batch, tokens, channels)``)
    batch_dims: tuple[tuple[str, int], ...] = ()
    #: the self-attention's queries are the image tokens alone and its keys and values ``[text, image]`` (PRX):
    #: PAG's identity maps each image token to its own value, the last keys
    image_queries: bool = False
    #: the CFG scale a pipeline combines this step with when it sets it after the denoiser call (CogVideoX's
    #: ``use_dynamic_cfg``), from the pipeline, the call's arguments, the denoiser's timestep, the step's index and
    #: the call's number of steps; None: the scale the pipeline holds
    dynamic_scale: Callable[[Any, dict[str, Any], Any, int, int], float | None] | None = None
    #: what the denoiser predicts when the pipeline converts it before the scheduler's step (PRXPixel: x0,
    #: ``"sample"``, turned into the flow velocity with the latents); None: the scheduler's prediction type
    prediction: str | None = None
    #: the input dimension of the frames the denoiser folds into its batch, sample-major (AnimateDiff's UNet:
    #: ``(B, C, F, H, W)`` becomes ``(B F, C, H, W)``); its arguments laid out per frame (the prompt embeddings
    #: the pipeline repeats per frame, ControlNet residuals) have ``B F`` rows
    frames_dim: int | None = None
    #: "text_image_uncond" layout: the ``__call__`` argument of the image guidance's scale ``s_I`` (kept as the
    #: pipeline's: CFG-type methods take the text guidance's place, on ``(c, c_I)``)
    image_scale_arg: str | None = None
    #: the generated image is the last of the ``img_shapes`` images and its tokens end the denoiser's input and
    #: output (Qwen-Image 2.1: the output covers the text and condition-image tokens before them, unless its prefix
    #: cache serves those): the methods act on those last tokens
    generated_last: bool = False
    #: the call argument that keeps the conditional branch's prefix (text, condition images) in a cache across
    #: steps (Qwen-Image 2.1's ``use_kv_cache``): a perturbed branch would read and overwrite it, so with
    #: perturbation guidance it is off unless the call switches it on itself (refused then)
    cache_arg: str | None = None
    #: where the pipeline's first latent frame is the input image, which it does not step, the input's dimension of
    #: the frames, from the pipeline (Kandinsky 5 image-to-video: 1; HunyuanVideo image-to-video with
    #: ``token_replace``: 2); None otherwise. The methods act on the frames after it
    image_first_frame: Callable[[Any], int | None] | None = None

    def weight(self, value: Any) -> float:
        """The CFG weight ``w`` in ``u + w (c - u)`` of the pipeline's scale argument ``value`` (None: no CFG)."""
        return 1.0 if value is None else float(value) + self.scale_offset

    def runs_cfg(self, value: Any) -> bool:
        """Whether the pipeline runs its unconditional branch at the scale argument ``value``."""
        return self.weight(value) > self.cfg_above

    def argument(self, weight: float) -> float:
        """The scale argument that gives the pipeline's CFG the weight ``weight``."""
        return weight - self.scale_offset


def _z_image_cut(pipe: Any, arguments: dict[str, Any], timestep: Any, index: int, steps: int) -> bool:
    """Z-Image's ``cfg_truncation``: no unconditional branch once the normalised time ``1 - t / 1000`` (the
    denoiser's timestep argument, the value the pipeline compares) is above it."""
    truncation = getattr(pipe, "_cfg_truncation", None)
    if truncation is None or float(truncation) > 1:
        return False
    return float(torch.as_tensor(timestep).reshape(-1)[0]) > float(truncation)


def _lumina2_cut(pipe: Any, arguments: dict[str, Any], timestep: Any, index: int, steps: int) -> bool:
    """Lumina 2's ``cfg_trunc_ratio``: no unconditional call once ``(i + 1) / n`` is above it."""
    return (index + 1) / steps > float(arguments.get("cfg_trunc_ratio", 1.0))


def _auraflow_tokens(denoiser: Any, latents: Tensor, kwargs: dict[str, Any]) -> tuple[int, int]:
    """AuraFlow's joint sequence: its register tokens, the text, then one token per ``patch_size`` square."""
    patch = denoiser.config.patch_size
    image = (latents.shape[-2] // patch) * (latents.shape[-1] // patch)
    return denoiser.register_tokens.shape[1] + kwargs["encoder_hidden_states"].shape[1], image


def _hidream_tokens(denoiser: Any, latents: Tensor, kwargs: dict[str, Any]) -> tuple[int, int]:
    """HiDream-I1's single-stream sequence: one token per ``patch_size`` square (padded to the denoiser's
    ``max_seq`` for a non-square image), then the T5 tokens and twice the Llama tokens (its last chosen layer, and
    the block's own layer)."""
    patch = denoiser.config.patch_size
    height, width = latents.shape[-2:]
    image = denoiser.max_seq if height != width else (height // patch) * (width // patch)
    llama = kwargs["encoder_hidden_states_llama3"]
    llama_tokens = llama[0].shape[-2]  # a (layers, batch, tokens, channels) tensor or a list per layer
    return kwargs["encoder_hidden_states_t5"].shape[1] + 2 * llama_tokens, image


def _kandinsky5_image_frame(pipe: Any) -> int | None:
    return 1 if type(pipe).__name__ == "Kandinsky5I2VPipeline" else None


def _hunyuanvideo_image_frame(pipe: Any) -> int | None:
    image = type(pipe).__name__ == "HunyuanVideoImageToVideoPipeline"
    return 2 if image and pipe.transformer.config.get("image_condition_type") == "token_replace" else None


def _cogvideox_scale(pipe: Any, arguments: dict[str, Any], timestep: Any, index: int, steps: int) -> float | None:
    """CogVideoX's ``use_dynamic_cfg``: the scale the pipeline sets after the denoiser call and combines this step's
    CFG with, from the timestep the denoiser got (diffusers' formula, its odd power of ``(n - t) / n`` included)."""
    if not arguments.get("use_dynamic_cfg") or timestep is None:
        return None
    n, t = steps, float(torch.as_tensor(timestep).reshape(-1)[0])
    return 1 + float(arguments.get("guidance_scale", 6.0)) * ((1 - math.cos(math.pi * ((n - t) / n) ** 5.0)) / 2)


FAMILIES: tuple[Family, ...] = (
    Family(
        "sd",
        (
            "StableDiffusionPipeline",
            "StableDiffusionImg2ImgPipeline",
            "StableDiffusionInpaintPipeline",
            "StableDiffusionControlNetPipeline",
            "StableDiffusionControlNetImg2ImgPipeline",
            "StableDiffusionControlNetInpaintPipeline",
            "StableDiffusionAdapterPipeline",  # T2I-Adapter: its residuals are rebound with the batch
            "StableDiffusionUpscalePipeline",  # the x4 upscaler: the low-res image follows the latents
            "StableDiffusionDepth2ImgPipeline",  # the depth map follows the latents
        ),
        "unet",
        "uncond_cond",
        "guidance_scale",
    ),
    Family(
        "sdxl",
        (
            "StableDiffusionXLPipeline",
            "StableDiffusionXLImg2ImgPipeline",
            "StableDiffusionXLInpaintPipeline",
            "StableDiffusionXLControlNetPipeline",
            "StableDiffusionXLControlNetImg2ImgPipeline",
            "StableDiffusionXLControlNetInpaintPipeline",
            "StableDiffusionXLControlNetUnionPipeline",
            "StableDiffusionXLControlNetUnionImg2ImgPipeline",
            "StableDiffusionXLControlNetUnionInpaintPipeline",
            "StableDiffusionXLAdapterPipeline",
            "KolorsPipeline",  # an SDXL UNet with ChatGLM text
            "KolorsImg2ImgPipeline",
        ),
        "unet",
        "uncond_cond",
        "guidance_scale",
    ),
    Family(
        "kandinsky3",
        ("Kandinsky3Pipeline", "Kandinsky3Img2ImgPipeline"),
        "unet",
        "uncond_cond",
        "guidance_scale",
        scale_offset=1.0,  # (s + 1) c - s u
        cfg_above=2.0,  # the branch runs when s > 1
    ),
    Family(
        "sd3",
        (
            "StableDiffusion3Pipeline",
            "StableDiffusion3Img2ImgPipeline",
            "StableDiffusion3InpaintPipeline",
            "StableDiffusion3ControlNetPipeline",
            "StableDiffusion3ControlNetInpaintingPipeline",
        ),
        "transformer",
        "uncond_cond",
        "guidance_scale",
        refused=(
            (
                "skip_guidance_layers",
                "the pipeline's skip-layer guidance calls the denoiser outside the CFG batch; pass "
                "guidance.SLG(scale, layers=...) to guide() instead (the same guidance, batched)",
            ),
        ),
    ),
    Family(
        "flux",
        (
            "FluxPipeline",
            "FluxImg2ImgPipeline",
            "FluxInpaintPipeline",
            "FluxControlNetPipeline",
            "FluxKontextPipeline",
            "FluxKontextInpaintPipeline",
            # no true CFG (guidance-distilled): perturbation guidance only
            "FluxFillPipeline",
            "FluxControlPipeline",
            "FluxControlImg2ImgPipeline",
            "FluxControlInpaintPipeline",
            "FluxControlNetImg2ImgPipeline",
            "FluxControlNetInpaintPipeline",
        ),
        "transformer",
        "sequential",
        "true_cfg_scale",
        timestep_divisor=1000.0,
        unbatched=("img_ids", "txt_ids"),
        text_first=True,
        negative_embeds=("negative_prompt_embeds", "negative_pooled_prompt_embeds"),
    ),
    # FLUX.2 [dev]: guidance-distilled, no true CFG (perturbation guidance only); position ids per sample
    Family("flux2", ("Flux2Pipeline",), "transformer", "sequential", "true_cfg_scale", 1000.0, text_first=True),
    Family(
        "flux2-klein",
        ("Flux2KleinPipeline", "Flux2KleinInpaintPipeline"),  # real CFG in a separate call (none when distilled)
        "transformer",
        "sequential",
        "guidance_scale",
        timestep_divisor=1000.0,
        text_first=True,
        negative_embeds=("negative_prompt_embeds",),
        negative_by_default=True,
        distilled_flag="is_distilled",
    ),
    Family(
        "qwenimage",
        (
            "QwenImagePipeline",
            "QwenImageImg2ImgPipeline",
            "QwenImageInpaintPipeline",
            "QwenImageEditPipeline",
            "QwenImageEditPlusPipeline",
            "QwenImageEditInpaintPipeline",
            "QwenImageControlNetPipeline",
            "QwenImageControlNetInpaintPipeline",
        ),
        "transformer",
        "sequential",
        "true_cfg_scale",
        timestep_divisor=1000.0,
        text_first=True,
        negative_embeds=("negative_prompt_embeds",),
    ),
    Family(
        "qwenimage21",
        # one single-stream sequence of [text with condition images, generated image] under a block-causal mask
        # (attention in segments: each segment's queries over the keys up to its end); a separate unconditional call
        # with a negative prompt; the output covers the whole sequence, the generated image's tokens last
        ("QwenImage21Pipeline",),
        "transformer",
        "sequential",
        "true_cfg_scale",
        timestep_divisor=1000.0,
        negative_embeds=("negative_prompt_embeds",),
        single_sequence=True,
        image_queries=True,
        generated_last=True,
        cache_arg="use_kv_cache",
    ),
    Family(
        "longcat-image",
        # FLUX-style double and single blocks over [text, image] tokens (the transformer multiplies t / 1000 back);
        # a separate unconditional call with an empty negative prompt unless given one, then its optional per-token
        # renormalisation to the conditional prediction's norm (``enable_cfg_renorm``), which reads the true
        # conditional output; the Edit pipeline's reference-image tokens follow the generated ones (position ids'
        # first coordinate 2 after 1)
        ("LongCatImagePipeline", "LongCatImageEditPipeline"),
        "transformer",
        "sequential",
        "guidance_scale",
        timestep_divisor=1000.0,
        unbatched=("img_ids", "txt_ids"),
        text_first=True,
        negative_embeds=("negative_prompt_embeds",),
        negative_by_default=True,
    ),
    Family(
        "ovis-image",
        # FLUX-style double and single blocks over [text, image] tokens; a separate unconditional call whenever
        # guidance_scale > 1, with an empty negative prompt unless given one
        ("OvisImagePipeline",),
        "transformer",
        "sequential",
        "guidance_scale",
        timestep_divisor=1000.0,
        unbatched=("img_ids", "txt_ids"),
        text_first=True,
        negative_embeds=("negative_prompt_embeds",),
        negative_by_default=True,
    ),
    Family(
        "ernie-image",
        # one batched CFG call (uncond first) of single-stream blocks over [image, text] tokens, each sample's text
        # padded to the batch's longest (a key-padding mask); the blocks run sequence-first
        ("ErnieImagePipeline",),
        "transformer",
        "uncond_cond",
        "guidance_scale",
        single_sequence=True,
        sequence_first=True,
    ),
    Family(
        "chroma",
        ("ChromaPipeline", "ChromaImg2ImgPipeline"),  # ChromaInpaintPipeline fails in diffusers 0.42 itself
        "transformer",
        "sequential",
        "guidance_scale",
        timestep_divisor=1000.0,
        unbatched=("img_ids", "txt_ids"),
        text_first=True,
        negative_embeds=("negative_prompt_embeds",),
        negative_by_default=True,
    ),
    Family(
        "cosmos2",
        # a conditional call, then an unconditional one, combined as c + s (c - u) on x0 for s > 1; the transformer
        # sees the latents on the flow path at t = sigma / (1 + sigma) of the scheduler's EDM sigmas, in [0, 1]
        ("Cosmos2TextToImagePipeline", "Cosmos2VideoToWorldPipeline", "Cosmos2_5_PredictBasePipeline"),
        "transformer",
        "sequential",
        "guidance_scale",
        timestep_divisor=1000.0,
        unbatched=("padding_mask",),
        negative_embeds=("negative_prompt_embeds",),
        negative_by_default=True,
        scale_offset=1.0,
        cfg_above=2.0,
    ),
    Family(
        "auraflow",
        # one batched CFG call (uncond first) of MMDiT joint blocks, then single-stream blocks over [registers,
        # text, image] tokens; the timestep is sigma in [0, 1]
        ("AuraFlowPipeline",),
        "transformer",
        "uncond_cond",
        "guidance_scale",
        timestep_divisor=1000.0,
        text_first=True,
        joint_tokens=_auraflow_tokens,
    ),
    Family(
        "hidream",
        # one batched CFG call (uncond first); the pipeline negates the denoiser's output into the flow velocity;
        # double-stream blocks over [image, text], then single-stream blocks over [image, T5, Llama, Llama]; the
        # Llama states carry the batch on their dim 1
        ("HiDreamImagePipeline",),
        "transformer",
        "uncond_cond",
        "guidance_scale",
        output_sign=-1.0,
        joint_tokens=_hidream_tokens,
        batch_dims=(("encoder_hidden_states_llama3", 1),),
    ),
    Family(
        "prx",
        # one batched CFG call (uncond first); the image tokens attend to [text, image] in one attention per block;
        # the timestep is sigma in [0, 1]
        ("PRXPipeline",),
        "transformer",
        "uncond_cond",
        "guidance_scale",
        timestep_divisor=1000.0,
        text_first=True,
        image_queries=True,
    ),
    Family(
        "prx_pixel",
        # PRX on RGB pixels: the denoiser predicts x0, which the pipeline turns into the flow velocity
        ("PRXPixelPipeline",),
        "transformer",
        "uncond_cond",
        "guidance_scale",
        timestep_divisor=1000.0,
        text_first=True,
        image_queries=True,
        prediction="sample",
    ),
    Family(
        "animatediff",
        # AnimateDiff (SD 1.5 and SDXL, text- and video-to-video, ControlNet, SparseCtrl): one batched CFG call
        # (uncond first) of a UNet with motion modules on latents (B, C, F, H, W); the UNet folds the frames into
        # its batch, and the pipeline repeats the prompt embeddings per frame (ControlNet residuals too)
        (
            "AnimateDiffPipeline",
            "AnimateDiffVideoToVideoPipeline",
            "AnimateDiffControlNetPipeline",
            "AnimateDiffVideoToVideoControlNetPipeline",
            "AnimateDiffSparseControlNetPipeline",
            "AnimateDiffSDXLPipeline",
        ),
        "unet",
        "uncond_cond",
        "guidance_scale",
        frames_dim=2,
    ),
    Family(
        "instruct-pix2pix",
        # one batched call of three thirds: [text + image, image, neither] (the input image's latents follow the
        # latents' channels, zeros in the last third)
        ("StableDiffusionInstructPix2PixPipeline", "StableDiffusionXLInstructPix2PixPipeline"),
        "unet",
        "text_image_uncond",
        "guidance_scale",
        image_scale_arg="image_guidance_scale",
    ),
    Family(
        "svd",
        # Stable Video Diffusion: one batched CFG call (uncond first) of a spatio-temporal UNet on latents
        # (B, F, C, H, W), the input image's latents after the latents' channels; its CFG weight ramps over the
        # frames from min_guidance_scale to max_guidance_scale (a tensor the pipeline holds); the UNet folds the frames
        # into its batch
        ("StableVideoDiffusionPipeline",),
        "unet",
        "uncond_cond",
        "max_guidance_scale",
        frames_dim=1,
    ),
    Family("dit", ("DiTPipeline",), "transformer", "cond_uncond", "guidance_scale"),
    Family(
        "hunyuandit",
        ("HunyuanDiTPipeline", "HunyuanDiTControlNetPipeline"),
        "transformer",
        "uncond_cond",
        "guidance_scale",
        unbatched=("image_rotary_emb",),
    ),
    Family("pixart", ("PixArtSigmaPipeline", "PixArtAlphaPipeline"), "transformer", "uncond_cond", "guidance_scale"),
    Family(
        "sana", ("SanaPipeline",), "transformer", "uncond_cond", "guidance_scale", timestep_scale_key="timestep_scale"
    ),
    Family(
        "sana-sprint",
        # guidance-distilled (its guidance_scale feeds a guidance embedding): perturbation guidance only; the
        # transformer sees the flow path at s in [0, 1] (the pipeline turns its output into a TrigFlow velocity)
        ("SanaSprintPipeline", "SanaSprintImg2ImgPipeline"),
        "transformer",
        "uncond_cond",
        "true_cfg_scale",
        timestep_divisor=1000.0,
    ),
    # diffusers' Sana ControlNet pipeline passes the timestep unscaled
    Family("sana-controlnet", ("SanaControlNetPipeline",), "transformer", "uncond_cond", "guidance_scale"),
    Family(
        "cogview3plus",
        # one batched CFG call (uncond first) of joint-attention blocks over [text, image] that return the image
        # stream first; v-prediction on CogVideoX's DDIM (or DPM) schedule
        ("CogView3PlusPipeline",),
        "transformer",
        "uncond_cond",
        "guidance_scale",
        text_first=True,
    ),
    Family(
        "cogvideox",
        # one batched CFG call (uncond first) of joint blocks over [text, video] (image-first outputs); latents
        # (B, F, C, H, W), image-to-video's image latents after them on dim 2; v-prediction on CogVideoX's schedules
        ("CogVideoXPipeline", "CogVideoXImageToVideoPipeline", "CogVideoXVideoToVideoPipeline"),
        "transformer",
        "uncond_cond",
        "guidance_scale",
        text_first=True,
        unbatched=("image_rotary_emb", "ofs"),
        dynamic_scale=_cogvideox_scale,
    ),
    Family(
        "hunyuanvideo",
        # HunyuanVideo text- and image-to-video (guidance-distilled: its `guidance_scale` is an embedded guidance):
        # true CFG as a separate unconditional call with a negative prompt; double and single blocks over [video,
        # text] that pass the text beside the video to their attention and return the video stream first;
        # image-to-video: the image's latents and a mask after the latents' channels (latent_concat), or the image's
        # latents as the first frame, not stepped (token_replace)
        ("HunyuanVideoPipeline", "HunyuanVideoImageToVideoPipeline"),
        "transformer",
        "sequential",
        "true_cfg_scale",
        negative_embeds=("negative_prompt_embeds", "negative_pooled_prompt_embeds"),
        image_first_frame=_hunyuanvideo_image_frame,
    ),
    Family(
        "ltx",
        # LTX-Video text- and image-to-video: one batched CFG call (uncond first) over packed video tokens (B, N, C),
        # blocks of self-attention (attn1) and cross-attention (attn2); the timestep is the scheduler's, one per
        # token in image-to-video (the first frame's tokens at 0)
        ("LTXPipeline", "LTXImageToVideoPipeline"),
        "transformer",
        "uncond_cond",
        "guidance_scale",
    ),
    Family(
        "kandinsky5",
        # Kandinsky 5 text- and image-to-image and -video: a conditional call, then an unconditional one (an empty
        # negative prompt unless given one) whenever guidance_scale > 1; latents (B, F, H, W, C), the input image's
        # latents and mask channel after them (image-to-image, -video); text-encoder blocks, then visual blocks of
        # self- and cross-attention
        ("Kandinsky5T2IPipeline", "Kandinsky5I2IPipeline", "Kandinsky5T2VPipeline", "Kandinsky5I2VPipeline"),
        "transformer",
        "sequential",
        "guidance_scale",
        negative_embeds=("negative_prompt_embeds_qwen",),
        negative_by_default=True,
        unbatched=("visual_rope_pos", "text_rope_pos", "scale_factor", "sparse_params"),
        image_first_frame=_kandinsky5_image_frame,
    ),
    Family(
        "cogview4",
        ("CogView4Pipeline",),
        "transformer",
        "sequential",
        "guidance_scale",
        text_first=True,
        negative_embeds=("negative_prompt_embeds",),
        negative_by_default=True,
    ),
    Family(
        "wan",
        # Wan 2.1 and 2.2 text-, image- and video-to-video and VACE (latents (B, C, F, H, W); image-to-video: the
        # condition's mask and latent channels follow the latents in the denoiser's input; VACE: control latents
        # beside them, scaled per VACE layer), and the editing models built on Wan: ChronoEdit (image-to-video's
        # layout; its temporal reasoning keeps two of the frames after its first steps) and Lucy Edit (the input
        # video's latents after the latents' channels)
        (
            "WanPipeline",
            "WanImageToVideoPipeline",
            "WanVideoToVideoPipeline",
            "WanVACEPipeline",
            "ChronoEditPipeline",
            "LucyEditPipeline",
        ),
        "transformer",
        "sequential",
        "guidance_scale",
        negative_embeds=("negative_prompt_embeds",),
        negative_by_default=True,
        unbatched=("control_hidden_states_scale",),
        second_denoiser="transformer_2",
        second_scale_arg="guidance_scale_2",
    ),
    Family(
        "skyreels-v2",
        # SkyReels V2 text- and image-to-video: Wan's layout (a separate unconditional call whenever
        # guidance_scale > 1; image-to-video's condition mask and latents after the latents' channels); the
        # diffusion-forcing pipelines (a timestep per frame) are not served
        ("SkyReelsV2Pipeline", "SkyReelsV2ImageToVideoPipeline"),
        "transformer",
        "sequential",
        "guidance_scale",
        negative_embeds=("negative_prompt_embeds",),
        negative_by_default=True,
    ),
    Family(
        "z-image",
        # one list entry per sample for the latents (C, 1, H, W) and the captions (their own lengths); the cond
        # samples first; one sequence of [image, caption] tokens, padded per batch; ZImageOmniPipeline (nested
        # lists of condition images) is not served
        (
            "ZImagePipeline",
            "ZImageImg2ImgPipeline",
            "ZImageInpaintPipeline",
            "ZImageControlNetPipeline",
            "ZImageControlNetInpaintPipeline",
        ),
        "transformer",
        "cond_uncond",
        "guidance_scale",
        timestep_divisor=1000.0,
        timestep_reversed=True,
        output_sign=-1.0,
        scale_offset=1.0,
        rescale_arg="cfg_normalization",
        list_args=("x", "cap_feats"),
        cfg_cut=_z_image_cut,
        single_sequence=True,
        padded_args=("controlnet_block_samples",),
    ),
    Family(
        "lumina2",
        # one sequence of [caption, image] tokens, padded per batch; the time running from 0 at pure noise, the
        # output negated (as Z-Image); a separate unconditional call, rescaled per token to the conditional
        # prediction's norm (``cfg_normalization``)
        ("Lumina2Pipeline",),
        "transformer",
        "sequential",
        "guidance_scale",
        timestep_divisor=1000.0,
        timestep_reversed=True,
        output_sign=-1.0,
        negative_embeds=("negative_prompt_embeds",),
        negative_by_default=True,
        cfg_cut=_lumina2_cut,
        single_sequence=True,
    ),
    Family(
        "krea2",
        # a separate unconditional call (an empty negative prompt unless given one) whenever guidance_scale > 0, its
        # CFG c + s (c - u); single-stream blocks over [text, image] tokens, one position table for the batch
        ("Krea2Pipeline",),
        "transformer",
        "sequential",
        "guidance_scale",
        timestep_divisor=1000.0,
        scale_offset=1.0,
        unbatched=("position_ids",),
        text_first=True,
        negative_embeds=("negative_prompt_embeds",),
        negative_by_default=True,
    ),
)


def family_of(pipe: Any) -> Family:
    """The :class:`Family` serving ``pipe`` (matched on its class and base classes)."""
    names = [cls.__name__ for cls in type(pipe).__mro__]
    for name in names:
        for family in FAMILIES:
            if name in family.classes:
                return family
    if "guider" in getattr(pipe, "components", {}):  # HunyuanImage 2.1: the pipeline runs a diffusers guider
        raise TypeError(
            f"{type(pipe).__name__} runs the diffusers guider in its `guider` component: set "
            "pipe.guider = as_guider(...) (guidance.modular) with the methods instead of guide()"
        )
    supported = ", ".join(c for f in FAMILIES for c in f.classes)
    raise TypeError(
        f"guide() cannot serve {type(pipe).__name__}: it is none of the supported pipelines ({supported}) "
        "nor a subclass of one"
    )


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Maps a denoiser's timestep to ``(alpha, sigma)`` and its output to x0 (see :mod:`.prediction`)."""

    alpha_sigma: Callable[[Tensor], tuple[Tensor, Tensor]]
    coefficients: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def schedule_of(scheduler: Any, prediction: str | None = None) -> Schedule:
    """Read the noise schedule and prediction type from a diffusers scheduler (duck-typed); ``prediction``: what
    the denoiser predicts on a flow-matching path when it is not the velocity (:attr:`Family.prediction`)."""
    config = scheduler.config
    name = type(scheduler).__name__
    kind = config.get("prediction_type", "epsilon")
    n_train = config.get("num_train_timesteps", 1000)
    if P.is_flow_schedule(name, config):
        return Schedule(
            lambda t: P.flow(t.float() / n_train),
            lambda a, s: P.x0_coefficients(a, s, prediction or "flow"),
        )
    if name.startswith("EDM"):
        sigma_data = config["sigma_data"]
        sign = -1.0 if kind == "v_prediction" else 1.0
        return Schedule(
            lambda t: P.edm(torch.exp(4 * t.float()), sigma_data),
            lambda a, s: P.edm_x0_coefficients(a, s, sigma_data, sign),
        )
    if getattr(scheduler, "alphas_cumprod", None) is not None and kind in P.PREDICTION_TYPES:
        if P.has_log_sigma_timesteps(config):
            alpha_sigma = lambda t: P.ve_to_vp(torch.exp(4 * t.float()))
        else:
            table = P.DeviceCopies(torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64))
            alpha_sigma = lambda t: P.vp_discrete(table.on(t.device), t)
        return Schedule(alpha_sigma, lambda a, s: P.x0_coefficients(a, s, kind))
    raise TypeError(
        f"guide() cannot read the noise schedule of {name}: it needs a flow-matching scheduler, an EDM scheduler "
        f"or one with `alphas_cumprod` and prediction_type in {P.PREDICTION_TYPES} (got {kind!r})"
    )


def steps_of_the_call(pipe: Any) -> int:
    """How many denoiser evaluations (one per step of a first-order scheduler) the running call makes.

    Pipelines set ``_num_timesteps`` to the length of the timesteps their loop runs over, after cutting them
    for ``strength``, ``denoising_start`` and ``denoising_end`` (``guide()`` clears it before each call). Otherwise
    the scheduler's timesteps from its ``begin_index`` on.
    """
    count = vars(pipe).get("_num_timesteps")
    if isinstance(count, int) and count > 0:
        return count
    scheduler = pipe.scheduler
    timesteps = getattr(scheduler, "timesteps", None)
    steps = (len(timesteps) if timesteps is not None else 0) - (getattr(scheduler, "begin_index", None) or 0)
    return max(steps, 1)
