"""Quick, portable sampling: picks CUDA, then Apple's MPS, then CPU, and draws one prompt with EMA weights."""
import argparse

import SD_Model as M
from SD_ImageGen import save_png
from sd_common import pick_device, pick_dtype, run_main


def main(args):
    M.configure_cuda_backends()
    device = pick_device(args.device)
    M.check_sampling_args(args.size, args.size, "ddim", args.steps)   # before loading anything
    pipe = M.load_pipeline(args.ckpt, device, pick_dtype(device, args.dtype))
    res = args.size or pipe.meta.get("resolution", 512)
    image = M.generate(pipe, [args.prompt], args.negative, args.steps, args.guidance_scale, "ddim", seed=args.seed,
                       height=res, width=res)[0]
    save_png(image, args.out, dict(prompt=args.prompt, negative=args.negative, seed=args.seed, steps=args.steps,
                                   guidance_scale=args.guidance_scale, checkpoint=args.ckpt, device=device.type))
    print(f"wrote {args.out} ({device.type})")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint or diffusers pipeline folder (see SD_ImageGen.py --help)")
    p.add_argument("--prompt", required=True, help="the prompt")
    p.add_argument("--negative", default="", help="negative prompt (the unconditional CFG branch)")
    p.add_argument("--steps", type=int, default=100, help="DDIM steps (the seed found 50 too few for faces)")
    p.add_argument("--guidance_scale", "--cfg", dest="guidance_scale", type=float, default=7.5,
                   help="guidance scale (7.5 scenes, 8.5 portraits in the seed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--size", type=int, default=None, help="square image size (default: the training resolution)")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, cuda:N, mps or cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: fp16 on a GPU, fp32 on CPU")
    p.add_argument("--out", default="outputs/inference.png", help="output PNG")
    run_main(main, p.parse_args())
