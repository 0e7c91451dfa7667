"""Quick, portable sampling: picks CUDA, then Apple's MPS, then CPU, and draws one prompt with EMA weights."""
import argparse
import sys

import torch

import SD_Model as M
from SD_ImageGen import save_png


def get_device():
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def main(args):
    M.configure_cuda_backends()
    device = get_device()
    dtype = torch.float16 if device.type in ("cuda", "mps") else torch.float32
    try:
        pipe = M.load_pipeline(args.ckpt, device, dtype)
        res = args.size or pipe.meta.get("resolution", 512)
        image = M.generate(pipe, [args.prompt], args.negative, args.steps, args.cfg, "ddim", seed=args.seed,
                           height=res, width=res)[0]
    except M.UserError as e:
        sys.exit(f"error: {e}")
    save_png(image, args.out, dict(prompt=args.prompt, negative=args.negative, seed=args.seed, steps=args.steps,
                                   cfg=args.cfg, checkpoint=args.ckpt, device=device.type))
    print(f"wrote {args.out} ({device.type})")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint or diffusers pipeline folder (see SD_ImageGen.py --help)")
    p.add_argument("--prompt", required=True, help="the prompt")
    p.add_argument("--negative", default="", help="negative prompt (the unconditional CFG branch)")
    p.add_argument("--steps", type=int, default=100, help="DDIM steps")
    p.add_argument("--cfg", type=float, default=7.5, help="guidance scale (7.5 scenes, 8.5 portraits in the seed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--size", type=int, default=None, help="square image size (default: the training resolution)")
    p.add_argument("--out", default="outputs/inference.png", help="output PNG")
    main(p.parse_args())
