"""Benchmark text-to-image sampling end to end, ours (SD_Model.generate on a load_pipeline, as SD_ImageGen.py runs
it) vs diffusers' StableDiffusionPipeline, on the same random weights in one run: DDIM with CFG; latency, img/s,
UNet steps/s, the first call's time (torch.compile and cuDNN autotuning), and the VAE decode's share of it all.

  CPU, small:  python bench/sample.py --config small --resolution 256 --steps 20
  GPU, full:   python bench/sample.py --config sd1 --resolution 512 --steps 50 --dtype fp16 --batch_size 8
  CUDA graphs: python bench/sample.py --config sd1 --resolution 512 --steps 50 --dtype fp16 --compile reduce-overhead \
                 --impl ours
"""
import tempfile
import time
from pathlib import Path

import torch

from common import append_results, device_name, sync, time_interleaved  # noqa: I001 (sets sys.path)
import SD_Model as M
from sd_common import UserError, arg_parser, pick_device, pick_dtype, require_positive, run_main
from tiny_models import save_tiny_clip, save_tiny_vae

# Full size is SD1's: CLIP-L text tower (768 wide, 12 layers) and the sd-vae-ft-mse architecture.
FULL = dict(clip=dict(hidden=768, layers=12, heads=12, mlp_ratio=4),
            vae=dict(channels=(128, 256, 512, 512), layers=2, groups=32))
SMALL = dict(clip=dict(hidden=32, layers=2, heads=2), vae=dict())
PROMPT = "a red circle on a gray background"


def save_random_parts(args, workdir):
    """A random UNet saved as our slim checkpoint naming a random text encoder and VAE saved beside it: what
    SD_ImageGen.py --ckpt reads. Returns (checkpoint, UNet state dict, text encoder folder, VAE folder)."""
    cfg = M.unet_config(args.config)
    sizes = FULL if args.config in ("sd1", "sd2") else SMALL
    clip = save_tiny_clip(workdir / "clip", **sizes["clip"])
    vae = save_tiny_vae(workdir / "vae", **sizes["vae"])
    torch.manual_seed(0)
    unet = M.UNet(cfg)
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.02)
    meta = M.checkpoint_meta(cfg, M.NoiseSchedule(), str(vae), 0.18215, str(clip), "last", args.resolution)
    M.save_unet(unet.state_dict(), cfg, workdir / "unet.safetensors", "ours", meta)
    return workdir / "unet.safetensors", unet.state_dict(), clip, vae


def build_diffusers(args, ours, unet_sd, clip, vae, device, dtype):
    """diffusers' pipeline from its own copies of the same parts, as a diffusers user holds them."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel
    unet = UNet2DConditionModel.from_config(M.diffusers_config(ours.unet.config, args.resolution // 8))
    unet.load_state_dict(unet_sd)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(vae), text_encoder=CLIPTextModel.from_pretrained(clip),
        tokenizer=ours.text_encoder.tokenizer, unet=unet,
        scheduler=DDIMScheduler(**{k: v for k, v in M.diffusers_scheduler_config(ours.schedule)[1].items()
                                   if not k.startswith("_")}),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_args(args):
    require_positive(args, "resolution", "steps", "repeats", "batch_size")
    if args.resolution % 8:
        raise UserError(f"--resolution must be a multiple of 8 (the VAE's downsampling), got {args.resolution}")


def main(args):
    check_args(args)
    device = pick_device(args.device)
    dtype = pick_dtype(device, args.dtype)
    M.configure_cuda_backends()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, unet_sd, clip, vae = save_random_parts(args, Path(tmp))
        ours = M.load_pipeline(ckpt, device, dtype)
        theirs = build_diffusers(args, ours, unet_sd, clip, vae, device, dtype) if args.impl == "both" else None
    if args.compile:
        ours.unet = torch.compile(ours.unet, mode=args.compile)
        if theirs is not None:
            theirs.unet = torch.compile(theirs.unet, mode=args.compile)

    for n in args.batch_size:
        measure(args, ours, theirs, n, device, dtype)


def measure(args, ours, theirs, n, device, dtype):
    """One table: both pipelines drawing batches of n images, and their VAE decodes of n latents."""
    fns = {"ours": lambda: M.generate(ours, [PROMPT] * n, "", args.steps, args.guidance_scale, seed=0,
                                      height=args.resolution, width=args.resolution)}
    if theirs is not None:
        fns["diffusers"] = lambda: theirs([PROMPT] * n, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                                          height=args.resolution, width=args.resolution, output_type="np",
                                          generator=torch.Generator("cpu").manual_seed(0))
    first = {}
    for k, fn in fns.items():                        # the first call compiles (CUDA graphs) and autotunes cuDNN
        t0 = time.perf_counter()
        fn()
        sync(device)
        first[k] = time.perf_counter() - t0
    sec = time_interleaved(fns, args.repeats, max(0, args.warmup - 1), device)

    # The VAE decode alone, as each pipeline calls it after the last step (ours: channels_last on CUDA).
    latents = torch.randn(n, 4, args.resolution // 8, args.resolution // 8, device=device)
    decode = {"ours": lambda: ours.vae.decode(latents)}
    if theirs is not None:
        decode["diffusers"] = lambda: theirs.vae.decode(latents.to(dtype) / theirs.vae.config.scaling_factor)
    with torch.no_grad():
        dec = time_interleaved(decode, args.repeats, 1, device)

    rows = [[k, f"{sec[k]:.3f}", f"{n / sec[k]:.2f}", f"{args.steps / sec[k]:.2f}", f"{first[k]:.1f}",
             f"{dec[k]:.3f}", f"{dec[k] / sec[k]:.1%}"] for k in fns]
    if theirs is not None:
        rows.append(["diffusers / ours latency", f"{sec['diffusers'] / sec['ours']:.3f}x", "", "", "",
                     f"{dec['diffusers'] / dec['ours']:.3f}x", ""])
    settings = dict(config=args.config, resolution=args.resolution, steps=args.steps,
                    guidance_scale=args.guidance_scale, batch_size=n, dtype=args.dtype,
                    compile=args.compile or "off", repeats=args.repeats)
    append_results(device, "Text-to-image sampling, DDIM + CFG (bench/sample.py)", settings,
                   ["impl", "s/batch", "img/s", "steps/s", "first call s", "VAE decode s", "decode share"], rows)
    print(f"{device_name(device)}: " + ", ".join(f"{k} {sec[k]:.3f} s per batch of {n}" for k in fns))


if __name__ == "__main__":
    p = arg_parser(__doc__)
    p.add_argument("--config", default="small", choices=["sd1", "small"],
                   help="named UNet config (with a text encoder and VAE of its size: CLIP-L and SD's VAE for sd1)")
    p.add_argument("--resolution", type=int, default=256, help="image resolution")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--guidance_scale", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--batch_size", type=int, nargs="+", default=[1], help="images per call (one prompt repeated); "
                   "several sizes: one table each, the models built once")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="weights dtype")
    p.add_argument("--compile", default=None, choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile mode for the UNets; reduce-overhead replays CUDA graphs")
    p.add_argument("--impl", default="both", choices=["both", "ours"], help="time ours and diffusers', or ours alone")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per implementation")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per implementation (the first is reported)")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, cuda:N, mps or cpu")
    run_main(main, p.parse_args())
