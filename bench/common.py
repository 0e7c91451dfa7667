"""What every benchmark shares: the device's name and peak FLOP/s, timing that waits for the GPU, and the
results file `bench/results/<device>.md` that each run appends a table to (BENCH_RESULTS_DIR moves it: the
tests' smoke runs write elsewhere)."""
import datetime
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The allocator SD_Train.py runs with (read at CUDA's first use, which comes after this import): max batch
# and peak memory figures depend on it.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def peak_flops(device):
    """Dense bf16 peak FLOP/s of the GPU (SD_Model's table), or None: no MFU rather than a guess."""
    import SD_Model
    return SD_Model.peak_tflops(device) * 1e12 or None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns, steps, warmup, device):
    """Median seconds per call of each fn, alternating fn A and fn B call by call so that clock drift and
    a busy neighbour on a shared CPU hit all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {k: [] for k in fns}
    for _ in range(steps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def append_results(device, title, settings, header, rows):
    """Print a markdown table and append it, dated, to bench/results/<device>.md."""
    lines = [f"### {title} — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             f"device `{device_name(device)}`, torch {torch.__version__}, " +
             ", ".join(f"{k}={v}" for k, v in settings.items()), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    text = "\n".join(lines) + "\n\n"
    print(text)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", device_name(device)).strip("_")
    out = Path(os.environ.get("BENCH_RESULTS_DIR", ROOT / "bench" / "results")) / f"{slug}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(text)
    return out


def random_unet(cfg):
    """Our from-scratch UNet of `cfg` with its zero-initialized outputs made random, so that no branch is
    trivially zero (fp32, on CPU)."""
    import SD_Model
    torch.manual_seed(0)
    unet = SD_Model.UNet(cfg).initialize_weights()
    for p in unet.parameters():
        if not p.any():
            torch.nn.init.normal_(p, std=0.02)
    return unet


def random_batch(cfg, batch, res, device, memory_format=torch.contiguous_format):
    """One fixed training batch for `cfg` at `res` px (latents res/8): (x, t, context, target)."""
    g, h = torch.Generator().manual_seed(1), res // 8
    return (torch.randn(batch, cfg.in_channels, h, h, generator=g).to(device, memory_format=memory_format),
            torch.randint(0, 1000, (batch,), generator=g).to(device),
            torch.randn(batch, 77, cfg.context_dim, generator=g).to(device),
            torch.randn(batch, cfg.out_channels, h, h, generator=g).to(device))
