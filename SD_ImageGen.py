"""Sample images from a trained checkpoint, or export it as a diffusers folder or an original-layout single file.

EMA weights by default; DDIM, DDPM, Euler, Euler ancestral or DPM-Solver++(2M) (Karras sigmas or not); CFG with a
real negative prompt."""
import math
from pathlib import Path

import torch

import SD_Model as M
from sd_common import arg_parser, check_writable, pick_device, pick_dtype, run_main


def save_png(image, path, info):
    """One uint8 (H, W, 3) image as PNG, with the generation settings in its text chunks."""
    from PIL import Image, PngImagePlugin
    meta = PngImagePlugin.PngInfo()
    for k, v in info.items():
        meta.add_text(k, str(v))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="PNG", pnginfo=meta)   # PNG whatever the name (temp names too)


EXPORT_FORMATS = ("diffusers", "single-file")


def read_prompts(args):
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise M.UserError(f"prompt file '{path}' does not exist")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        prompts = [args.prompt] if args.prompt is not None else []
    if not prompts:
        raise M.UserError("no prompt: pass --prompt TEXT or --prompts FILE (one prompt per line)")
    return prompts


def run(args, device):
    """Load, sample, write; returns the written paths."""
    dtype = pick_dtype(device, args.dtype)
    if args.export and args.export[0] not in EXPORT_FORMATS:
        raise M.UserError(f"--export {args.export[0]}: unknown format; choose one of {list(EXPORT_FORMATS)}")
    if args.sampler is not None:                     # None: the checkpoint's own (M.default_sampler)
        M.check_sampler(args.sampler, args.eta)
    where = Path(args.export[1]) if args.export else Path(args.out)
    check_writable(where if args.export and args.export[0] == "diffusers" else where.parent,
                   "--export" if args.export else "--out")                     # before minutes of loading
    if args.export:
        # Export keeps full precision for loading, then casts the weights it writes.
        pipe = M.load_pipeline(args.ckpt, "cpu", torch.float32, args.weights, args.vae, args.text_encoder)
        fmt, dst = args.export
        res = args.height or pipe.meta.get("resolution", 512)
        sampler = args.sampler or M.default_sampler(pipe.schedule)
        M.export_pipeline(dst, fmt, pipe.unet.state_dict(), pipe.unet.config, pipe.vae, pipe.text_encoder,
                          pipe.schedule, sample_size=res // pipe.vae.factor,
                          dtype=pick_dtype(device, args.export_dtype), sampler=sampler)
        print(f"exported {args.weights} weights of {args.ckpt} as {fmt} to {dst}" +
              (f" (scheduler: {sampler})" if fmt == "diffusers" else ""))
        return [Path(dst)]

    prompts = read_prompts(args)
    # fail before loading anything (the VAE's factor is checked again once it is loaded)
    M.check_sampling_args(args.height, args.width, args.sampler, args.steps, None, args.n, args.eta)
    pipe = M.load_pipeline(args.ckpt, device, dtype, args.weights, args.vae, args.text_encoder)
    if args.compile:
        pipe.unet = torch.compile(pipe.unet, mode=args.compile)    # attribute access passes through to the UNet
    res = pipe.meta.get("resolution", 512)
    height, width = args.height or res, args.width or res
    sampler = args.sampler or M.default_sampler(pipe.schedule)
    images = M.generate(pipe, prompts, args.negative, args.steps, args.guidance_scale, sampler, args.eta,
                        args.seed, height, width, args.n, progress=True)
    info = dict(prompt=" | ".join(prompts), negative=args.negative, seed=args.seed, steps=args.steps,
                guidance_scale=args.guidance_scale,
                sampler=sampler, eta=args.eta, weights=args.weights, checkpoint=args.ckpt, size=f"{width}x{height}")
    out = Path(args.out)
    if args.grid or len(images) == 1:
        image = M.make_grid(images, args.n if len(prompts) > 1 else math.ceil(math.sqrt(len(images)))) \
            if len(images) > 1 else images[0]
        save_png(image, out, info)
        paths = [out]
    else:
        paths = []
        for i, image in enumerate(images):
            p = out.with_name(f"{out.stem}_{i:03d}{out.suffix}")
            save_png(image, p, dict(info, prompt=prompts[i // args.n], index=i))
            paths.append(p)
    print("wrote " + ", ".join(str(p) for p in paths))
    return paths


def main(args, run_fn=run):
    """The command line of this script and of evaluate.py: pick the device, then run."""
    M.configure_cuda_backends()
    return run_fn(args, pick_device(args.device))


def add_sampler_flags(p):
    """--sampler and --eta: this script, inference.py and evaluate.py."""
    p.add_argument("--sampler", default=None,
                   help=f"one of {', '.join(M.SAMPLERS)}: DDIM, DDPM, Euler, Euler ancestral, DPM-Solver++(2M) and "
                        "the same on Karras sigmas, each equal to its diffusers scheduler, and flow Euler / Heun for "
                        "rectified-flow models; --export diffusers writes that scheduler (default: ddim, or "
                        "flow_euler for a flow checkpoint)")
    p.add_argument("--eta", type=float, default=None,
                   help="the noise each step adds, per sampler: ddim 0 (its default, deterministic) to 1 (DDPM's "
                        "variance); ddpm 1 (its default) to 0 (the posterior mean alone); euler 0 (its default), "
                        "> 0 adds ancestral noise; euler_a 1 (its default); dpmpp_2m* add none and refuse --eta")


def add_sampling_flags(p):
    """The flags every sampling front end shares (this script, inference.py)."""
    p.add_argument("--ckpt", required=True,
                   help="our checkpoint (.pt/.safetensors), a diffusers UNet or pipeline folder, or an original single file")
    p.add_argument("--negative", default="", help="negative prompt: replaces the empty prompt in the CFG branch")
    p.add_argument("--steps", type=int, default=100, help="sampling steps (the seed found 50 too few for faces)")
    p.add_argument("--guidance_scale", type=float, default=7.5,
                   help="classifier-free guidance scale (1 = off; the seed: 7.5 scenes, 8.5 portraits)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (diffusers' convention)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: fp16 on a GPU, fp32 on CPU")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, cuda:N, mps or cpu")
    add_sampler_flags(p)


def build_parser():
    p = arg_parser(__doc__)
    add_sampling_flags(p)
    p.add_argument("--prompt", default=None, help="the prompt")
    p.add_argument("--prompts", default=None, help="a file with one prompt per line (instead of --prompt)")
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument("--height", type=int, default=None,
                   help="image height, a multiple of the VAE's downsampling (8 for SD's); any aspect, e.g. a bucket "
                        "the model trained on (default: the training resolution)")
    p.add_argument("--width", type=int, default=None,
                   help="image width, a multiple of the VAE's downsampling (default: the training resolution)")
    p.add_argument("--weights", default="ema", choices=["ema", "live"], help="which weights of a training checkpoint")
    p.add_argument("--vae", default=None, help="VAE hub id or folder (default: the one the checkpoint names)")
    p.add_argument("--text_encoder", default=None, help="text encoder + tokenizer hub id or folder (default: the checkpoint's)")
    p.add_argument("--compile", default=None, choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile the UNet; reduce-overhead replays CUDA graphs (batch-1 sampling on a GPU is "
                        "launch-bound). Compiling takes a minute or more: worth it for many images")
    p.add_argument("--out", default="outputs/sample.png", help="output PNG (several images get _000, _001, ...)")
    p.add_argument("--grid", action="store_true", help="write all images as one contact sheet (a row per prompt)")
    p.add_argument("--export", nargs=2, metavar=("FORMAT", "DST"), default=None,
                   help="instead of sampling, export: 'diffusers DIR' or 'single-file FILE.safetensors'")
    p.add_argument("--export_dtype", default="fp16", choices=["fp32", "fp16", "bf16"], help="dtype of exported weights")
    return p


if __name__ == "__main__":
    run_main(main, build_parser().parse_args())
