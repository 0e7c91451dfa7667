"""Benchmark the real training job: `SD_Train.py --synthetic` under torchrun for N steps, read back its own
img/s, MFU and peak memory from train.log (the steady-state windows after warm-up), append a table.
Unless --text_encoder is passed through, the run uses a random CLIP text tower of the real one's shape
(CLIP-L for 768-d context, OpenCLIP-H for 1024-d), saved locally, so no hub download is needed.

  CPU, small:  python bench/train_e2e.py --phase tiny --nproc 2 --steps 30
  1 H100:      python bench/train_e2e.py --phase phase1 --nproc 1 --steps 60 -- --batch_size 32 --compile true
"""
import re
import subprocess
import sys
import tempfile

import torch

from common import ROOT, append_results  # noqa: I001 (sets sys.path)
from sd_common import arg_parser, pick_device, require_positive, run_main

LINE = re.compile(r"step (\d+)/\d+ .*?\| ([\d.]+) img/s(?: \| MFU ([\d.]+)%)?(?: \| mem ([\d.]+) GB)?")


# context dim -> (hidden, layers, heads) of the text tower SD pairs with it
TEXT_TOWERS = {768: (768, 12, 12), 1024: (1024, 24, 16)}


def random_text_encoder(phase, out_dir):
    """A random CLIP text encoder with the phase UNet's context width, at the real tower's cost."""
    import SD_Model
    import SD_Train
    from tiny_models import save_tiny_clip
    values = SD_Train.load_phase(phase)
    dim = SD_Model.unet_config(values.get("model", SD_Train.OPTIONS["model"][1])).context_dim
    hidden, layers, heads = TEXT_TOWERS.get(dim, (dim, 2, 2))
    return str(save_tiny_clip(f"{out_dir}/text_encoder", hidden=hidden, layers=layers, heads=heads, mlp_ratio=4))


def main(args, extra):
    require_positive(args, "nproc", "steps", "log_every", "synthetic")
    with tempfile.TemporaryDirectory() as out:
        if "--text_encoder" not in extra:
            extra = [*extra, "--text_encoder", random_text_encoder(args.phase, out)]
        # one process runs as a plain script (no torchrun, whose worker a time box's kill would miss)
        launch = ([sys.executable] if args.nproc == 1 else
                  [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"])
        cmd = [*launch, str(ROOT / "SD_Train.py"), "--phase", args.phase, "--synthetic", str(args.synthetic),
               "--max_steps", str(args.steps), "--log_every", str(args.log_every), "--out_dir", out,
               "--val_prompts", "", "--val_samples", "0", "--keep_last", "1", *extra]
        print(" ".join(cmd))
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"training failed:\n{run.stderr[-3000:]}")
        log = open(f"{out}/train.log").read()
    windows = [m.groups() for m in LINE.finditer(log)]
    steady = [w for w in windows if int(w[0]) > args.warmup] or windows[-1:]
    if not steady:
        sys.exit(f"no throughput lines in train.log:\n{log[-2000:]}")
    img_s = sum(float(w[1]) for w in steady) / len(steady)
    mfu = f"{sum(float(w[2]) for w in steady) / len(steady):.1f}%" if steady[0][2] else "n/a"
    mem = steady[-1][3] or "n/a"
    device = pick_device("cuda" if torch.cuda.is_available() else "cpu")   # where SD_Train.py --device auto runs
    overrides = " ".join(a if not a.startswith(out) else "<random CLIP>" for a in extra)
    settings = dict(phase=args.phase, nproc=args.nproc, steps=args.steps, warmup_steps_excluded=args.warmup,
                    overrides=overrides or "none")
    append_results(device, "End-to-end training (bench/train_e2e.py -> SD_Train.py --synthetic)", settings,
                   ["img/s (all ranks)", "MFU", "peak GiB/GPU"], [[f"{img_s:.2f}", mfu, mem]])


if __name__ == "__main__":
    p = arg_parser(__doc__)
    p.add_argument("--phase", default="tiny", help="phase of configs/phases.yaml (model, resolution, batch)")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) for torchrun")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps to run")
    p.add_argument("--warmup", type=int, default=10, help="first steps left out of the figures (compile, cudnn autotune)")
    p.add_argument("--log_every", type=int, default=5, help="steps per throughput window")
    p.add_argument("--synthetic", type=int, default=4096, help="synthetic samples (the data set size)")
    known, rest = p.parse_known_args()
    run_main(lambda a: main(a, [x for x in rest if x != "--"]), known)
