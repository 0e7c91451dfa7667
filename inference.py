"""Quick, portable sampling: picks CUDA, then Apple's MPS, then CPU, and draws one prompt with EMA weights (DDIM, or
flow Euler for a rectified-flow checkpoint)."""
from pathlib import Path

import SD_Model as M
from SD_ImageGen import add_sampling_flags, save_png
from sd_common import arg_parser, check_writable, pick_device, pick_dtype, run_main


def main(args):
    M.configure_cuda_backends()
    device = pick_device(args.device)
    M.check_sampling_args(args.resolution, args.resolution, args.sampler, args.steps, eta=args.eta)   # before loading anything
    check_writable(Path(args.out).parent, "--out")
    pipe = M.load_pipeline(args.ckpt, device, pick_dtype(device, args.dtype))
    res = args.resolution or pipe.meta.get("resolution", 512)
    image = M.generate(pipe, [args.prompt], args.negative, args.steps, args.guidance_scale, args.sampler, args.eta,
                       seed=args.seed, height=res, width=res, progress=True)[0]
    save_png(image, args.out, dict(prompt=args.prompt, negative=args.negative, seed=args.seed, steps=args.steps,
                                   guidance_scale=args.guidance_scale, sampler=args.sampler, eta=args.eta,
                                   checkpoint=args.ckpt, device=device.type))
    print(f"wrote {args.out} ({device.type})")


if __name__ == "__main__":
    p = arg_parser(__doc__)
    add_sampling_flags(p)
    p.add_argument("--prompt", required=True, help="the prompt")
    p.add_argument("--resolution", type=int, default=None, help="square image side (default: the training resolution)")
    p.add_argument("--out", default="outputs/inference.png", help="output PNG")
    run_main(main, p.parse_args())
