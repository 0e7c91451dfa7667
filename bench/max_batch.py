"""Largest batch per GPU whose whole training step fits in memory, with and without gradient checkpointing.

The step is the one bench/unet_step.py times (autocast forward, MSE, backward, grad clip, fused AdamW, EMA),
run twice per probe so the optimizer state is allocated. Batches are probed by doubling, then bisection,
catching CUDA out-of-memory; each result is then timed for img/s, so the table shows what checkpointing
costs in speed for what it buys in batch.

  GPU:  python bench/max_batch.py --config sd1 --resolution 512 --dtype bf16 --channels_last
"""
import gc
import time

import torch

from common import append_results, device_name, peak_flops, sync  # noqa: I001 (sets sys.path)
from unet_step import count_flops, make_batch, make_step
import SD_Model as M
from sd_common import UserError, arg_parser, pick_device, require_positive, run_main


def largest_fitting(fits, limit):
    """The largest b in [1, limit] with fits(b) (0 if none), for a fits() that holds up to some b and not after:
    doubling finds the bracket, bisection closes it, ~2 log2(b) probes."""
    lo, hi = 0, 1
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def free(model, device):
    for p in model.parameters():
        p.grad = None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)


def probe(model, cfg, args, device, batch, timed_steps=0):
    """(fits, seconds per step, peak GiB) of one batch size; out-of-memory is an answer, not an error."""
    try:
        step = make_step(model, True, args, device, make_batch(cfg, args, device, batch))
        for _ in range(2):
            step()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(timed_steps):
            step()
        sync(device)
        sec = (time.perf_counter() - t0) / max(timed_steps, 1)
        return True, sec, torch.cuda.max_memory_allocated(device) / 2**30
    except torch.cuda.OutOfMemoryError:
        return False, None, None
    finally:
        step = None
        free(model, device)


def main(args):
    require_positive(args, "resolution", "limit", "steps")
    device = pick_device(args.device)
    if device.type != "cuda":
        raise UserError("the largest batch is a GPU-memory figure; run this on a CUDA device")
    M.configure_cuda_backends()
    cfg = M.unet_config(args.config)
    model = M.UNet(cfg).initialize_weights().to(device).train()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    args.optimizer = True                            # make_step's flag: the whole step, optimizer and EMA included
    flops = count_flops(model, make_batch(cfg, args, device, 1))
    peak = peak_flops(device)
    rows = []
    for ckpt in (False, True):
        model.set_grad_checkpointing(ckpt)
        best = largest_fitting(lambda b: probe(model, cfg, args, device, b)[0], args.limit)
        if best == 0:
            rows.append([ckpt, 0, "", "", "", ""])
            continue
        _, sec, mem = probe(model, cfg, args, device, best, timed_steps=args.steps)
        ips = best / sec
        mfu = f"{flops * ips / peak:.1%}" if peak else "n/a"
        rows.append([ckpt, best, f"{mem:.1f}", f"{sec * 1e3:.0f}", f"{ips:.1f}", mfu])
        print(f"grad_checkpointing={ckpt}: largest batch {best}, {mem:.1f} GiB peak, {ips:.1f} img/s")
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    settings = dict(config=args.config, resolution=args.resolution, dtype=args.dtype, channels_last=args.channels_last,
                    compile=args.compile, optimizer_ema=True, gpu_GiB=f"{total:.0f}")
    append_results(device, "Largest batch per GPU, training step (bench/max_batch.py)", settings,
                   ["grad_checkpointing", "max batch", "peak GiB", "ms/step", "img/s", "MFU"], rows)
    print(device_name(device))


if __name__ == "__main__":
    p = arg_parser(__doc__)
    p.add_argument("--config", default="sd1", choices=sorted(M.UNET_CONFIGS), help="named UNet config")
    p.add_argument("--resolution", type=int, default=512, help="image resolution (latents are resolution/8)")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"], help="autocast dtype")
    p.add_argument("--channels_last", action="store_true", help="channels_last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (recompiles per batch size)")
    p.add_argument("--limit", type=int, default=1024, help="largest batch tried")
    p.add_argument("--steps", type=int, default=5, help="timed steps at the largest batch")
    p.add_argument("--device", default="cuda", help="a CUDA device")
    run_main(main, p.parse_args())
