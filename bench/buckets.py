"""Benchmark aspect-ratio buckets: the share of each image's area the crop keeps (buckets vs SD's centre square),
training img/s with buckets vs squares, and what torch.compile costs per bucket (a static graph each, SD_Train.py's
choice, vs automatic dynamic shapes).

The crop figures need an aspect-ratio distribution: `--meta DIR` reads the width/height columns of LAION parquet
(01's or 02's output), the real thing; without it, ASSUMED_MIX below, a web-photo mix that is an assumption, not a
measurement (no LAION metadata is reachable offline here), so the per-aspect rows are the figures to trust.

  python bench/buckets.py crop                              # the assumed mix, buckets of 512
  python bench/buckets.py crop --meta data/laion_filtered   # your data's own aspects
  python bench/buckets.py speed --config small --resolution 256    # img/s: each bucket, the mix, the square
  python bench/buckets.py compile --config small --resolution 256  # CPU: compile seconds per bucket
"""
import time

import numpy as np
import torch
import torch.nn.functional as F

from common import append_results, time_interleaved  # noqa: I001 (sets sys.path)
import SD_Model as M
import sd_data
from sd_common import arg_parser, pick_device, require_positive, run_main

# (width : height, share): common photo, screen and print ratios, landscape-heavy as web images are. An assumption.
ASSUMED_MIX = [((1, 1), 0.22), ((4, 3), 0.18), ((3, 2), 0.20), ((16, 9), 0.10), ((2, 1), 0.03), ((5, 4), 0.04),
               ((3, 4), 0.07), ((2, 3), 0.12), ((9, 16), 0.03), ((1, 2), 0.01)]
NAMED = [(1, 1), (5, 4), (4, 3), (3, 2), (16, 9), (2, 1), (21, 9), (3, 1), (4, 5), (3, 4), (2, 3), (9, 16), (1, 2)]


def aspects(args):
    """(n,) width / height of the images: the --meta parquet's, or n draws of ASSUMED_MIX with a little jitter
    (log-normal, sigma 2%), as real sizes are rarely the exact ratio."""
    if args.meta:
        import pyarrow.parquet as pq
        files = sd_data.list_files(args.meta, [".parquet"], "metadata")
        tables = [sd_data.normalize_laion_columns(pq.read_table(f)) for f in files]
        w = np.concatenate([t.column("width").to_numpy(zero_copy_only=False) for t in tables]).astype(np.float64)
        h = np.concatenate([t.column("height").to_numpy(zero_copy_only=False) for t in tables]).astype(np.float64)
        ok = (w > 0) & (h > 0)
        return w[ok] / h[ok]
    rng = np.random.default_rng(0)
    ratios = np.array([a / b for (a, b), _ in ASSUMED_MIX])
    pick = rng.choice(len(ratios), args.images, p=[p for _, p in ASSUMED_MIX])
    return ratios[pick] * np.exp(rng.normal(0, 0.02, args.images))


def crop(args):
    buckets = sd_data.aspect_buckets(args.resolution, args.multiple)

    def kept(r):
        b = buckets[sd_data.nearest_bucket(r, 1.0, buckets)]
        return sd_data.area_kept(r, 1.0, *b), sd_data.area_kept(r, 1.0, 1, 1), b
    rows = []
    for a, b in NAMED:
        bucketed, square, size = kept(a / b)
        rows.append([f"{a}:{b}", f"{size[0]}x{size[1]}", f"{bucketed:.1%}", f"{square:.1%}"])
    r = aspects(args)
    both = np.array([kept(x)[:2] for x in r])
    rows.append([f"mix of {len(r):,} images ({'--meta ' + args.meta if args.meta else 'ASSUMED_MIX'})", "",
                 f"{both[:, 0].mean():.1%}", f"{both[:, 1].mean():.1%}"])
    rows.append(["  images losing > 10% of their area", "", f"{(both[:, 0] < 0.9).mean():.1%}",
                 f"{(both[:, 1] < 0.9).mean():.1%}"])
    append_results(torch.device("cpu"), "Aspect buckets: image area kept (bench/buckets.py crop)",
                   dict(resolution=args.resolution, multiple=args.multiple, buckets=len(buckets)),
                   ["aspect (w:h)", "bucket", "area kept, buckets", "area kept, centre square"], rows)


def unet_and_batches(args, device, sizes):
    """The named UNet (its from-scratch init) and one random (latents, t, context) batch per (width, height)."""
    cfg = M.unet_config(args.config)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, cfg.in_channels, h // 8, w // 8, generator=g).to(device),
                torch.randint(0, 1000, (args.batch_size,), generator=g).to(device),
                torch.randn(args.batch_size, 77, cfg.context_dim, generator=g).to(device)) for w, h in sizes]
    torch.manual_seed(0)
    return M.UNet(cfg).initialize_weights().to(device).train(), batches


def train_step(model, batch):
    """Forward + backward of the UNet on one batch (the gradients are dropped)."""
    x, t, ctx = batch
    F.mse_loss(model(x, t, ctx), x).backward()
    for p in model.parameters():
        p.grad = None


def speed(args):
    """img/s of the eager training step per bucket and at the square base, timed call by call in turn (a busy
    neighbour hits all alike); the bucketed figure weighs the buckets as the mix of `aspects` fills them."""
    device = pick_device(args.device)
    buckets = sd_data.aspect_buckets(args.resolution, 64)
    unet, batches = unet_and_batches(args, device, buckets + [(args.resolution, args.resolution)])
    sec = time_interleaved({i: (lambda b=b: train_step(unet, b)) for i, b in enumerate(batches)}, args.steps, 1,
                           device)
    share = np.bincount([sd_data.nearest_bucket(r, 1.0, buckets) for r in aspects(args)], minlength=len(buckets))
    share = share / share.sum()
    mix = args.batch_size / float(np.dot(share, [sec[i] for i in range(len(buckets))]))
    square = args.batch_size / sec[len(buckets)]
    rows = [[f"{w}x{h}", f"{share[i]:.1%}", f"{args.batch_size / sec[i]:.2f}"] for i, (w, h) in enumerate(buckets)]
    rows += [["bucketed, the mix", "100%", f"{mix:.2f}"],
             [f"square {args.resolution}x{args.resolution}", "", f"{square:.2f}"],
             ["bucketed / square", "", f"{mix / square:.3f}x"]]
    append_results(device, "Aspect buckets: training img/s (bench/buckets.py speed)",
                   dict(config=args.config, resolution=args.resolution, batch_size=args.batch_size, steps=args.steps,
                        mix="--meta " + args.meta if args.meta else "ASSUMED_MIX"),
                   ["bucket", "share of the mix", "img/s (fwd+bwd)"], rows)


def compile_cost(args):
    """Per bucket: an eager training step, then the first compiled one (compile + run) and a compiled one after,
    for static graphs (dynamic=False, one compile per bucket) and automatic dynamic shapes (dynamic=None: torch
    recompiles once with symbolic sizes after the second shape)."""
    from torch._dynamo import config as dynamo
    device = pick_device(args.device)
    buckets = sd_data.aspect_buckets(args.resolution, 64)
    dynamo.recompile_limit = max(dynamo.recompile_limit, 2 * len(buckets))      # as SD_Train.py sets it

    def step(model, batch):
        t0 = time.perf_counter()
        train_step(model, batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    def timed(dynamic):
        """(first-step seconds, best later step seconds) per bucket, or the error that stopped the compiler."""
        torch._dynamo.reset()
        unet, batches = unet_and_batches(args, device, buckets)
        model = unet if dynamic == "eager" else torch.compile(unet, dynamic=dynamic)
        try:
            first = [step(model, b) for b in batches]
            return first, [min(step(model, b) for _ in range(args.steps)) for b in batches]
        except Exception as e:   # noqa: BLE001 - a compiler failure is a result here, reported in the table
            return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"

    runs = {mode: timed(mode) for mode in ("eager", False, None)}

    def cells(mode, i):
        if isinstance(runs[mode], str):
            return [runs[mode] if i == 0 else "", ""]
        return [f"{runs[mode][0][i]:.1f}", f"{runs[mode][1][i] * 1e3:.0f}"]
    rows = [[f"{w}x{h}", f"{runs['eager'][1][i] * 1e3:.0f}", *cells(False, i), *cells(None, i)]
            for i, (w, h) in enumerate(buckets)]
    total = {m: "-" if isinstance(runs[m], str) else f"{sum(runs[m][0]):.1f}" for m in (False, None)}
    rows.append(["all buckets", "", total[False], "", total[None], ""])
    append_results(device, "Aspect buckets: torch.compile per bucket (bench/buckets.py compile)",
                   dict(config=args.config, resolution=args.resolution, batch_size=args.batch_size, steps=args.steps),
                   ["bucket", "eager ms/step", "static: 1st step s", "static ms/step", "auto-dynamic: 1st step s",
                    "auto-dynamic ms/step"], rows)


def main(args):
    args.resolution = args.resolution or (512 if args.what == "crop" else 256)
    require_positive(args, "resolution", "multiple", "images", "batch_size", "steps")
    {"crop": crop, "speed": speed, "compile": compile_cost}[args.what](args)


if __name__ == "__main__":
    p = arg_parser(__doc__)
    p.add_argument("what", choices=["crop", "speed", "compile"],
                   help="the crop's area figures, training img/s, or the compile cost per bucket")
    p.add_argument("--resolution", type=int, default=None, help="base resolution of the buckets (crop: 512, else 256)")
    p.add_argument("--multiple", type=int, default=64, help="crop: bucket sides are multiples of this (64: SD's VAE)")
    p.add_argument("--meta", default=None, help="crop, speed: LAION parquet folder whose width/height give the aspects")
    p.add_argument("--images", type=int, default=100_000, help="crop, speed: draws from ASSUMED_MIX without --meta")
    p.add_argument("--config", default="small", choices=sorted(M.UNET_CONFIGS), help="speed, compile: UNet config")
    p.add_argument("--batch_size", type=int, default=2, help="speed, compile: batch size")
    p.add_argument("--steps", type=int, default=3,
                   help="speed: timed steps per size (the median is kept); compile: steps per bucket after the "
                        "first (the best is kept)")
    p.add_argument("--device", default="cpu", help="speed, compile: cpu, cuda, ...")
    run_main(main, p.parse_args())
