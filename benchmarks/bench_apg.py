"""Per-step time of APG against CFG on the same pipeline, measured side by side in one run.

Peer: the pipeline's own CFG (no hooks). Also timed: ``guide(pipe, CFG(w))``
(the cost of the hooks alone) and APG in x0 and model space. Each repeat runs
every setting once, in a rotating order, and the medians are compared.

    python benchmarks/bench_apg.py --arch small            # CPU, a small SD-style UNet
    python benchmarks/bench_apg.py --arch sdxl --size 1024 --device cuda --dtype float16

``--arch sdxl`` builds the full-size SDXL UNet with random weights (no
download; prompt embeddings are random tensors, the VAE is not run).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from guidance import APG, CFG, guide

SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SMALL_UNET = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    block_out_channels=(64, 128, 256),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 8),
    cross_attention_dim=256,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=32,
    projection_class_embeddings_input_dim=6 * 32 + 128,
)


def build(arch: str, device: str, dtype: torch.dtype):
    """An SDXL pipeline around a random-weight UNet; text encoders replaced by random embeddings."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    config = SDXL_UNET if arch == "sdxl" else SMALL_UNET
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).to(device).eval()
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
    ).to(device)
    if dtype != torch.float32:
        unet, vae = unet.to(dtype=dtype), vae.to(dtype=dtype)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    hidden, pooled = (
        config["cross_attention_dim"],
        config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"],
    )
    embeds = {
        "prompt_embeds": torch.randn(1, 77, hidden, generator=g),
        "negative_prompt_embeds": torch.randn(1, 77, hidden, generator=g),
        "pooled_prompt_embeds": torch.randn(1, pooled, generator=g),
        "negative_pooled_prompt_embeds": torch.randn(1, pooled, generator=g),
    }
    return pipe, {k: v.to(device, dtype) for k, v in embeds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["small", "sdxl"], default="small")
    parser.add_argument("--size", type=int, default=None, help="image size in pixels (latents are size/8)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    size = args.size or (1024 if args.arch == "sdxl" else 256)
    pipe, embeds = build(args.arch, args.device, dtype)
    call = dict(
        embeds, height=size, width=size, num_inference_steps=args.steps, output_type="latent", guidance_scale=5.0
    )
    settings = {
        "pipeline CFG (peer)": (),
        "guide CFG": (CFG(5.0),),
        "guide APG x0": (APG(5.0),),
        "guide APG model": (APG(5.0, space="model"),),
    }

    def timed(methods) -> float:
        generator = torch.Generator(args.device).manual_seed(0)
        if methods:
            with guide(pipe, *methods):
                start = _now(args.device)
                pipe(**call, generator=generator)
                return (_now(args.device) - start) / args.steps
        start = _now(args.device)
        pipe(**call, generator=generator)
        return (_now(args.device) - start) / args.steps

    names = list(settings)
    for name in names:  # warm-up
        timed(settings[name])
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for name in order:
            times[name].append(timed(settings[name]))
    peer = statistics.median(times[names[0]])
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    params = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    print(
        f"# APG vs CFG per step: {args.arch} UNet ({params:.0f} M params), {size}x{size}, batch 1 (+uncond), "
        f"{args.dtype}, {args.steps} steps, {args.repeats} repeats, {device_name}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}"
    )
    print("| setting | median ms/step | min ms/step | ratio to pipeline CFG |")
    print("|---|---|---|---|")
    for name in names:
        median = statistics.median(times[name])
        print(f"| {name} | {1e3 * median:.2f} | {1e3 * min(times[name]):.2f} | {median / peer:.3f}x |")


def _now(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


if __name__ == "__main__":
    main()
