"""Benchmark one UNet training step, ours vs diffusers' UNet2DConditionModel, same weights, same settings.

Times forward + backward (and with --optimizer, fused AdamW + EMA as SD_Train.py does) in one process,
alternating the two models step by step, and prints img/s for both, the ratio, and MFU on GPU with the
forward+backward FLOPs counted by torch's FlopCounterMode.

  CPU, small:  python bench/unet_step.py --config small --resolution 256 --batch_size 4
  GPU, full:   python bench/unet_step.py --config sd1 --resolution 512 --batch_size 32 --dtype bf16 --channels_last \
                 --compile --optimizer
"""
import copy
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from common import (append_results, device_name, peak_flops, random_batch, random_unet,  # noqa: I001 (sets sys.path)
                    sync, time_interleaved)
import SD_Model as M
from sd_common import arg_parser, pick_device, pick_dtype, require_positive, run_main


def build_models(args, device):
    """Our UNet and (with --impl both) diffusers' with identical weights (ours' from-scratch init, then random
    outputs so that no branch is trivially zero)."""
    cfg = M.unet_config(args.config)
    ours = random_unet(cfg)
    models = {"ours": ours}
    if args.impl == "both":
        from diffusers import UNet2DConditionModel
        models["diffusers"] = UNet2DConditionModel.from_config(M.diffusers_config(cfg, args.resolution // 8))
        models["diffusers"].load_state_dict(ours.state_dict())
    for name, m in models.items():
        m.to(device).train()
        if args.channels_last:
            m.to(memory_format=torch.channels_last)
        if args.grad_checkpointing:
            m.set_grad_checkpointing(True) if name == "ours" else m.enable_gradient_checkpointing()
    return cfg, models


def make_step(model, is_ours, args, device, batch):
    x, t, ctx, target = batch
    forward = torch.compile(model, backend=getattr(args, "compile_backend", "inductor")) if args.compile else model
    dtype = None if args.dtype == "fp32" else pick_dtype(device, args.dtype)    # None: no autocast
    opt = ema = None
    if args.optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2, fused=device.type == "cuda")
        ema = [p.detach().clone() for p in params]

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = forward(x, t, ctx) if is_ours else forward(x, t, ctx).sample
            loss = F.mse_loss(out.float(), target)
        loss.backward()
        if opt is not None:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - 0.9999)
        for p in model.parameters():
            p.grad = None

    return step


def count_flops(model, batch):
    """FLOPs of one forward + backward per sample (matmuls and convolutions; what MFU conventionally counts)."""
    x, t, ctx, target = batch
    m = copy.deepcopy(model).float().set_grad_checkpointing(False)  # count the model, not the recompute
    with FlopCounterMode(display=False) as counter:
        F.mse_loss(m(x[:1].float(), t[:1], ctx[:1].float()), target[:1]).backward()
    return counter.get_total_flops()


def make_batch(cfg, args, device, batch):
    """common.random_batch of `batch` samples at args.resolution, in args' memory format (also max_batch and
    kernel_profile)."""
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    return random_batch(cfg, batch, args.resolution, device, fmt)


def main(args):
    device = pick_device(args.device)
    require_positive(args, "batch_size", "steps", "resolution")
    M.configure_cuda_backends()
    cfg, models = build_models(args, device)
    batch = make_batch(cfg, args, device, args.batch_size)
    flops = count_flops(models["ours"], batch)
    steps = {k: make_step(m, k == "ours", args, device, batch) for k, m in models.items()}
    t0 = time.perf_counter()
    for step in steps.values():              # the first step of each: compile and cuDNN autotuning happen here
        step()
    sync(device)
    first_s = time.perf_counter() - t0
    sec = time_interleaved(steps, args.steps, max(0, args.warmup - 1), device)

    peak = peak_flops(device)
    rows = []
    for k in steps:
        ips = args.batch_size / sec[k]
        mfu = f"{flops * ips / peak:.1%}" if peak else "n/a"
        mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}" if device.type == "cuda" else "n/a"
        rows.append([k, f"{sec[k] * 1e3:.1f}", f"{ips:.2f}", mfu, mem])
    if "diffusers" in sec:
        rows.append(["ours / diffusers", "", f"{sec['diffusers'] / sec['ours']:.3f}x", "", ""])
    settings = dict(config=args.config, resolution=args.resolution, batch_size=args.batch_size, dtype=args.dtype,
                    channels_last=args.channels_last, grad_checkpointing=args.grad_checkpointing,
                    compile=args.compile and args.compile_backend,
                    optimizer_ema=args.optimizer, steps=args.steps, fwd_bwd_gflop_per_img=f"{flops / 1e9:.1f}",
                    first_steps_s=f"{first_s:.1f}")
    append_results(device, "UNet training step (bench/unet_step.py)", settings,
                   ["impl", "ms/step", "img/s", "MFU", "peak GiB"], rows)
    print(f"{device_name(device)}: " + ", ".join(f"{k} {args.batch_size / s:.2f} img/s" for k, s in sec.items()))


if __name__ == "__main__":
    p = arg_parser(__doc__)
    p.add_argument("--config", default="small", choices=sorted(M.UNET_CONFIGS), help="named UNet config")
    p.add_argument("--resolution", type=int, default=256, help="image resolution (latents are resolution/8)")
    p.add_argument("--batch_size", type=int, default=4, help="batch size")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast dtype")
    p.add_argument("--channels_last", action="store_true", help="channels_last memory format")
    p.add_argument("--grad_checkpointing", action="store_true", help="gradient checkpointing in both models")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--compile_backend", default="inductor", choices=["inductor", "aot_eager"],
                   help="torch.compile backend: inductor (what training runs), or aot_eager (traces forward and "
                        "backward without generating code: a CPU rehearsal in minutes)")
    p.add_argument("--optimizer", action="store_true", help="include clip + AdamW + EMA update in the step")
    p.add_argument("--impl", default="both", choices=["both", "ours"], help="time ours and diffusers', or ours alone")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per model")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, cuda:N, mps or cpu")
    run_main(main, p.parse_args())
