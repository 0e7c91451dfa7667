"""Steps against quality for every sampler on the `make demo` model: prompt-following score and images/s.

For each sampler and step count, evaluate.py's --shapes score (color and shape accuracy over every color x shape
prompt x --shapes_seeds seeds, the same seeds and batches) and images/s; then the fewest steps of each sampler that
reach the reference's (DDIM, 100 steps) score and the images/s that buys. Two tables appended to
bench/results/<device>.md.

  python bench/sampler_steps.py --ckpt data/demo/run/ema_final.safetensors --device cpu     # after `make demo`
  (a copied model: add --vae DIR --text_encoder DIR, the folders it was trained with)
"""
import tempfile
import time
from pathlib import Path

from common import append_results, sync  # noqa: I001 (sets sys.path)
import SD_Model as M
import evaluate as E
from sd_common import UserError, arg_parser, pick_device, pick_dtype, run_main


def parse_reference(text):
    sampler, _, steps = text.partition(":")
    if not steps.isdigit():
        raise UserError(f"--reference takes SAMPLER:STEPS, e.g. ddim:100; got '{text}'")
    return sampler, int(steps)


def score(pipe, prompts, args, sampler, steps, folder):
    """(color, shape, images/s) of one sampler at one step count, as `evaluate.py --shapes` scores it."""
    eval_args = E.build_parser().parse_args([
        "--ckpt", args.ckpt, "--shapes", "--shapes_seeds", str(args.shapes_seeds), "--steps", str(steps),
        "--sampler", sampler, "--seed", str(args.seed), "--batch_size", str(args.batch_size)])
    resolution = pipe.meta.get("resolution", 512)
    sync(pipe.vae.device)
    t0 = time.perf_counter()
    color, shape = E.shapes_prompt_following(eval_args, pipe, prompts, args.guidance_scale, resolution, resolution,
                                             folder)
    sync(pipe.vae.device)
    return color, shape, len(prompts) / (time.perf_counter() - t0)


def main(args):
    reference = parse_reference(args.reference)
    for sampler in args.samplers + [reference[0]]:
        M.check_sampler(sampler)
    if min(args.steps + [reference[1], args.shapes_seeds, args.batch_size]) < 1:
        raise UserError("--steps, --reference steps, --shapes_seeds and --batch_size must be at least 1")
    device = pick_device(args.device)
    M.configure_cuda_backends()
    from demo import shapes
    prompts = [p for p in shapes.prompt_grid() for _ in range(args.shapes_seeds)]     # as evaluate.py --shapes
    pipe = M.load_pipeline(args.ckpt, device, pick_dtype(device, args.dtype), "ema", args.vae, args.text_encoder)
    grid = [(s, n) for s in args.samplers for n in sorted(set(args.steps))]
    if reference not in grid:
        grid.append(reference)
    with tempfile.TemporaryDirectory() as tmp:
        score(pipe, prompts, args, reference[0], 2, Path(tmp) / "warmup")    # untimed: first calls allocate and warm up
        results = {}
        for sampler, steps in grid:
            results[sampler, steps] = score(pipe, prompts, args, sampler, steps, Path(tmp) / f"{sampler}_{steps}")
            print(f"{sampler} {steps}: color {results[sampler, steps][0]:.2f} shape {results[sampler, steps][1]:.2f} "
                  f"{results[sampler, steps][2]:.2f} images/s", flush=True)

    ref_color, ref_shape, ref_speed = results[reference]
    reaches = {k: v[0] >= ref_color and v[1] >= ref_shape for k, v in results.items()}
    settings = dict(ckpt=args.ckpt, guidance_scale=args.guidance_scale, shapes_seeds=args.shapes_seeds,
                    images=len(prompts),
                    seed=args.seed, batch_size=args.batch_size, dtype=args.dtype or "default")
    name = f"{reference[0]}-{reference[1]}"
    append_results(device, "Sampler steps vs prompt-following (bench/sampler_steps.py)", settings,
                   ["sampler", "steps", "color", "shape", "images/s", f"reaches {name}"],
                   [[s, n, f"{c:.2f}", f"{sh:.2f}", f"{v:.2f}", "yes" if reaches[s, n] else ""]
                    for (s, n), (c, sh, v) in results.items()])
    rows = []
    for sampler in dict.fromkeys(args.samplers):
        enough = [n for (s, n) in results if s == sampler and reaches[s, n]]
        if enough:
            c, sh, v = results[sampler, min(enough)]
            rows.append([sampler, min(enough), f"{c:.2f}", f"{sh:.2f}", f"{v:.2f}", f"{v / ref_speed:.2f}x"])
        else:
            rows.append([sampler, f"not within {max(args.steps)}", "", "", "", ""])
    append_results(device, f"Fewest steps reaching {name}'s prompt-following (color {ref_color:.2f}, shape "
                           f"{ref_shape:.2f}; bench/sampler_steps.py)", settings,
                   ["sampler", "steps", "color", "shape", "images/s", f"images/s vs {name}"], rows)


if __name__ == "__main__":
    p = arg_parser(__doc__)
    p.add_argument("--ckpt", required=True, help="the demo model's ema_final.safetensors (or any --shapes checkpoint)")
    p.add_argument("--vae", default=None, help="VAE folder (default: the one the checkpoint names)")
    p.add_argument("--text_encoder", default=None, help="text encoder folder (default: the checkpoint's)")
    p.add_argument("--samplers", nargs="+", default=list(M.SAMPLERS), help="samplers to measure")
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 15, 20, 25, 30, 50], help="step counts")
    p.add_argument("--reference", default="ddim:100", help="SAMPLER:STEPS whose score the others must reach")
    p.add_argument("--guidance_scale", type=float, default=5.0, help="CFG scale (the demo's score uses 5)")
    p.add_argument("--shapes_seeds", type=int, default=4, help="seeds per color x shape prompt (`make demo`: 4)")
    p.add_argument("--seed", type=int, default=0, help="evaluate.py's --seed (the demo's default)")
    p.add_argument("--batch_size", type=int, default=16, help="images per sampling batch (evaluate.py's default)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                   help="default: fp16 on a GPU, fp32 on CPU")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, cuda:N, mps or cpu")
    run_main(main, p.parse_args())
