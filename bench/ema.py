"""Benchmark what the EMA costs a training step: SD_Train.py's step (UNet forward + backward, clip, AdamW) alone, then
with its EMA (SD_Train.EMA) updated in place every step, every N steps (--ema_every), and held in host memory
(--ema_device cpu: a pinned copy of the parameters per update, folded in by a worker thread while the next step
runs). Prints ms/step of each, the time spent inside the EMA's own calls per step (what it adds to the step's
critical path; the step-time difference to "no EMA" is that plus noise), and the accelerator memory the EMA takes:
4 bytes a parameter (measured on CUDA; on a CPU machine the EMA lives in the same memory either way: analytic).

Each variant runs a block of consecutive steps (its pending fold waited for at the block's end, so it pays for its
own), blocks alternating between variants so that a busy neighbour on a shared CPU hits all alike.

  CPU, the demo UNet:  python bench/ema.py --config demo --resolution 128 --batch_size 16 --every 10
  GPU, SD1:            python bench/ema.py --config sd1 --resolution 512 --batch_size 8 --dtype bf16 --every 10
"""
import statistics
import time

import torch
import torch.nn.functional as F

from common import append_results, random_batch, random_unet, sync, time_interleaved  # noqa: I001 (sets sys.path)
import SD_Model as M
import SD_Train
from sd_common import UserError, arg_parser, pick_device, pick_dtype, run_main


def ema_gb(n_params):
    """The fp32 EMA's size: 4 bytes a parameter."""
    return 4 * n_params / 1e9


def build(args, device):
    """The UNet of the config (bench/common.random_unet), its AdamW as SD_Train.py builds it, and one fixed batch."""
    cfg = M.unet_config(args.config)
    unet = random_unet(cfg).to(device).train()
    opt = SD_Train.build_optimizer(unet.parameters(), {"lr": 1e-5, "weight_decay": 1e-2})
    return unet, opt, random_batch(cfg, args.batch_size, args.resolution, device)


def make_block(unet, opt, batch, ema, args, device, ema_seconds):
    """args.block consecutive training steps, then the EMA's pending fold (ema None: no EMA at all). The block's time
    spent in the EMA's own calls, which is what it adds to the step's critical path, is appended to ema_seconds."""
    x, t, ctx, target = batch
    dtype = None if args.dtype == "fp32" else pick_dtype(device, args.dtype)
    params = list(unet.parameters())
    step = [0]

    def timed(fn, *a):
        sync(device)
        t0 = time.perf_counter()
        fn(*a)
        sync(device)
        ema_seconds[-1] += time.perf_counter() - t0

    def block():
        ema_seconds.append(0.0)
        for _ in range(args.block):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = F.mse_loss(unet(x, t, ctx).float(), target)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            if ema is not None:
                timed(ema.before_params_change)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                timed(ema.update, step[0])
            step[0] += 1
        if ema is not None:
            timed(ema.wait)

    return block


def main(args):
    if min(args.batch_size, args.resolution, args.every, args.block, args.rounds) < 1 or args.warmup < 0:
        raise UserError("--batch_size, --resolution, --every, --block and --rounds must be at least 1, --warmup 0 or "
                        "more")
    if args.block % args.every:
        raise UserError(f"--block {args.block} must be a multiple of --every {args.every} (whole EMA periods per "
                        "block)")
    device = pick_device(args.device)
    M.configure_cuda_backends()
    unet, opt, batch = build(args, device)
    params = [p.detach() for p in unet.parameters()]
    n_params = sum(p.numel() for p in params)
    variants = {"no EMA": None, "EMA every step (model)": ("model", 1),
                f"EMA every {args.every} steps (model)": ("model", args.every), "EMA every step (cpu)": ("cpu", 1),
                f"EMA every {args.every} steps (cpu)": ("cpu", args.every)}
    emas, accel_bytes = {}, {}
    for name, v in variants.items():
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        emas[name] = None if v is None else SD_Train.EMA(params, v[0], v[1], 0.9999)
        sync(device)
        on_accel = device.type != "cpu" and v is not None and v[0] == "model"
        accel_bytes[name] = (torch.cuda.memory_allocated(device) - before if device.type == "cuda" else
                             4 * n_params * on_accel)
    ema_sec = {k: [] for k in emas}
    blocks = {k: make_block(unet, opt, batch, e, args, device, ema_sec[k]) for k, e in emas.items()}
    sec = time_interleaved(blocks, args.rounds, args.warmup, device)

    base = sec["no EMA"] / args.block
    rows = []
    for name in variants:
        ms = sec[name] / args.block * 1e3
        over = ms - base * 1e3
        own = statistics.median(ema_sec[name][args.warmup:]) / args.block * 1e3 if emas[name] else 0.0
        rows.append([name, f"{ms:.2f}", "" if name == "no EMA" else f"{over:+.2f}",
                     "" if name == "no EMA" else f"{own:.3f}",
                     "" if name == "no EMA" else f"{100 * own / (base * 1e3):.2f}%",
                     f"{accel_bytes[name] / 1e9:.3f}" if device.type == "cuda" else "n/a (one memory)"])
    for e in emas.values():
        if e is not None:
            e.close()
    with torch.device("meta"):                      # counts only: no 860M-parameter allocation
        sizes = {c: M.count_params(M.UNet(M.unet_config(c))) for c in ("sd1", "sd2")}
    settings = dict(config=args.config, params=f"{n_params:,}", resolution=args.resolution,
                    batch_size=args.batch_size, dtype=args.dtype, steps_per_block=args.block, rounds=args.rounds,
                    fp32_ema_gb=f"{ema_gb(n_params):.3f}",
                    **{f"{c}_fp32_ema_gb_off_the_gpu_with_cpu": f"{ema_gb(n):.2f} ({n:,} params)"
                       for c, n in sizes.items()})
    append_results(device, "EMA cost per training step (bench/ema.py)", settings,
                   ["variant", "ms/step (median block)", "vs no EMA", "EMA calls ms/step", "EMA calls / step",
                    "EMA GB on the accelerator"], rows)


if __name__ == "__main__":
    p = arg_parser(__doc__)
    p.add_argument("--config", default="demo", choices=sorted(M.UNET_CONFIGS), help="named UNet config")
    p.add_argument("--resolution", type=int, default=128, help="image resolution (latents are resolution/8)")
    p.add_argument("--batch_size", type=int, default=16, help="batch size")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast dtype")
    p.add_argument("--every", type=int, default=10, help="N of the every-N-steps variants")
    p.add_argument("--block", type=int, default=20, help="consecutive steps per timed block (a multiple of --every)")
    p.add_argument("--rounds", type=int, default=5, help="timed blocks per variant (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed blocks per variant first")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, cuda:N, mps or cpu")
    run_main(main, p.parse_args())
