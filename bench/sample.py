"""Benchmark text-to-image sampling end to end, ours (SD_Model.generate) vs diffusers' StableDiffusionPipeline,
on the same random weights in one run: DDIM with CFG, batch 1; latency, UNet it/s and the ratio.

  CPU, small:  python bench/sample.py --config small --res 256 --steps 20
  GPU, full:   python bench/sample.py --config sd1 --res 512 --steps 50 --dtype fp16 --compile reduce-overhead
"""
import tempfile
from pathlib import Path

import torch

from common import append_results, device_name, time_interleaved  # noqa: I001 (sets sys.path)
import SD_Model as M
from sd_common import arg_parser, pick_device, pick_dtype
from tiny_models import save_tiny_clip, save_tiny_vae

# Full size is SD1's: CLIP-L text tower (768 wide, 12 layers) and the sd-vae-ft-mse architecture.
FULL = dict(clip=dict(hidden=768, layers=12, heads=12), vae=dict(channels=(128, 256, 512, 512), layers=2, groups=32))
SMALL = dict(clip=dict(hidden=32, layers=2, heads=2), vae=dict())


def build(args, device, dtype, workdir):
    """Random frozen parts saved locally, our Pipeline over them, and diffusers' pipeline sharing the weights."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    cfg = M.unet_config(args.config)
    sizes = FULL if args.config in ("sd1", "sd2") else SMALL
    clip = save_tiny_clip(workdir / "clip", **sizes["clip"])
    vae = save_tiny_vae(workdir / "vae", **sizes["vae"])
    torch.manual_seed(0)
    unet = M.UNet(cfg)
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.02)
    te = M.FrozenTextEncoder(clip, device, dtype)
    if te.context_dim != cfg.context_dim:
        raise SystemExit(f"config {args.config} wants context {cfg.context_dim}, the text encoder gives {te.context_dim}")
    ours = M.Pipeline(unet.to(device, dtype).eval(), te, M.FrozenVAE(vae, device, dtype), M.NoiseSchedule())
    theirs_unet = UNet2DConditionModel.from_config(M.diffusers_config(cfg, args.res // 8))
    theirs_unet.load_state_dict(unet.state_dict())
    theirs = StableDiffusionPipeline(
        vae=ours.vae.vae, text_encoder=te.model, tokenizer=te.tokenizer, unet=theirs_unet.to(device, dtype).eval(),
        scheduler=DDIMScheduler(**{k: v for k, v in M.diffusers_scheduler_config(ours.schedule)[1].items()
                                   if not k.startswith("_")}),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    if args.compile:
        ours.unet = torch.compile(ours.unet, mode=args.compile)
        theirs.unet = torch.compile(theirs.unet, mode=args.compile)
    return ours, theirs


def main(args):
    device = pick_device(args.device)
    dtype = pick_dtype(device, args.dtype)
    M.configure_cuda_backends()
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = build(args, device, dtype, Path(tmp))
        prompt = "a red circle on a gray background"
        fns = {
            "ours": lambda: M.generate(ours, [prompt], "", args.steps, args.cfg, seed=0, height=args.res, width=args.res),
            "diffusers": lambda: theirs(prompt, num_inference_steps=args.steps, guidance_scale=args.cfg,
                                        height=args.res, width=args.res, output_type="np",
                                        generator=torch.Generator("cpu").manual_seed(0)),
        }
        sec = time_interleaved(fns, args.repeats, args.warmup, device)
    rows = [[k, f"{sec[k]:.3f}", f"{args.steps / sec[k]:.2f}"] for k in fns]
    ratio = sec["diffusers"] / sec["ours"]
    rows.append(["diffusers / ours latency", f"{ratio:.3f}x", ""])
    settings = dict(config=args.config, res=args.res, steps=args.steps, cfg=args.cfg, batch=1, dtype=args.dtype,
                    compile=args.compile or "off", repeats=args.repeats)
    append_results(device, "Text-to-image sampling, DDIM + CFG (bench/sample.py)", settings,
                   ["impl", "s/image", "steps/s"], rows)
    print(f"{device_name(device)}: ours {sec['ours']:.3f} s, diffusers {sec['diffusers']:.3f} s, ratio {ratio:.3f}x")


if __name__ == "__main__":
    p = arg_parser(__doc__)
    p.add_argument("--config", default="small", choices=sorted(M.UNET_CONFIGS), help="named UNet config")
    p.add_argument("--res", type=int, default=256, help="image resolution")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--cfg", type=float, default=7.5, help="guidance scale")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="weights dtype")
    p.add_argument("--compile", default=None, help="torch.compile mode for both UNets, e.g. reduce-overhead (CUDA graphs)")
    p.add_argument("--repeats", type=int, default=3, help="timed images per implementation")
    p.add_argument("--warmup", type=int, default=1, help="untimed images per implementation")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, cuda:N, mps or cpu")
    main(p.parse_args())
