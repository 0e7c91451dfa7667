"""How long one training checkpoint of a named UNet config takes to write and to read back on this machine's disk,
so that torchrun's --shutdown_timeout (the grace between a preemption's SIGTERM and SIGKILL) can be set above it.

The state has SD_Train.save_checkpoint's layout and sizes: UNet and EMA weights (fp32), AdamW's two moments
(fp32) and its step counters, written the way SD_Train writes it (sd_common.atomic_path: temp name, fsync,
rename, fsync of the folder). The tensors are allocated but not filled: what is timed is the serialisation and
the disk, not an init.

    python bench/checkpoint_save.py --config sd1 --dir /workspace/checkpoints
"""
import tempfile
import time
from pathlib import Path

import torch

from common import append_results  # noqa: I001 (sets sys.path)
import SD_Model as M
from sd_common import arg_parser, atomic_path, check_writable, run_main


def training_state(config):
    """A training checkpoint's tensors for `config`: unet, ema, optimizer (AdamW state), all fp32."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in M.UNet(M.unet_config(config)).state_dict().items()}
    empty = lambda: {k: torch.empty(s) for k, s in shapes.items()}  # noqa: E731
    optimizer = {"state": {i: {"step": torch.tensor(1.0), "exp_avg": torch.empty(s), "exp_avg_sq": torch.empty(s)}
                           for i, s in enumerate(shapes.values())},
                 "param_groups": [{"lr": 1e-5, "params": list(range(len(shapes)))}]}
    return {"unet": empty(), "ema": empty(), "optimizer": optimizer}


def main(args):
    folder = check_writable(args.dir or tempfile.mkdtemp(prefix="ckpt_bench_"), "--dir")
    path = Path(folder) / "step_00000001.pt"
    state = training_state(args.config)
    params = sum(v.numel() for v in state["unet"].values())
    t0 = time.perf_counter()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    save_s = time.perf_counter() - t0
    size_gb = path.stat().st_size / 1e9
    t0 = time.perf_counter()
    torch.load(path, map_location="cpu", weights_only=True)   # a resume reads it memory-mapped: this is the worst case
    load_s = time.perf_counter() - t0
    path.unlink()
    rows = [(args.config, f"{params:,}", f"{size_gb:.1f}", f"{save_s:.1f}", f"{size_gb / save_s:.2f}", f"{load_s:.1f}")]
    append_results(torch.device("cpu"), "Training checkpoint write (bench/checkpoint_save.py)",
                   {"dir": folder}, ["config", "UNet params", "GB", "save s (fsync)", "GB/s", "load s"], rows)


if __name__ == "__main__":
    p = arg_parser(__doc__)
    p.add_argument("--config", default="sd1", choices=sorted(M.UNET_CONFIGS), help="named UNet config")
    p.add_argument("--dir", default=None, help="folder on the disk to measure (default: a temp folder)")
    run_main(main, p.parse_args())
