"""Where the time goes: torch.profiler's top kernels (GPU time on CUDA, CPU time of the ops elsewhere) of a training
step as bench/unet_step.py times it, or of one text-to-image sampling run as bench/sample.py runs it, each kernel
with its share and a kind (conv, GEMM, attention, norm, ...); and which SDPA kernel serves each of SD1's head
widths (40, 80, 160), forward and backward.

  python bench/kernel_profile.py --what train --config sd1 --resolution 512 --batch_size 16 --dtype bf16 --channels_last
  python bench/kernel_profile.py --what sample --config sd1 --resolution 512 --steps 50 --dtype fp16
  python bench/kernel_profile.py --what sdpa
"""
import re
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from common import append_results, sync  # noqa: I001 (sets sys.path)
import SD_Model as M
from sd_common import UserError, arg_parser, pick_device, pick_dtype, require_positive, run_main

# Kernel kinds by name, first match wins (cuDNN/CUTLASS convolutions are "fprop/dgrad/wgrad" implicit GEMMs).
KINDS = [("attention", r"flash|fmha|attention|sdpa"), ("conv", r"conv|fprop|dgrad|wgrad|implicit_gemm"),
         ("gemm", r"gemm|nvjet|matmul|addmm|\bmm\b|linear"), ("norm", r"norm|welford"),
         ("optimizer+ema", r"adam|foreach|multi_tensor|lerp"),
         ("layout/copy", r"copy|memcpy|transpose|nchw|nhwc|cat|permute|contiguous"),
         ("elementwise", r"elementwise|vectorized|unrolled|silu|gelu|add|mul|triton")]

# SD1 at 512 px: (stage, head width, latent tokens) with 8 heads; cross-attention keys are CLIP's 77 tokens.
SD1_ATTENTION = [("stage 0", 40, 64 * 64), ("stage 1", 80, 32 * 32), ("stage 2 + mid", 160, 16 * 16)]
SDPA_OPS = {"flash": "_scaled_dot_product_flash_attention", "efficient": "_scaled_dot_product_efficient_attention",
            "cudnn": "_scaled_dot_product_cudnn_attention", "math": "_scaled_dot_product_attention_math"}


def kind(name):
    low = name.lower()
    return next((k for k, pattern in KINDS if re.search(pattern, low)), "other")


def top_kernels(prof, device, n):
    """[(name, calls, ms, share, kind)] of the n kernels (CUDA) or ops (CPU: self time) taking the most time,
    and the share of each kind over all of them."""
    events = prof.key_averages()
    if device.type == "cuda":
        rows = [(e.key, e.count, e.self_device_time_total) for e in events
                if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0]
    else:
        rows = [(e.key, e.count, e.self_cpu_time_total) for e in events if e.self_cpu_time_total > 0]
    total = sum(us for _, _, us in rows) or 1.0
    rows.sort(key=lambda r: -r[2])
    table = [[name[:90].replace("|", "/"), calls, f"{us / 1e3:.2f}", f"{us / total:.1%}", kind(name)]
             for name, calls, us in rows[:n]]
    shares = {}
    for name, _, us in rows:
        shares[kind(name)] = shares.get(kind(name), 0.0) + us / total
    return table, shares, total / 1e3


def profile_train(args, device):
    from unet_step import count_flops, make_batch, make_step
    args.optimizer = True                            # make_step's flag: the whole step, AdamW and EMA included
    cfg = M.unet_config(args.config)
    model = M.UNet(cfg).initialize_weights().to(device).train()
    model.set_grad_checkpointing(args.grad_checkpointing)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    batch = make_batch(cfg, args, device, args.batch_size)
    count_flops(model, batch)                        # as unet_step does (a deep copy): same memory picture
    step = make_step(model, True, args, device, batch)
    for _ in range(args.warmup):
        step()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        sync(device)
    return prof, dict(config=args.config, resolution=args.resolution, batch_size=args.batch_size, dtype=args.dtype,
                      channels_last=args.channels_last, grad_checkpointing=args.grad_checkpointing,
                      compile=args.compile, optimizer_ema=True, profiled_steps=args.steps)


def profile_sample(args, device):
    from sample import PROMPT, save_random_parts
    dtype = pick_dtype(device, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_random_parts(args, Path(tmp))[0]
        pipe = M.load_pipeline(ckpt, device, dtype)
    if args.compile:
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead")

    def run():
        M.generate(pipe, [PROMPT] * args.batch_size, "", args.steps, 7.5, seed=0, height=args.resolution,
                   width=args.resolution)
    for _ in range(args.warmup):
        run()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
        sync(device)
    return prof, dict(config=args.config, resolution=args.resolution, batch_size=args.batch_size, steps=args.steps,
                      cfg=7.5, dtype=args.dtype, compile=args.compile)


def sdpa_backend(q, k, v, backward):
    """Names of the SDPA kernels F.scaled_dot_product_attention ran for these tensors (forward, and backward when
    asked), under the backends configure_cuda_backends allows; 'none' when no allowed kernel takes the shape."""
    q, k, v = (z.detach().requires_grad_(backward) for z in (q, k, v))
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = F.scaled_dot_product_attention(q, k, v)
            if backward:
                out.float().sum().backward()
    except RuntimeError as e:
        return f"none ({str(e).splitlines()[0][:60]})"
    names = {e.name for e in prof.events()}
    found = [b for b, op in SDPA_OPS.items() if any(op in n for n in names)]
    return "+".join(found) or "?"


def sdpa_table(device, dtype, batch=2, heads=8):
    """[(where, head width, self/cross, forward kernel, backward kernel)] for SD1's attention shapes at 512 px."""
    rows = []
    for where, d, L in SD1_ATTENTION:
        for kv_len, which in ((L, "self"), (77, "cross")):
            q = torch.randn(batch, heads, L, d, device=device, dtype=dtype)
            k, v = (torch.randn(batch, heads, kv_len, d, device=device, dtype=dtype) for _ in range(2))
            rows.append([where, d, which, sdpa_backend(q, k, v, False), sdpa_backend(q, k, v, True)])
    return rows


def check_args(args):
    require_positive(args, "resolution", "batch_size", "steps", "top")
    if args.resolution % 8:
        raise UserError(f"--resolution must be a multiple of 8 (the VAE's downsampling), got {args.resolution}")
    if args.what == "sample" and args.config not in ("sd1", "small"):
        raise UserError("--what sample builds a text encoder and VAE of sd1's or small's size: use --config sd1 or "
                        "small")


def main(args):
    check_args(args)
    device = pick_device(args.device)
    M.configure_cuda_backends()
    if args.what == "sdpa":
        dtype = pick_dtype(device, args.dtype)
        rows = sdpa_table(device, dtype)
        append_results(device, "SDPA kernel per SD1 head width (bench/kernel_profile.py --what sdpa)",
                       dict(dtype=args.dtype, batch_size=2, heads=8, resolution=512),
                       ["where", "head width", "attention", "forward", "forward + backward"], rows)
        return
    prof, settings = (profile_train if args.what == "train" else profile_sample)(args, device)
    table, shares, total_ms = top_kernels(prof, device, args.top)
    unit = "GPU kernels" if device.type == "cuda" else "CPU ops (self time)"
    settings.update(total_ms=f"{total_ms:.1f}", by_kind=" ".join(f"{k} {v:.1%}" for k, v in
                                                                 sorted(shares.items(), key=lambda kv: -kv[1])))
    append_results(device, f"Profile, {args.what}: top {args.top} {unit} (bench/kernel_profile.py)", settings,
                   ["kernel", "calls", "ms", "share", "kind"], table)


if __name__ == "__main__":
    p = arg_parser(__doc__)
    p.add_argument("--what", default="train", choices=["train", "sample", "sdpa"], help="what to profile")
    p.add_argument("--config", default="small", choices=sorted(M.UNET_CONFIGS), help="named UNet config")
    p.add_argument("--resolution", type=int, default=256, help="image resolution (latents are resolution/8)")
    p.add_argument("--batch_size", type=int, default=4, help="batch size (train), images per call (sample)")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"], help="autocast (train) / weights dtype")
    p.add_argument("--channels_last", action="store_true", help="train: channels_last memory format")
    p.add_argument("--grad_checkpointing", action="store_true", help="train: gradient checkpointing")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (sample: reduce-overhead)")
    p.add_argument("--steps", type=int, default=3, help="train: profiled steps; sample: DDIM steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (train) or runs (sample) first")
    p.add_argument("--top", type=int, default=30, help="rows of the table")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, cuda:N, mps or cpu")
    run_main(main, p.parse_args())
