"""Train the SD UNet on precomputed latents: one script for every phase (configs/phases.yaml), DDP or FSDP2
under torchrun, checkpoints that resume the same run bit for bit.

    python SD_Train.py --phase tiny --synthetic 64                 # one process, no data needed
    python SD_Train.py --phase phase1 --dry_run                    # the plan: steps, hours, memory, disk; no run
    torchrun --nproc_per_node=2 SD_Train.py --phase phase1 --resume auto
    torchrun --nnodes=4 --node_rank=R --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        SD_Train.py --phase sd15 --init runs/sd12/ema_final.safetensors

Reads top to bottom: config (phases + flags) -> loss, EMA, LR schedule -> checkpoints -> validation -> logging
(train.log, TensorBoard / wandb, the loss curve) -> train(): setup, data, model + EMA, optimizer, the loop -> the
dry run -> argparse. The latent data format, its mixing and
every sample's noise live in sd_latents.py; the model, schedule and samplers in SD_Model.py.
"""
import os

# Before torch touches CUDA: expandable segments stop the allocator fragmenting when activation shapes vary
# between steps (the seed's setting); setdefault keeps a user's own choice.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse
import difflib
import hashlib
import faulthandler
import json
import math
import random
import re
import resource
import secrets
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from PIL import Image
from tqdm import tqdm

from SD_Model import (DEFAULT_TEXT_ENCODER, DEFAULT_VAE, LOSS_WEIGHTINGS, FrozenTextEncoder, FrozenVAE,
                      NoiseSchedule, Pipeline, build_unet, checkpoint_meta, configure_cuda_backends, generate,
                      make_grid, peak_tflops, read_training_checkpoint, read_unet_state, resolution_shift, save_unet,
                      unet_config)
from sd_common import (UserError, arg_parser, atomic_path, check_writable, pick_device, pick_dtype, run_main,
                       write_atomic)
from sd_data import BUCKET_LATENT_MULTIPLE, aspect_buckets, print_summary
from sd_latents import LatentMix, open_source, prefetch, step_batches, synthetic_source

REPO = Path(__file__).resolve().parent
PHASES_FILE = REPO / "configs" / "phases.yaml"

#################################################################################
#                                   Config                                      #
#################################################################################


def _bool(v):
    if isinstance(v, bool):
        return v
    if str(v).lower() in ("1", "true", "yes", "on"):
        return True
    if str(v).lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _int(v):
    try:
        if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
            raise ValueError
        return int(v)
    except ValueError:
        raise ValueError("expected an integer") from None


def _float(v):
    try:
        if isinstance(v, bool):
            raise ValueError
        return float(v)                              # also takes YAML's "1e-5", which PyYAML reads as a string
    except ValueError:
        raise ValueError("expected a number") from None


def _shift(v):
    """A flow model's timestep shift: a number, or 'auto' for SD3's resolution-dependent one (resolved later)."""
    return "auto" if str(v).lower() == "auto" else _float(v)


def _str_list(v):
    """A YAML list, or 'a|b|c' on the command line (prompts contain commas)."""
    return [str(x) for x in v] if isinstance(v, list) else [s for s in str(v).split("|") if s]


def _int_list(v):
    return [_int(x) for x in (v if isinstance(v, list) else str(v).split(","))]


def _datasets(v):
    """A YAML list of {latents, captions, ratio}, or 'LATENTS:CAPTIONS[:RATIO],...' on the command line."""
    if isinstance(v, str):
        v = [dict(zip(("latents", "captions", "ratio"), part.split(":"))) for part in v.split(",") if part]
    out = []
    for d in v:
        if not isinstance(d, dict) or not {"latents", "captions"} <= set(d) or set(d) - {"latents", "captions", "ratio"}:
            raise ValueError("each dataset needs latents and captions folders and an optional ratio")
        ratio = _float(d.get("ratio", 1.0))
        if ratio <= 0:
            raise ValueError("mix ratios must be positive")
        out.append({"latents": str(d["latents"]), "captions": str(d["captions"]), "ratio": ratio})
    return out


LOGGERS = ("auto", "wandb", "tensorboard", "both", "none")

VAL_PROMPTS = ["a misty forest at sunrise", "a mountain landscape with a lake", "a cyberpunk city at night",
               "a red sports car on a coastal road", "portrait photo of a woman, studio lighting",
               "full body photo of a man walking in a park", "a cat sitting on a windowsill", "a bowl of ramen"]

# The run options, in one place: phases.yaml keys and --flags are both checked against this list.
# name: (parser, default, help[, choices])
OPTIONS = {
    # where
    "out_dir": (str, "", "run folder for checkpoints/, samples/, train.log, config.yaml ('' -> runs/<phase>)"),
    "init": (str, "scratch", "'scratch' (zero-init UNet) or UNet weights to start from: a previous phase's "
                             "export or checkpoint, a diffusers folder, an original single file. Weights only: "
                             "optimizer, LR schedule and step start fresh"),
    "resume": (str, "", "'auto' (latest checkpoint in out_dir that verifies, or a fresh start when there is none) "
                        "or a checkpoint path: continue that run exactly"),
    "resume_override": (_str_list, [], "options a --resume may change on purpose ('lr|grad_clip'; 'world_size' to "
                                       "resume on another GPU count, 'data_fingerprint' on changed datasets); any "
                                       "other change of the run's maths is refused"),
    # model and frozen parts
    "model": (str, "sd1", "UNet config name from SD_Model.UNET_CONFIGS (a checkpoint's own config wins)"),
    "text_encoder": (str, DEFAULT_TEXT_ENCODER["sd1"], "frozen CLIP text encoder: hub id or local folder"),
    "text_layer": (str, "last", "context from the last layer (SD1) or the penultimate one (SD2, OpenCLIP-H)",
                   ("last", "penultimate")),
    "vae": (str, "", "VAE for validation images ('' -> the one named in the latents' latent_info.json)"),
    # noise schedule: every field of SD_Model.NoiseSchedule, with its default and choices (filled in below)
    "num_train_timesteps": (_int, None, "diffusion timesteps"),
    "beta_start": (_float, None, "first beta"),
    "beta_end": (_float, None, "last beta"),
    "beta_schedule": (str, None, "beta schedule"),
    "prediction_type": (str, None, "UNet target: epsilon, v_prediction, or flow (rectified flow as SD3: x = (1 - s) "
                                   "x0 + s noise, target noise - x0; SD3's loss is loss_weighting none)"),
    "zero_terminal_snr": (_bool, None, "rescale betas to zero terminal SNR (Lin et al. 2023; needs v_prediction)"),
    "flow_shift": (_shift, None, "flow: timestep shift s -> shift s / (1 + (shift - 1) s) of training and sampling "
                                 "(SD3 eq. 23; 1 = none); 'auto' = SD3's resolution-dependent resolution / 256"),
    "flow_t_density": (str, None, "flow: density of the training sigmas, SD3's logit_normal or uniform"),
    "flow_logit_mean": (_float, None, "flow: mean m of logit_normal (SD3: 0)"),
    "flow_logit_std": (_float, None, "flow: std s of logit_normal (SD3: 1)"),
    # data
    "datasets": (_datasets, [], "latent folders (encode_latents.py) with their caption datasets (05) and mix "
                                "ratios: LATENTS:CAPTIONS[:RATIO],..."),
    "synthetic": (_int, 0, "train on N random latents and captions of the configured shape instead (smoke runs, "
                           "benchmarks on machines without data)"),
    "resolution": (_int, 512, "image resolution the latents were encoded at; a dataset that differs is refused"),
    "buckets": (_bool, False, "aspect-ratio buckets: train on latents of encode_latents.py --buckets (square folders "
                              "join as one bucket), every optimizer step from one bucket on all ranks; off: square "
                              "latents only, as SD"),
    "epoch_samples": (_int, 0, "samples per epoch drawn from the mix (0 -> the datasets' total size)"),
    "latent_fraction": (_float, 1.0, "share of each dataset's latents loaded into RAM at start; the rest are read "
                                     "from disk batch by batch"),
    "loader_threads": (_int, 16, "threads reading .npy latents"),
    "val_samples": (_int, 64, "held-out latents (the captions' validation split) for the validation loss"),
    # optimisation
    "epochs": (_int, 1, "epochs; the LR schedule spans all of them"),
    "max_steps": (_int, 0, "stop after this many optimizer steps of the phase (0 -> run all epochs); the LR "
                           "schedule still spans all epochs, so a later --resume continues it"),
    "batch_size": (_int, 24, "samples per GPU per micro-step"),
    "grad_accum": (_int, 1, "micro-steps per optimizer step"),
    "global_batch": (_int, 0, "samples per optimizer step; sets grad_accum = global_batch / (batch_size x GPUs) "
                              "(0 -> use grad_accum)"),
    "lr": (_float, 1e-5, "peak learning rate"),
    "warmup_steps": (_int, 500, "linear warmup from lr x 1e-2, then cosine decay to lr x 1e-2"),
    "weight_decay": (_float, 1e-2, "AdamW weight decay"),
    "grad_clip": (_float, 1.0, "max gradient norm"),
    "cfg_dropout": (_float, 0.1, "share of samples trained on the empty prompt, for classifier-free guidance"),
    "loss_weighting": (str, "min_snr", "per-sample loss weight by SNR (SD_Model.NoiseSchedule.loss_weight): none, "
                                       "min_snr (Hang et al. 2023, the seed's), soft_min_snr (Crowson et al. 2024) "
                                       "or debiased (Yu et al. 2024)", LOSS_WEIGHTINGS),
    "min_snr_gamma": (_float, 5.0, "gamma of min_snr / soft_min_snr (the seed: 5, then 3 from epoch 17)"),
    "noise_offset": (_float, 0.0, "offset noise (Guttenberg 2023): add this x a per-sample, per-channel constant to "
                                  "the noise, so an epsilon model learns to move an image's mean (very dark / light "
                                  "images); 0 = off, as SD"),
    "ema_decay": (_float, 0.9999, "EMA decay, warmed up as min(decay, (1 + step) / (10 + step))"),
    "ema_every": (_int, 1, "update the EMA every N optimizer steps, with decay ** N: the same horizon in steps for "
                           "1/N of the update's time"),
    "max_bad_steps": (_int, 20, "stop after this many non-finite losses in a row"),
    "seed": (_int, 0, "seed of the init, the data order and every sample's timestep, noise and CFG coin"),
    # speed and memory
    "device": (str, "auto", "auto (cuda when available), cuda or cpu", ("auto", "cuda", "cpu")),
    "precision": (str, "auto", "auto (bf16 on CUDA, fp32 on CPU), bf16 (autocast), fp16 (autocast + GradScaler, "
                               "NeMo's O1) or fp32", ("auto", "bf16", "fp16", "fp32")),
    "channels_last": (_bool, True, "channels_last memory format for the UNet and its inputs"),
    "grad_checkpointing": (_bool, True, "recompute activations in backward (~40%% less memory)"),
    "compile": (_bool, False, "torch.compile the UNet"),
    "fsdp": (_bool, False, "shard UNet, gradients and optimizer with FSDP2 (fully_shard) instead of DDP"),
    "ema_device": (str, "model", "where the fp32 EMA lives: beside the UNet (model), or in host memory (cpu: 4 bytes "
                                 "a parameter off the GPU, 3.4 GB for SD1; a pinned copy of the parameters goes over "
                                 "after each update, folded in while the next step runs; host RAM: twice that per "
                                 "rank)", ("model", "cpu")),
    # checkpoints
    "save_steps": (_int, 0, "also checkpoint every N steps (0 -> at epoch ends only)"),
    "keep_last": (_int, 3, "keep the newest K step checkpoints (0 -> keep all); an 860M checkpoint is ~13 GB"),
    # watching the run
    "log_every": (_int, 10, "log loss, lr, grad norm, img/s, MFU and memory every N steps"),
    "val_steps": (_int, 0, "also validate every N steps (0 -> at epoch ends only)"),
    "val_prompts": (_str_list, VAL_PROMPTS, "validation prompt grid ('a|b|c'; empty -> no images)"),
    "negative_prompt": (str, "", "negative prompt of the validation grid (the unconditional branch of CFG)"),
    "val_cfg_scale": (_float, 7.5, "CFG scale of the validation grid"),
    "val_ddim_steps": (_int, 50, "sampling steps of the validation grid (DDIM, or flow Euler for a flow model)"),
    "val_timesteps": (_int_list, [100, 300, 500, 700, 900], "fixed timesteps of the validation loss (flow: sigma = "
                                                            "t / num_train_timesteps)"),
    "logger": (str, "auto", "dashboards beside train.log and loss_curve.png: TensorBoard event files in out_dir "
                            "(`tensorboard --logdir runs`) and/or wandb; auto = TensorBoard when installed, plus "
                            "wandb when --wandb is online or offline", LOGGERS),
    "wandb": (str, "disabled", "wandb mode; online or offline alone turns wandb on (with --logger auto); with "
                               "--logger wandb|both, disabled means online", ("online", "offline", "disabled")),
    "wandb_project": (str, "stable-diffusion", "wandb project"),
    "peak_tflops": (_float, 0.0, "GPU peak dense bf16 TFLOP/s for MFU (0 -> look the GPU up)"),
}
for _f in fields(NoiseSchedule):                     # one home for the schedule's defaults and choices
    if _f.init:
        _parse, _, _help = OPTIONS[_f.name][:3]
        OPTIONS[_f.name] = (_parse, _f.default, _help, *([NoiseSchedule.CHOICES[_f.name]]
                                                          if _f.name in NoiseSchedule.CHOICES else []))
INHERIT = "inherit"                                  # phases.yaml: start from another phase's values


def _convert(name, value, where):
    parse, _, _, *choices = OPTIONS[name]
    try:
        value = parse(value)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}{name}: {e} (got {value!r})") from None
    if choices and value not in choices[0]:
        raise UserError(f"{where}{name}: {value!r} is not one of {list(choices[0])}")
    return value


def _unknown(name, where):
    hint = difflib.get_close_matches(name, OPTIONS, n=1)
    return UserError(f"{where}: unknown option '{name}'" + (f" (did you mean '{hint[0]}'?)" if hint else "") +
                     "; see python SD_Train.py --help")


def load_phase(name, phases_file=PHASES_FILE):
    """A phase's values from phases.yaml, following `inherit`, each checked against OPTIONS."""
    phases = yaml.safe_load(Path(phases_file).read_text()) or {}
    if name not in phases:
        raise UserError(f"unknown phase '{name}'; {phases_file} has {sorted(phases)}")
    chain, values = [name], {}
    while INHERIT in phases[chain[-1]]:
        parent = phases[chain[-1]][INHERIT]
        if parent not in phases or parent in chain:
            raise UserError(f"phase '{chain[-1]}' inherits unknown or circular phase '{parent}'")
        chain.append(parent)
    for phase in reversed(chain):                    # parents first, the phase itself last
        for key, value in phases[phase].items():
            if key == INHERIT:
                continue
            if key not in OPTIONS:
                raise _unknown(key, f"{phases_file} phase '{phase}'")
            values[key] = _convert(key, value, f"{phases_file} phase '{phase}' key ")
    return values


def resolve_config(args):
    """OPTIONS defaults <- phases.yaml[phase] <- command-line flags, every value type-checked."""
    cfg = {name: opt[1] for name, opt in OPTIONS.items()}
    cfg.update(load_phase(args.phase, args.phases_file))
    for name, value in vars(args).items():
        if name in OPTIONS:
            cfg[name] = _convert(name, value, "--")
    cfg["phase"] = args.phase
    cfg["out_dir"] = cfg["out_dir"] or str(Path("runs") / args.phase)
    if cfg["prediction_type"] == "epsilon" and cfg["zero_terminal_snr"]:
        raise UserError("zero_terminal_snr needs prediction_type v_prediction (eps is undefined at SNR 0)")
    if cfg["fsdp"] and cfg["precision"] == "fp16":
        raise UserError("--fsdp trains in bf16 or fp32; fp16's GradScaler would see only this rank's shard")
    for key in ("batch_size", "grad_accum", "epochs", "log_every", "loader_threads", "max_bad_steps",
                "num_train_timesteps", "ema_every"):
        if cfg[key] < 1:
            raise UserError(f"{key} must be at least 1 (got {cfg[key]})")
    for key in ("max_steps", "save_steps", "keep_last", "val_steps", "val_samples", "epoch_samples", "synthetic",
                "global_batch"):
        if cfg[key] < 0:
            raise UserError(f"{key} must be 0 or more (got {cfg[key]})")
    if cfg["loss_weighting"] in ("min_snr", "soft_min_snr") and cfg["min_snr_gamma"] <= 0:
        raise UserError(f"loss_weighting {cfg['loss_weighting']} needs min_snr_gamma > 0 (got {cfg['min_snr_gamma']}); "
                        "use loss_weighting none for the plain loss")
    if not 0.0 <= cfg["latent_fraction"] <= 1.0 or not 0.0 <= cfg["cfg_dropout"] < 1.0:
        raise UserError("latent_fraction must be in [0, 1] and cfg_dropout in [0, 1)")
    if cfg["resolution"] < 1:
        raise UserError(f"resolution must be positive, got {cfg['resolution']}")
    pick_loggers(cfg)                                # a contradiction or a missing package, before any work
    if cfg["flow_shift"] == "auto":
        cfg["flow_shift"] = resolution_shift(cfg["resolution"])
    NoiseSchedule.from_dict(cfg)                     # its own checks (flow settings), before any work
    if cfg["ema_device"] == "cpu" and cfg["fsdp"]:
        raise UserError("--fsdp already shards the EMA across the GPUs; --ema_device cpu is for DDP and one GPU")
    return cfg


#################################################################################
#                          Loss, EMA and LR Schedule                            #
#################################################################################

def diffusion_loss(model, schedule, x0, context, t, noise, weighting="none", gamma=5.0):
    """(per-sample MSE to the schedule's target, per-sample weight of `weighting`: SD_Model.LOSS_WEIGHTINGS)."""
    x_t = schedule.q_sample(x0, t, noise)
    pred = model(x_t, t, context)
    per_sample = F.mse_loss(pred.float(), schedule.target(x0, t, noise).float(), reduction="none").mean((1, 2, 3))
    return per_sample, schedule.loss_weight(t, weighting, gamma).to(per_sample.device)


def apply_cfg_dropout(context, uncond, drop):
    """Replace the context of dropped samples with the empty prompt's embedding (precomputed once), so the
    UNet also learns the unconditional branch that classifier-free guidance needs (Ho & Salimans 2022)."""
    return torch.where(drop.to(context.device)[:, None, None], uncond.to(context.dtype), context)


def ema_decay_at(step, max_decay):
    """The seed's EMA warmup: min(max_decay, (1 + step) / (10 + step)) at the step-th update (from 0)."""
    return min(max_decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update_(ema, params, decay):
    """ema <- decay * ema + (1 - decay) * param = ema + (1 - decay) (param - ema): one foreach lerp over all tensors
    (on the params' device), which reads each tensor once where a mul then an add read the EMA twice."""
    torch._foreach_lerp_(ema, params, 1 - decay)


class EMA:
    """The fp32 EMA of the UNet's parameters, updated after every `every`-th optimizer step with decay
    ema_decay_at(step) ** every: a step's parameters then weigh in k steps later by decay ** k either way, so the
    horizon in steps is a per-step EMA's, for 1 / every of the updates.
      device 'model'  beside the parameters (on the GPU: 4 bytes a parameter, 3.4 GB for SD1), updated in place.
      device 'cpu'    in host memory. An update copies the parameters into a staging buffer (pinned, on a side CUDA
                      stream, so the copy overlaps the next step's forward) and a worker thread folds them in while
                      the next step runs. The next optimizer step waits, on the GPU, for the copy to have read the
                      parameters; the next update waits for the fold (it refills the buffer); so does every read of
                      `tensors`. A CPU-only machine runs the same path with a plain copy, bit for bit the 'model'
                      path's arithmetic."""

    def __init__(self, params, device, every, max_decay):
        self.params, self.every, self.max_decay = params, every, max_decay
        self.offload = device == "cpu"
        self.shadow = [p.to("cpu", copy=True) for p in params] if self.offload else [p.clone() for p in params]
        self.pending = self.copied = self.stream = None
        if self.offload:
            cuda = params[0].device.type == "cuda"
            self.staging = [torch.empty_like(e, pin_memory=cuda) for e in self.shadow]   # pinned: async D2H
            if cuda:
                self.stream, self.copied = torch.cuda.Stream(params[0].device), torch.cuda.Event()
            self.worker = ThreadPoolExecutor(1)

    @property
    def tensors(self):
        """The EMA tensors (in the order of the params), once any fold in flight has landed."""
        self.wait()
        return self.shadow

    def wait(self):
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()                         # re-raises a failed fold here

    def before_params_change(self):
        """Called before the optimizer step overwrites the parameters: the staging copy must have read them."""
        if self.copied is not None:
            torch.cuda.current_stream(self.stream.device).wait_event(self.copied)   # a GPU-side wait, no host sync

    def update(self, step):
        """Fold in the parameters as they are after optimizer step `step` (from 0), when that step is due."""
        if (step + 1) % self.every:
            return
        decay = ema_decay_at(step, self.max_decay) ** self.every
        if not self.offload:
            ema_update_(self.shadow, self.params, decay)
            return
        self.wait()
        with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
            if self.stream is not None:
                self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))  # after the optimizer step
            for buf, p in zip(self.staging, self.params):   # device -> pinned host: asynchronous on CUDA
                buf.copy_(p, non_blocking=True)
            if self.copied is not None:
                self.copied.record(self.stream)
        self.pending = self.worker.submit(self._fold, decay)

    def _fold(self, decay):
        if self.copied is not None:
            self.copied.synchronize()
        ema_update_(self.shadow, self.staging, decay)

    def close(self):
        self.wait()
        if self.offload:
            self.worker.shutdown()


def build_lr_scheduler(optimizer, lr, warmup_steps, total_steps):
    """LinearLR warmup from lr x 1e-2, then cosine annealing to eta_min = lr x 1e-2 at total_steps (the seed's)."""
    sched = torch.optim.lr_scheduler
    cosine = sched.CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps), eta_min=lr * 1e-2)
    if warmup_steps <= 0:
        return cosine
    warmup = sched.LinearLR(optimizer, start_factor=1e-2, end_factor=1.0, total_iters=warmup_steps)
    return sched.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


def build_optimizer(params, cfg):
    """AdamW (betas .9/.999, eps 1e-8): fused on CUDA (the seed's) and CPU, one kernel for all tensors (the demo
    UNet's step on one CPU core: 2.8 ms against 14.9 ms foreach); the foreach implementation elsewhere (fused AdamW
    builds on any device and fails only at its first step where it has no kernel, so the choice is made here)."""
    params = list(params)
    kw = dict(lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg["weight_decay"])
    if len({p.device.type for p in params}) == 1 and params[0].device.type in ("cuda", "cpu"):
        return torch.optim.AdamW(params, fused=True, **kw)
    return torch.optim.AdamW(params, foreach=True, **kw)


def grad_sync(model, fsdp, sync):
    """Skip the gradient all-reduce on accumulation micro-steps (DDP no_sync; FSDP2's switch)."""
    if fsdp:
        model.set_requires_gradient_sync(sync)
        return nullcontext()
    return model.no_sync() if hasattr(model, "no_sync") and not sync else nullcontext()


#################################################################################
#                                  Checkpoints                                  #
#################################################################################

CKPT_RE = re.compile(r"^step_(\d{8})\.pt$")


def checkpoint_path(out_dir, step):
    return Path(out_dir) / "checkpoints" / f"step_{step:08d}.pt"


def list_checkpoints(out_dir):
    """[(step, path)] of complete checkpoints, oldest first (temp files of interrupted writes are not matched)."""
    folder = Path(out_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := CKPT_RE.match(p.name))]
    return sorted(found)


def _full(t):
    """A full tensor from an FSDP2 shard (collective), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def rng_state():
    """This process's RNG states as tensors and plain types (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
            "python": random.getstate()}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), int(n[2]), int(n[3]), n[4]))
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))


def save_checkpoint(path, unet, optimizer, ema, names, scheduler, scaler, progress, meta, rank, keep_last):
    """Every rank joins (FSDP gathers, RNG states); rank 0 writes atomically and prunes old step checkpoints."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = {"unet": get_model_state_dict(unet, options=opts),
             "optimizer": get_optimizer_state_dict(unet, optimizer, options=opts),
             "ema": {n: _full(e).detach().cpu() for n, e in zip(names, ema)}}
    rngs = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, rng_state())
    if rank == 0:
        state.update(lr_scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), progress=progress, rng=rngs,
                     meta=meta)
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        if keep_last > 0:
            for _, old in list_checkpoints(path.parent.parent)[:-keep_last]:
                old.unlink()
    dist.barrier()


def load_checkpoint(ckpt, unet, optimizer, ema, names, scheduler, scaler, rank, world):
    """Restore everything save_checkpoint wrote (read by SD_Model.read_training_checkpoint); returns progress."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(unet, ckpt["unet"], options=opts)
    set_optimizer_state_dict(unet, optimizer, ckpt["optimizer"], options=opts)
    with torch.no_grad():
        for n, e in zip(names, ema):
            full = ckpt["ema"][n]
            e.copy_(_shard_like(full, e))
    scheduler.load_state_dict(ckpt["lr_scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    if len(ckpt["rng"]) == world:
        set_rng_state(ckpt["rng"][rank])
    elif rank == 0:
        print(f"note: checkpoint written by {len(ckpt['rng'])} ranks, resumed on {world}; RNG states not restored")
    return ckpt["progress"]


def _shard_like(full, like):
    """`full` placed as `like` is: this rank's shard for an FSDP2 DTensor, else the tensor on its device."""
    if hasattr(like, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(full.to(like.device), like.device_mesh, like.placements)
    return full.to(like.device)


def verified_checkpoint(path):
    """A training checkpoint that loads, has every part a resume restores and finite weights, or UserError."""
    ckpt = read_training_checkpoint(path)
    for part in ("unet", "ema"):
        bad = next((k for k, v in ckpt[part].items() if not torch.isfinite(v).all()), None)
        if bad is not None:
            raise UserError(f"'{path}' holds non-finite {part} weights ({bad})")
    return ckpt


def find_resume(cfg, say):
    """(path, checkpoint) to continue from, or (None, None) for a fresh start. `auto` takes the newest checkpoint
    of out_dir that verifies: one cut short by a full disk or a dead node costs only its own steps (and is
    left on disk, named, for a look)."""
    if not cfg["resume"]:
        return None, None
    if cfg["resume"] != "auto":
        return Path(cfg["resume"]), verified_checkpoint(cfg["resume"])
    for _, path in reversed(list_checkpoints(cfg["out_dir"])):
        try:
            return path, verified_checkpoint(path)
        except UserError as e:
            say(f"note: skipping checkpoint {path.name}, it does not verify ({e}); kept on disk")
    return None, None


# Options that fix the maths of every step (which sample, which noise, the loss, the update, the schedule): a
# resume that changes one is another run, unless named in --resume_override.
RUN_IDENTITY = ("seed", "datasets", "synthetic", "epoch_samples", "resolution", "cfg_dropout", "num_train_timesteps",
                "noise_offset", "beta_start", "beta_end", "beta_schedule", "prediction_type", "zero_terminal_snr",
                "flow_shift", "flow_t_density", "flow_logit_mean", "flow_logit_std", "loss_weighting", "min_snr_gamma",
                "ema_decay", "ema_every", "grad_clip", "lr", "warmup_steps", "weight_decay", "epochs", "batch_size",
                "grad_accum", "model", "text_encoder", "text_layer", "precision", "world_size", "buckets")


def check_same_run(path, meta, cfg, world, data_fingerprint=None):
    """A resume must continue the same run: every RUN_IDENTITY option as it was (or named in --resume_override)
    and, once the data is open, the same sample keys in every dataset (a fingerprint of the key lists)."""
    old = dict(meta["run_config"], data_fingerprint=meta.get("data_fingerprint"))
    new = dict(cfg, world_size=world, data_fingerprint=data_fingerprint)
    keys = ["data_fingerprint"] if data_fingerprint is not None else RUN_IDENTITY
    changed = {k: (old.get(k, OPTIONS[k][1] if k in OPTIONS else None), new[k]) for k in keys
               if old.get(k, OPTIONS[k][1] if k in OPTIONS else None) != new[k] and k not in cfg["resume_override"]}
    if changed:
        raise UserError(f"--resume {path}: that run differs in {changed} (then, now); resuming would not continue it. "
                        f"Name what you change on purpose with --resume_override '{'|'.join(changed)}', or start a "
                        "new phase from its weights with --init")


#################################################################################
#                                  Validation                                   #
#################################################################################

@torch.no_grad()
def validate(ema_unet, schedule, text, vae, val_mix, cfg, device, amp, step, out_dir, sizes=None):
    """EMA weights on rank 0: the validation loss at fixed timesteps and noise on held-out latents (one forward
    per aspect bucket), and the prompt grid sampled with DDIM + CFG (negative prompt as the unconditional branch,
    no x0 clamp) at each (width, height) of `sizes` (default: the square resolution), stacked into one PNG."""
    metrics = {}
    if val_mix is not None:
        per_source = -(-cfg["val_samples"] // len(val_mix.sources))             # the first ones of each dataset
        rows = np.concatenate([np.stack([np.full(min(n, per_source), s), np.arange(min(n, per_source))], 1)
                               for s, n in enumerate(val_mix.sizes)])[:cfg["val_samples"]]
        buckets = val_mix.bucket_of(rows)
        batches = []
        for b in np.unique(buckets):
            latents, ids = val_mix.read(rows[buckets == b])
            x0 = latents.to(device).float()
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).to(device)
            batches.append((x0, text.encode_ids(ids.to(device)), noise))
        losses = []
        for t in cfg["val_timesteps"]:
            per_sample = []
            for x0, context, noise in batches:
                tt = torch.full((len(x0),), t, device=device, dtype=schedule.t_dtype)   # flow: sigma = t / T
                with amp():
                    per_sample.append(diffusion_loss(ema_unet, schedule, x0, context, tt, noise)[0])
            metrics[f"val/loss_t{t}"] = torch.cat(per_sample).mean().item()
            losses.append(metrics[f"val/loss_t{t}"])
        metrics["val/loss"] = sum(losses) / len(losses)
    image_path = None
    if cfg["val_prompts"] and vae is not None:
        # The same sampler, seeds and CFG as SD_ImageGen.py, so a grid shows what the exported EMA will draw.
        grids = []
        for width, height in sizes or [(cfg["resolution"], cfg["resolution"])]:
            with amp():
                images = generate(Pipeline(ema_unet, text, vae, schedule), cfg["val_prompts"], cfg["negative_prompt"],
                                  cfg["val_ddim_steps"], cfg["val_cfg_scale"], seed=0, height=height, width=width)
            grids.append(make_grid(images, cols=min(4, len(images))))
        width = max(g.shape[1] for g in grids)                                   # one PNG: grids one under another
        image_path = Path(out_dir) / "samples" / f"step_{step:08d}.png"
        with atomic_path(image_path) as tmp:
            Image.fromarray(np.concatenate([np.pad(g, ((0, 0), (0, width - g.shape[1]), (0, 0))) for g in grids])
                            ).save(tmp, format="PNG")
    return metrics, image_path


#################################################################################
#                                    Logging                                    #
#################################################################################

def flops_per_sample(unet, shape, context_shape, device, amp):
    """Training FLOPs of one sample (forward + backward, no recompute), counted once with FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    ckpt, unet.grad_ckpt = unet.grad_ckpt, False
    x = torch.randn((1, *shape), device=device)
    with FlopCounterMode(display=False) as counter, amp:
        context = torch.randn((1, *context_shape), device=device)
        unet(x, torch.tensor([500], device=device), context).float().mean().backward()
    unet.grad_ckpt = ckpt
    unet.zero_grad(set_to_none=True)
    return counter.get_total_flops()


class LossWindow:
    """Training metrics averaged over the steps since the last log line: loss, mse per t quartile (guided-
    diffusion's diagnostic), lr, grad norm, img/s, and on CUDA MFU and peak memory."""

    def __init__(self, global_batch, world, cfg, device, flops, amp_dtype):
        self.G, self.world, self.device, self.flops, self.amp_dtype = global_batch, world, device, flops, amp_dtype
        self.peak = (cfg["peak_tflops"] or peak_tflops(device)) if device.type == "cuda" else 0.0
        self.reset()

    def reset(self):
        self.weighted, self.mse, self.n, self.t0 = 0.0, 0.0, 0, time.time()
        self.q_sum, self.q_n = torch.zeros(4), torch.zeros(4)

    def state(self):
        """The sums so far, saved with a checkpoint: a resumed run logs the averages the uninterrupted one does."""
        return {"weighted": self.weighted, "mse": self.mse, "n": self.n, "q_sum": self.q_sum.tolist(),
                "q_n": self.q_n.tolist(), "grad_norm": getattr(self, "grad_norm", 0.0), "lr": getattr(self, "lr", 0.0)}

    def load(self, state):
        self.weighted, self.mse, self.n = state["weighted"], state["mse"], state["n"]
        self.q_sum, self.q_n = torch.tensor(state["q_sum"]), torch.tensor(state["q_n"])
        self.grad_norm, self.lr = state["grad_norm"], state["lr"]

    def add(self, stats, grad_norm, lr):
        """One step's stats from train_step, as the floats apply_step read them."""
        self.weighted += stats[0]
        self.mse += stats[1]
        self.q_sum += torch.tensor(stats[2:6])
        self.q_n += torch.tensor(stats[6:10])
        self.n += 1
        self.grad_norm, self.lr = grad_norm, lr

    def flush(self, log, step, total_steps, epoch):
        img_s = self.n * self.G / (time.time() - self.t0)
        q = (self.q_sum / self.q_n).tolist()                                    # nan: no sample in that quartile
        values = {"train/loss": self.weighted / self.n, "train/mse": self.mse / self.n, "train/lr": self.lr,
                  "train/grad_norm": self.grad_norm, "train/img_per_s": img_s,
                  **{f"train/mse_q{i}": v for i, v in enumerate(q)}}
        line = (f"step {step}/{total_steps} | epoch {epoch} | loss {values['train/loss']:.4f} | mse "
                f"{values['train/mse']:.4f} (t quartiles {' '.join(f'{v:.3f}' for v in q)}) | lr {self.lr:.3e} | "
                f"grad {self.grad_norm:.3f} | {img_s:.1f} img/s")
        if self.device.type == "cuda":
            values["train/peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
            if self.peak and self.amp_dtype is not None:
                values["train/mfu"] = self.flops * img_s / self.world / (self.peak * 1e12)
                line += f" | MFU {100 * values['train/mfu']:.1f}%"
            line += f" | mem {values['train/peak_mem_gb']:.1f} GB"
        else:
            values["train/rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
            line += f" | rss {values['train/rss_gb']:.2f} GB"
        log.print(line)
        log.metrics(values, step)
        self.reset()


def pick_loggers(cfg):
    """(TensorBoard on, wandb mode or None) from --logger and the older --wandb MODE (whose online / offline alone
    still turns wandb on). A dashboard asked for whose package is missing is one line; `auto` only notes it."""
    import importlib.util
    logger, mode = cfg["logger"], cfg["wandb"]
    if logger in ("tensorboard", "none") and mode != "disabled":
        raise UserError(f"--wandb {mode} asks for wandb but --logger {logger} leaves it out; use --logger both or "
                        "wandb")
    tensorboard = logger in ("tensorboard", "both") or (logger == "auto" and importlib.util.find_spec("tensorboard"))
    wandb = logger in ("wandb", "both") or (logger == "auto" and mode != "disabled")
    for name, wanted in (("tensorboard", tensorboard), ("wandb", wandb)):
        if wanted and importlib.util.find_spec(name) is None:
            raise UserError(f"logging to {name} (--logger {logger}, --wandb {mode}) needs the {name} package: pip "
                            f"install {name}, or pick another --logger")
    return bool(tensorboard), (mode if mode != "disabled" else "online") if wandb else None


def draw_loss_curve(series, size=(900, 520)):
    """{name: [(step, value)]} as lines on a log-scale loss axis against the step: an RGB image drawn with PIL (no
    plotting package needed), for users with neither dashboard."""
    from PIL import ImageDraw, ImageFont
    w, h, left, right, top, bottom = *size, 72, 24, 40, 44
    img = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default(size=13)
    series = {k: [(s, v) for s, v in xs if math.isfinite(v) and v > 0] for k, xs in series.items()}
    points = [p for xs in series.values() for p in xs]
    draw.text((left, 12), "loss vs step (log scale)", fill="black", font=font)
    if not points:
        return img
    s0, s1 = min(p[0] for p in points), max(p[0] for p in points)
    lo, hi = (math.log10(f(p[1] for p in points)) for f in (min, max))
    lo, hi = lo - 0.05 * (hi - lo + 0.1), hi + 0.05 * (hi - lo + 0.1)
    x = lambda step: left + (step - s0) / max(s1 - s0, 1) * (w - left - right)     # noqa: E731
    y = lambda v: top + (hi - math.log10(v)) / (hi - lo) * (h - top - bottom)      # noqa: E731
    # y ticks: the decades inside the range, or 1, 2, 5 x 10^k, or every m x 10^k: the first with 3 or more
    for mantissas in ((1,), (1, 2, 5), range(1, 10)):
        ticks = [m * 10.0 ** k for k in range(math.floor(lo), math.ceil(hi) + 1) for m in mantissas
                 if lo <= math.log10(m * 10.0 ** k) <= hi]
        if len(ticks) >= 3:
            break
    for t in ticks:
        draw.line([(left, y(t)), (w - right, y(t))], fill=(225, 225, 225))
        draw.text((left - 6, y(t)), f"{t:g}", fill="black", font=font, anchor="rm")
    # x ticks: a 1, 2 or 5 x 10^k spacing giving at most ~8 labels
    span = max(s1 - s0, 1)
    step = next(m * 10 ** k for k in range(0, 12) for m in (1, 2, 5) if span / (m * 10 ** k) <= 8)
    for t in range(math.ceil(s0 / step) * step, s1 + 1, step):
        draw.line([(x(t), top), (x(t), h - bottom)], fill=(235, 235, 235))
        draw.text((x(t), h - bottom + 6), f"{t:,}", fill="black", font=font, anchor="mt")
    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    draw.text(((left + w - right) / 2, h - 16), "step", fill="black", font=font, anchor="mm")
    colors = [(31, 119, 180), (255, 127, 14), (214, 39, 40), (44, 160, 44)]
    for i, (name, xs) in enumerate(series.items()):
        color, xy = colors[i % len(colors)], [(x(s), y(v)) for s, v in xs]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        for px, py in xy if len(xy) <= 60 else []:                             # few points (validations): dots
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        draw.line([(w - right - 170, top + 14 + 18 * i), (w - right - 146, top + 14 + 18 * i)], fill=color, width=3)
        draw.text((w - right - 140, top + 14 + 18 * i), name, fill="black", font=font, anchor="lm")
    return img


class RunLog:
    """Rank 0's voice, in one place: stdout (through tqdm), train.log, metrics.jsonl (every logged value by step),
    loss_curve.png (redrawn at every validation), and the dashboards pick_loggers chose: TensorBoard event files in
    the run folder and/or wandb, each imported only when used. Every rank picks the dashboards first, so a missing
    package stops all of them with the same line. A resumed run (from `start_step`) drops from metrics.jsonl and
    hides in TensorBoard what the stopped run logged after its checkpoint: those steps are logged again."""
    METRICS, CURVE = "metrics.jsonl", "loss_curve.png"

    def __init__(self, cfg, rank, start_step=0):
        self.rank, self.wandb, self.tb = rank, None, None
        tensorboard, wandb_mode = pick_loggers(cfg)
        if rank != 0:
            return
        self.out = Path(cfg["out_dir"])
        self.file = open(self.out / "train.log", "a", buffering=1)
        self.history = [h for h in _read_jsonl(self.out / self.METRICS) if h["step"] <= start_step]
        write_atomic(self.out / self.METRICS, "".join(json.dumps(h) + "\n" for h in self.history))
        self.history_file = open(self.out / self.METRICS, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.out), purge_step=start_step + 1)    # hides steps > start_step
            self.tb.add_text("config", "    " + yaml.safe_dump(cfg, sort_keys=False).replace("\n", "\n    "),
                             start_step)
        elif cfg["logger"] == "auto":
            self.print("note: tensorboard is not installed: no TensorBoard events (pip install tensorboard)")
        if wandb_mode:
            import wandb
            id_file = self.out / "wandb_id.txt"      # one wandb run across resumes of this run
            if not id_file.exists():
                id_file.write_text(secrets.token_hex(4))
            self.wandb = wandb.init(project=cfg["wandb_project"], name=cfg["phase"], id=id_file.read_text(),
                                    resume="allow", mode=wandb_mode, dir=cfg["out_dir"], config=cfg)

    def print(self, msg):
        if self.rank == 0:
            tqdm.write(msg)
            self.file.write(msg + "\n")

    def metrics(self, values, step, image=None):
        """Scalars by step (and the validation grid): to metrics.jsonl and the dashboards; a validation's also
        redraws the loss curve."""
        if self.rank != 0:
            return
        self.history.append({"step": step, **values})
        self.history_file.write(json.dumps(self.history[-1]) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
            if image is not None:
                self.tb.add_image("val/images", np.asarray(Image.open(image).convert("RGB")), step, dataformats="HWC")
            self.tb.flush()
        if self.wandb is not None:
            import wandb
            if image is not None:
                values = dict(values, **{"val/images": wandb.Image(str(image))})
            self.wandb.log(values, step=step)
        if image is not None or any(k.startswith("val/") for k in values):
            curve = draw_loss_curve({name: [(h["step"], h[key]) for h in self.history if key in h] for name, key in
                                     (("train loss", "train/loss"), ("train mse", "train/mse"),
                                      ("val loss (mse)", "val/loss"))})
            with atomic_path(self.out / self.CURVE) as tmp:
                curve.save(tmp, format="PNG")

    def close(self):
        if self.rank == 0:
            self.file.close()
            self.history_file.close()
            if self.tb is not None:
                self.tb.close()
            if self.wandb is not None:
                self.wandb.finish()


def _read_jsonl(path):
    """The records of a JSON-lines file (none when it is missing; a line cut by a kill is skipped)."""
    out = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


#################################################################################
#                                     Main                                      #
#################################################################################

class StopSignals:
    """SIGTERM (a pod's preemption notice; torchrun forwards it to every rank), SIGINT (Ctrl-C) and SIGUSR1
    (SLURM's warning before the time limit) only set a flag: the loop finishes the optimizer step it is in, the
    ranks agree through that step's all-reduce, all of them join the checkpoint of that step, and the run exits
    non-zero with one line. A second signal during the save changes nothing (the flag is already set and the
    write is atomic)."""
    NAMES = ("SIGTERM", "SIGINT", "SIGUSR1")

    def __enter__(self):
        self.received = None
        self.previous = {name: signal.signal(getattr(signal, name), self._note) for name in self.NAMES}
        return self

    def _note(self, signum, frame):
        self.received = self.received or signal.Signals(signum).name

    def __exit__(self, *exc):
        for name, handler in self.previous.items():
            signal.signal(getattr(signal, name), handler)


def setup_distributed(cfg):
    """(rank, world, device): torchrun's env when present, else a one-process group, so every code path
    (collectives included) is the same with 1 or N processes. NCCL on CUDA, gloo on CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cfg["device"] == "auto":                      # training runs on CUDA or CPU (no MPS: no NCCL/gloo there)
        device = pick_device("cuda" if torch.cuda.is_available() else "cpu", index=local_rank)
    else:
        device = pick_device(cfg["device"], index=local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), device


def main(args):
    cfg = resolve_config(args)
    dry_steps = None
    if args.dry_run is not None:
        dry_steps = int(args.dry_run) if args.dry_run.isdigit() else 0
        if dry_steps < 1:
            raise UserError(f"--dry_run STEPS: how many steps to time, at least 1 (got {args.dry_run!r})")
    rank, world, device = setup_distributed(cfg)
    try:
        with StopSignals() as stop:
            if dry_steps:
                dry_run(cfg, rank, world, device, stop, dry_steps)
            else:
                train(cfg, rank, world, device, stop)
    finally:
        dist.destroy_process_group()


def plan_run(cfg, world, device, say):
    """Batch arithmetic, precision, where the run starts (resume / init / scratch) and the UNet config: a
    checkpoint's own config wins over the phase's named one."""
    if not cfg["datasets"] and not cfg["synthetic"]:
        raise UserError(f"phase '{cfg['phase']}' names no datasets; pass --datasets LATENTS:CAPTIONS or --synthetic N")
    if cfg["global_batch"]:
        if cfg["global_batch"] % (cfg["batch_size"] * world):
            raise UserError(f"global_batch {cfg['global_batch']} is not a multiple of batch_size x GPUs = "
                            f"{cfg['batch_size']} x {world}")
        cfg["grad_accum"] = cfg["global_batch"] // (cfg["batch_size"] * world)
    run = SimpleNamespace(B=cfg["batch_size"], A=cfg["grad_accum"], world=world, device=device)
    run.G = run.B * run.A * world
    run.precision = cfg["precision"] if cfg["precision"] != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    run.amp_dtype = None if run.precision == "fp32" else pick_dtype(device, run.precision)
    run.amp = lambda: torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None)
    run.resume_path, run.resume = find_resume(cfg, say)
    if run.resume is not None:
        check_same_run(run.resume_path, run.resume["meta"], cfg, world)
        run.model_cfg, run.init_sd, run.init_meta = unet_config(run.resume["meta"]["model_config"]), None, \
            run.resume["meta"]
    elif cfg["init"] == "scratch":
        run.model_cfg, run.init_sd, run.init_meta = unet_config(cfg["model"]), None, {}
    else:
        run.init_sd, run.model_cfg, run.init_meta = read_unet_state(cfg["init"])
    return run


def open_text_encoder(cfg, run, device):
    """The frozen text encoder, checked against the UNet's cross-attention width."""
    text = FrozenTextEncoder(cfg["text_encoder"], device=device, dtype=run.amp_dtype if device.type == "cuda"
                             else torch.float32, layer=cfg["text_layer"])
    run.tokens = text.max_length
    if text.context_dim != run.model_cfg.context_dim:
        raise UserError(f"text encoder '{cfg['text_encoder']}' gives {text.context_dim}-d context but the UNet "
                        f"cross-attends to {run.model_cfg.context_dim}-d; pick the matching --text_encoder or --model")
    return text


def open_data(cfg, run, text, show):
    """The phase's training and validation latents (or synthetic ones), checked against each other, the text
    encoder and the start weights: every check that can fail runs here, before any GPU work."""
    pool = ThreadPoolExecutor(cfg["loader_threads"])
    res, channels = cfg["resolution"], run.model_cfg.in_channels
    if cfg["synthetic"]:                             # latents of SD's VAE (8x down): no VAE needed to make them
        sizes = aspect_buckets(res, 8 * BUCKET_LATENT_MULTIPLE) if cfg["buckets"] else [(res, res)]
        shapes = [(channels, h // 8, w // 8) for w, h in sizes]
        sources = [synthetic_source(cfg["synthetic"], shapes, sizes, text, cfg["seed"], "synthetic")]
        val_sources = [synthetic_source(max(cfg["val_samples"], 1), shapes, sizes, text, cfg["seed"] + 1,
                                        "synthetic-val")]
        ratios, vae_id, scaling_factor = [1.0], cfg["vae"] or DEFAULT_VAE, run.init_meta.get("scaling_factor")
    else:
        sources, val_sources = [], []
        for spec in cfg["datasets"]:
            source, dropped, orphans = open_source(spec, "train", res, channels, text, cfg["buckets"])
            sources.append(source)
            if show and dropped:
                print(f"note: {dropped} captions in '{spec['captions']}' have no latent in '{spec['latents']}'; skipped")
            if show and orphans:
                print(f"note: {orphans} latents in '{spec['latents']}' have no caption in '{spec['captions']}'; not "
                      "trained on (rerun 04 and 05 on the same tars as encode_latents)")
            if show and cfg["buckets"] and "buckets" not in source.info:
                print(f"note: '{spec['latents']}' holds square latents (encoded without --buckets): its "
                      f"{len(source):,} samples train as the {res}x{res} bucket")
            try:
                val_sources.append(open_source(spec, "validation", res, channels, text, cfg["buckets"])[0])
            except UserError as e:
                if show:
                    print(f"note: no validation latents from '{spec['latents']}' ({e})")
        ratios = [spec["ratio"] for spec in cfg["datasets"]]
        latent_spaces = {(s.info.get("vae"), s.info.get("scaling_factor")) for s in sources}
        if len(latent_spaces) > 1:
            raise UserError("the datasets were encoded by different VAEs / scaling factors "
                            f"{sorted(map(str, latent_spaces))}; one model trains in one latent space")
        vae_id, scaling_factor = latent_spaces.pop()
        vae_id = cfg["vae"] or vae_id
    for s in sources:
        if s.ids.max() >= text.model.config.vocab_size:
            raise UserError(f"token ids in '{s.name}' reach {s.ids.max()} but '{cfg['text_encoder']}' has "
                            f"{text.model.config.vocab_size}; the captions were tokenized for another text encoder")
    init_sf = run.init_meta.get("scaling_factor")
    if None not in (init_sf, scaling_factor) and init_sf != scaling_factor:
        raise UserError(f"--init weights were trained on latents x {init_sf} ('{run.init_meta.get('vae')}'), these "
                        f"datasets are x {scaling_factor} ('{vae_id}')")
    mix = LatentMix(sources, ratios, cfg["epoch_samples"], pool, cfg["buckets"])
    steps_per_epoch = mix.steps_per_epoch(run.G)     # from the loader, after grad accumulation (the seed's bug)
    if steps_per_epoch == 0:
        raise UserError(f"an epoch of {len(mix)} samples is less than one optimizer step of {run.G} samples "
                        f"(batch_size {run.B} x grad_accum {run.A} x {run.world} GPUs)" +
                        (" in any one aspect bucket" if cfg["buckets"] else ""))
    if show and cfg["buckets"]:
        counts = mix.bucket_counts().sum(0)
        print(f"aspect buckets: {len(mix.shapes)} | " + ", ".join(
            f"{'x'.join(map(str, mix.pixels[sh]))} {c:,}" for sh, c in zip(mix.shapes, counts)) + " samples/epoch | "
            f"{int((counts % run.G).sum()):,} left over after whole steps of {run.G}, dropped each epoch")
    val_mix = LatentMix(val_sources, [1.0] * len(val_sources), 0, pool, cfg["buckets"]) if val_sources else None
    fingerprint = hashlib.sha256()                   # the sample keys of every dataset: a resume needs the same
    for s in sources + val_sources:
        fingerprint.update(f"{s.name}:{len(s)}\n".encode() + "\n".join(s.keys or []).encode())
    return SimpleNamespace(mix=mix, val_mix=val_mix, pool=pool, shape=max(mix.shapes, key=math.prod), vae_id=vae_id,
                           scaling_factor=scaling_factor, steps_per_epoch=steps_per_epoch,
                           total_steps=cfg["epochs"] * steps_per_epoch, sources=sources + val_sources,
                           fingerprint=fingerprint.hexdigest()[:16], grid_sizes=grid_sizes(mix))


def grid_sizes(mix):
    """(width, height) of the validation grids: the square one, or with buckets the training data's most common
    landscape and portrait buckets (either one alone when the data has no other)."""
    if not mix.bucketed:
        return [mix.pixels[mix.shapes[0]]]
    counts = mix.bucket_counts().sum(0)
    sizes = [mix.pixels[sh] for sh in mix.shapes]
    found = []
    for wide in (True, False):
        ranked = [(c, size) for c, size in zip(counts, sizes) if c and (size[0] > size[1]) == wide and
                  size[0] != size[1]]
        found += [max(ranked)[1]] if ranked else []
    return found or [sizes[int(counts.argmax())]]


def build_model(cfg, run, data, device, world):
    """The UNet (same seed on every rank -> same init; DDP also broadcasts it), wrapped for DDP or FSDP2, and its
    fp32 EMA (beside it, sharded like the params under FSDP, or in host memory: EMA)."""
    torch.manual_seed(cfg["seed"])
    unet = build_unet(run.model_cfg, run.init_sd, source=f"--init '{cfg['init']}'").to(device)
    unet.set_grad_checkpointing(cfg["grad_checkpointing"])
    if cfg["channels_last"]:
        unet.to(memory_format=torch.channels_last)
    flops = flops_per_sample(unet, data.shape, (run.tokens, run.model_cfg.context_dim), device, run.amp()) \
        if device.type == "cuda" else None
    if cfg["compile"]:
        if cfg["buckets"]:
            # One static graph per aspect bucket (dynamic=False: the kernels a fixed shape gets; the compile cost per
            # bucket is in bench/buckets.py). Dynamo's default limit of 8 graphs per function would run every bucket
            # past the 8th uncompiled, with only a warning.
            from torch._dynamo import config as dynamo
            dynamo.recompile_limit = max(dynamo.recompile_limit, 2 * len(data.mix.shapes))
        unet.compile(dynamic=False if cfg["buckets"] else None)   # in place: parameter names stay clean
    if cfg["fsdp"]:
        from torch.distributed.fsdp import fully_shard
        for m in unet.modules():                     # shard per block, then the rest at the root
            if type(m).__name__ in ("ResBlock", "SpatialTransformer"):
                fully_shard(m)
        model = fully_shard(unet)
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(unet, device_ids=[device.index] if device.type == "cuda" else None,
                    gradient_as_bucket_view=True, find_unused_parameters=False)
    else:
        model = unet
    names, params = zip(*[(n, p.detach()) for n, p in unet.named_parameters()])
    ema = EMA(params, cfg["ema_device"], cfg["ema_every"], cfg["ema_decay"])
    return SimpleNamespace(unet=unet, model=model, names=names, params=params, ema=ema, flops=flops)


def train_step(net, micro, text, uncond, schedule, scaler, cfg, run, stop):
    """One optimizer step's forward and backward passes over its micro-batches (gradients synced on the last).
    Returns stats summed over ranks: [weighted loss, mse, mse sum per t quartile (4), count per quartile (4),
    ranks asked to stop] (the stop flag rides on the step's one all-reduce, so all ranks stop after one step)."""
    stats = torch.zeros(11, device=run.device)
    for a, mb in enumerate(micro):
        x0 = mb["latents"].to(run.device, non_blocking=True).float()
        noise = mb["noise"].to(run.device, non_blocking=True)
        t = mb["t"].to(run.device, non_blocking=True)
        if cfg["channels_last"]:
            x0, noise = (z.contiguous(memory_format=torch.channels_last) for z in (x0, noise))
        with grad_sync(net.model, cfg["fsdp"], sync=a == run.A - 1):
            with run.amp():
                context = apply_cfg_dropout(text.encode_ids(mb["ids"].to(run.device, non_blocking=True)), uncond,
                                            mb["drop"].to(run.device, non_blocking=True))
                per_sample, weight = diffusion_loss(net.model, schedule, x0, context, t, noise,
                                                    cfg["loss_weighting"], cfg["min_snr_gamma"])
                loss = (per_sample * weight).mean() / run.A
            scaler.scale(loss).backward()
        quartile = (t * 4 // cfg["num_train_timesteps"]).long().clamp(max=3)   # flow's t is a float
        stats[0] += loss.detach()
        stats[1] += per_sample.detach().mean() / run.A
        stats[2:6].index_add_(0, quartile, per_sample.detach().float())
        stats[6:10].index_add_(0, quartile, torch.ones_like(per_sample))
    stats[10] = float(stop.received is not None)
    dist.all_reduce(stats)
    stats[:2] /= run.world
    return stats


def apply_step(net, optimizer, scaler, stats, step, cfg):
    """Clip, then step the optimizer and the EMA unless the loss or gradients are non-finite. fp16: the scaler
    skips inf/nan gradients itself (and lowers its scale), and the EMA skips with it. Returns (train_step's stats
    as floats, grad norm, whether the step was taken): their one copy to the host is the loop's one host sync per
    step (bf16, fp32; fp16's scaler adds its own), made before the optimizer and EMA kernels are queued."""
    scaler.unscale_(optimizer)
    grad_norm = _full(torch.nn.utils.clip_grad_norm_(net.unet.parameters(), cfg["grad_clip"]))
    *stats, grad_norm = torch.cat([stats, grad_norm.reshape(1).to(stats)]).tolist()
    ok = math.isfinite(stats[0]) and (math.isfinite(grad_norm) or scaler.is_enabled())
    scale = scaler.get_scale()                       # 1.0 without fp16's scaler
    if ok:
        net.ema.before_params_change()
        scaler.step(optimizer)
    scaler.update()                                  # also after a skipped step: unscale_ needs a fresh update
    if ok and scaler.get_scale() >= scale:           # a lowered scale: the scaler skipped the step (inf/nan grads)
        net.ema.update(step)
    optimizer.zero_grad(set_to_none=True)
    return stats, grad_norm, ok


def checkpoint_bytes(n_params):
    """The size of one training checkpoint: UNet + EMA + AdamW's two moments, fp32 (16 bytes a parameter), plus
    ~2% for the rest (progress, RNG states, meta)."""
    return 16 * n_params * 1.02


def check_disk(out_dir, n_params):
    """One line before training when out_dir's disk cannot hold the next checkpoint, rather than a failed save
    hours later."""
    import shutil
    need, free = checkpoint_bytes(n_params), shutil.disk_usage(out_dir).free
    if free < need:
        raise UserError(f"'{out_dir}' has {free / 1e9:.2f} GB free but one checkpoint of this UNet takes "
                        f"{need / 1e9:.2f} GB; free space or pick another --out_dir")


def ema_state(net):
    """The EMA weights as full CPU tensors (every rank joins the FSDP gathers)."""
    return {n: _full(e).detach().cpu() for n, e in zip(net.names, net.ema.tensors)}


def validate_ema(net, run, data, text, vae, schedule, cfg, step, out_dir, log, rank):
    """validate() on a UNet holding the EMA weights, on rank 0, logged; the other ranks wait."""
    if data.val_mix is None and vae is None:
        return
    full = ema_state(net)
    if rank == 0:
        with torch.random.fork_rng(devices=[]):      # building the EMA UNet draws init weights: keep the run's RNG
            ema_unet = build_unet(run.model_cfg, full).to(run.device).eval()
        metrics, image = validate(ema_unet, schedule, text, vae, data.val_mix, cfg, run.device, run.amp, step,
                                  out_dir, data.grid_sizes)
        log.print(f"validation at step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()) +
                  (f" | grid {image}" if image else ""))
        log.metrics(metrics, step, image)
    dist.barrier()


def train(cfg, rank, world, device, stop):
    configure_cuda_backends()
    show = rank == 0
    say = (lambda msg: print(msg, flush=True)) if show else (lambda msg: None)
    out_dir = check_writable(cfg["out_dir"], "--out_dir")   # every rank checks, so all stop with the same line

    # Setup: where the run starts, the frozen text encoder and the data (every check before any GPU work).
    run = plan_run(cfg, world, device, say)
    text = open_text_encoder(cfg, run, device)
    data = open_data(cfg, run, text, show)
    if run.resume is not None:
        check_same_run(run.resume_path, run.resume["meta"], cfg, world, data.fingerprint)
    vae = None
    if show and cfg["val_prompts"]:
        vae = FrozenVAE(data.vae_id, device=device, dtype=run.amp_dtype if device.type == "cuda" else torch.float32)
        data.scaling_factor = data.scaling_factor if data.scaling_factor is not None else vae.scaling_factor
    schedule = NoiseSchedule.from_dict(cfg)
    meta = checkpoint_meta(run.model_cfg, schedule, data.vae_id, data.scaling_factor, cfg["text_encoder"],
                           cfg["text_layer"], cfg["resolution"], dict(cfg, world_size=world))
    meta["data_fingerprint"] = data.fingerprint

    # Run folder: partial checkpoints of a write that was killed (up to ~13 GB each) go, the config is saved.
    if show:
        (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        for tmp in [*(out_dir / "checkpoints").glob(".step_*.pt.tmp*"), *out_dir.glob(".ema_final.safetensors.tmp*")]:
            if tmp.is_file():
                tmp.unlink()
        write_atomic(out_dir / "config.yaml", yaml.safe_dump(meta["run_config"], sort_keys=False))
        print(f"resolved config of phase '{cfg['phase']}':\n" + yaml.safe_dump(meta["run_config"], sort_keys=False))
    dist.barrier()
    log = RunLog(cfg, rank, run.resume["progress"]["step"] if run.resume is not None else 0)
    for s in data.sources:
        if s.root is not None:                       # synthetic sources are born in RAM
            s.load_into_ram(cfg["latent_fraction"], data.pool, show)

    # Model + EMA, optimizer, LR schedule, loss scaler; then the resume point.
    net = build_model(cfg, run, data, device, world)
    check_disk(out_dir, sum(p.numel() for p in net.params))
    optimizer = build_optimizer(net.unet.parameters(), cfg)
    scheduler = build_lr_scheduler(optimizer, cfg["lr"], cfg["warmup_steps"], data.total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=run.precision == "fp16")
    uncond = text.encode([""])                                                  # (1, 77, D)
    progress = {"epoch": 0, "batch": 0, "step": 0, "bad_steps": 0, "window": None}
    if run.resume is not None:
        progress = load_checkpoint(run.resume, net.unet, optimizer, net.ema.tensors, net.names, scheduler, scaler,
                                   rank, world)
        log.print(f"resumed from {run.resume_path} at step {progress['step']} (epoch {progress['epoch']}, "
                  f"batch {progress['batch']})")
        run.resume = None                            # the memory-mapped file is not needed any more
    epoch, first_step, step, bad_total = progress["epoch"], progress["batch"], progress["step"], progress["bad_steps"]
    log.print(f"{sum(p.numel() for p in net.params):,} UNet parameters | {len(data.mix):,} samples/epoch | global "
              f"batch {run.G} ({run.B} x {run.A} accum x {world} ranks) | {data.steps_per_epoch} steps/epoch x "
              f"{cfg['epochs']} epochs = {data.total_steps} steps | {run.precision} on {device.type}")

    def save(progress):
        path = checkpoint_path(out_dir, step)
        save_checkpoint(path, net.unet, optimizer, net.ema.tensors, net.names, scheduler, scaler, progress, meta,
                        rank, cfg["keep_last"])
        log.print(f"saved {path}")

    # The loop: one optimizer step per iteration; per-sample randomness comes with the batch.
    max_steps = min(cfg["max_steps"] or data.total_steps, data.total_steps)
    bar = tqdm(total=max_steps, initial=step, disable=not show, desc=cfg["phase"], unit="step", dynamic_ncols=True)
    window = LossWindow(run.G, world, cfg, device, net.flops, run.amp_dtype)
    if progress.get("window"):
        window.load(progress["window"])
    bad_in_row = 0
    while epoch < cfg["epochs"] and step < max_steps:
        order = data.mix.epoch_order(cfg["seed"], epoch, run.G)
        batches = step_batches(data.mix, order, first_step, cfg, world, rank, epoch, schedule.draw_train_t,
                               pin=device.type == "cuda")
        for p, micro in prefetch(batches):
            net.model.train()
            stats = train_step(net, micro, text, uncond, schedule, scaler, cfg, run, stop)
            lr = optimizer.param_groups[0]["lr"]      # the LR this step uses
            stats, grad_norm, ok = apply_step(net, optimizer, scaler, stats, step, cfg)
            bad_in_row, bad_total = (0, bad_total) if ok else (bad_in_row + 1, bad_total + 1)
            if not ok:
                log.print(f"step {step + 1}: non-finite loss {stats[0]} / grad norm {grad_norm}; step skipped "
                          f"({bad_in_row} in a row, {bad_total} in all)")
                if bad_in_row >= cfg["max_bad_steps"]:
                    # a checkpoint of step k is good when step k + 1's loss, computed from its weights, was finite
                    first_bad = step + 2 - bad_in_row
                    good = [path for s, path in list_checkpoints(out_dir) if s <= first_bad - 2]
                    raise UserError(f"{bad_in_row} non-finite losses in a row (steps {first_bad}-{step + 1}); stopped "
                                    f"without saving. Last good checkpoint: {good[-1] if good else 'none'}. Lower "
                                    "--lr or check the data, then --resume it")
            scheduler.step()
            step += 1
            bar.update(1)

            # Bookkeeping: log, checkpoint, stop if asked, validate as due.
            window.add(stats, grad_norm, lr)
            epoch_done = p + 1 == data.steps_per_epoch
            if step % cfg["log_every"] == 0 or step == max_steps:
                window.flush(log, step, data.total_steps, epoch)
            progress = {"epoch": epoch + 1 if epoch_done else epoch, "batch": 0 if epoch_done else p + 1,
                        "step": step, "bad_steps": bad_total, "window": window.state()}
            stopping = stats[10] > 0
            if epoch_done or (cfg["save_steps"] and step % cfg["save_steps"] == 0) or step >= max_steps or stopping:
                if bad_in_row == 0:
                    save(progress)
                else:                                # mid-streak state must not prune the good checkpoints
                    log.print(f"checkpoint at step {step} not written: the step was skipped (non-finite loss)")
            if stopping:
                found = list_checkpoints(out_dir)
                raise UserError(f"stopped by {stop.received or 'a signal to another rank'} at step {step}; "
                                f"checkpoint {found[-1][1] if found else 'none'}; continue with --resume auto")
            if epoch_done or (cfg["val_steps"] and step % cfg["val_steps"] == 0):
                validate_ema(net, run, data, text, vae, schedule, cfg, step, out_dir, log, rank)
            if step >= max_steps:
                break
        if (progress["epoch"], progress["batch"]) == (epoch, first_step):   # nothing was left of this epoch
            progress = dict(progress, epoch=epoch + 1, batch=0)
        epoch, first_step = progress["epoch"], progress["batch"]
    bar.close()

    # Phase end: a slim export of the EMA weights (fp16 safetensors) for inference and the next phase's --init.
    export = out_dir / "ema_final.safetensors"
    full = ema_state(net)
    if rank == 0:
        save_unet({k: v.half() for k, v in full.items()}, run.model_cfg, export, "ours", meta)
        log.print(f"done at step {step}: exported EMA weights to {export}")
    dist.barrier()
    net.ema.close()
    log.close()
    data.pool.shutdown()


#################################################################################
#                                    Dry Run                                    #
#################################################################################

def dry_run(cfg, rank, world, device, stop, steps):
    """--dry_run: what a phase will cost, before it starts. The phase is resolved, its datasets opened and its model
    built as train() does, `steps` optimizer steps timed on synthetic batches of the phase's shape and batch, and
    the plan printed: samples, steps, global batch, img/s, hours, memory, disk. Writes nothing (no run folder)."""
    configure_cuda_backends()
    show = rank == 0
    run = plan_run(cfg, world, device, (lambda msg: print(msg, flush=True)) if show else (lambda msg: None))
    start = run.resume["progress"]["step"] if run.resume is not None else 0
    run.resume = None                                # only its step is needed
    text = open_text_encoder(cfg, run, device)
    data = open_data(cfg, run, text, show)
    net = build_model(cfg, run, data, device, world)
    n_params = sum(p.numel() for p in net.params)
    sec = time_steps(net, run, data, text, cfg, world, rank, device, stop, steps)
    data.pool.shutdown()

    # The plan. Hours: the steps left at the measured speed (validation and checkpoint writes not counted).
    per_rank = run.G / sec / world
    hours = lambda h: f"{h:,.2f} h" + (f" ({60 * h:.1f} min)" if h < 1 else "")      # noqa: E731
    last = min(cfg["max_steps"] or data.total_steps, data.total_steps)
    saves = checkpoints_written(cfg, data.steps_per_epoch, start, last)
    kept = min(saves, cfg["keep_last"] + 1) if cfg["keep_last"] else saves          # + the one being written
    need = kept * checkpoint_bytes(n_params) + 2 * n_params                         # + the fp16 EMA export
    where = Path(cfg["out_dir"]).absolute()
    while not where.exists():                        # the out_dir's disk, without creating out_dir
        where = where.parent
    import shutil
    free = shutil.disk_usage(where).free
    if device.type == "cuda":
        memory = f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.1f} GB peak allocated (" \
                 f"{torch.cuda.get_device_name(device)})"
        peak = cfg["peak_tflops"] or peak_tflops(device)
        mfu = f"{100 * net.flops * per_rank / (peak * 1e12):.1f}%" if peak and run.amp_dtype is not None else "n/a"
    else:
        memory, mfu = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GB RSS (CPU)", "n/a (CPU)"
    rows = [("UNet parameters", n_params), *[(f"dataset {s.name}", len(s)) for s in data.mix.sources],
            ("samples per epoch", len(data.mix)),
            ("global batch", f"{run.G} ({run.B} x {run.A} accum x {world} ranks)"),
            ("steps", f"{data.steps_per_epoch:,}/epoch x {cfg['epochs']} epochs = {data.total_steps:,}" +
             (f", stop at {last:,}" if last < data.total_steps else "") +
             (f", resuming at {start:,}" if start else "")),
            ("step time", f"{sec:.3f} s (median of {steps}, {run.precision} on {device.type})"),
            ("img/s", f"{run.G / sec:,.1f} ({per_rank:,.1f} per rank)"),
            ("MFU", mfu),
            ("estimated hours", f"{hours((last - start) * sec / 3600)} for {last - start:,} steps"),
            ("memory", memory),
            ("checkpoints", f"{checkpoint_bytes(n_params) / 1e9:.2f} GB each, {saves} written, {kept} on disk at "
                            f"once (keep_last {cfg['keep_last']})"),
            ("disk needed", f"{need / 1e9:.2f} GB (checkpoints + {2 * n_params / 1e9:.2f} GB EMA export)"),
            ("disk free", f"{free / 1e9:.2f} GB at {where}: " + ("room enough" if free >= need else
                                                                f"NOT ENOUGH, {(need - free) / 1e9:.2f} GB short") +
             ("" if where.is_dir() and os.access(where, os.W_OK) else " (but not a folder this user can write)"))]
    # The same phase on other GPU counts of this kind, at this speed per rank (linear scaling assumed); a phase
    # with a global_batch keeps it (grad_accum follows the count), others keep batch_size x grad_accum per rank.
    unit, scaled = "GPU" if device.type == "cuda" else "process", []
    for ranks in sorted({1, 2, 4, 8, world}):
        accum, rest = divmod(cfg["global_batch"], run.B * ranks) if cfg["global_batch"] else (run.A, 0)
        if accum < 1 or rest:                        # that count cannot make the phase's global batch
            continue
        batch = run.B * accum * ranks
        total = cfg["epochs"] * data.mix.steps_per_epoch(batch)
        left = min(cfg["max_steps"] or total, total) - start
        scaled.append((f"{ranks} {unit}{'es' if unit == 'process' and ranks > 1 else 's' if ranks > 1 else ''}: "
                       f"global batch {batch}, {left:,} steps", hours(left * batch / (per_rank * ranks) / 3600)))
    if show:
        print_summary(f"dry run of phase '{cfg['phase']}' (nothing written)", rows)
        print_summary(f"estimated hours by {unit} count (this speed per {unit}, linear scaling assumed)", scaled)
        if device.type == "cpu":
            print("note: these are CPU figures (timed on this machine's CPU); run --dry_run on the training GPU "
                  "for its speed and memory", flush=True)


def time_steps(net, run, data, text, cfg, world, rank, device, stop, steps):
    """Median seconds of `steps` optimizer steps after one warm-up step (cuDNN autotune, compile): the real
    batching, loss, backward, clip, AdamW and EMA update, on one global batch of random latents of the datasets'
    shape (with buckets: the largest bucket's, so an upper bound) seen steps + 1 times (a step's speed does not
    depend on the values)."""
    optimizer = build_optimizer(net.unet.parameters(), cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=run.precision == "fp16")
    schedule, uncond = NoiseSchedule.from_dict(cfg), text.encode([""])
    fake = LatentMix([synthetic_source(run.G, [data.shape], [data.mix.pixels[data.shape]], text, cfg["seed"],
                                       "dry-run")], [1.0], 0, data.pool)
    order = np.tile(fake.epoch_order(cfg["seed"], 0, run.G), (steps + 1, 1))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i, (_, micro) in enumerate(step_batches(fake, order, 0, cfg, world, rank, 0, schedule.draw_train_t,
                                                pin=device.type == "cuda")):
        t0 = time.perf_counter()
        net.model.train()
        stats = train_step(net, micro, text, uncond, schedule, scaler, cfg, run, stop)
        apply_step(net, optimizer, scaler, stats, i, cfg)                        # its .item() waits for the GPU
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times[1:]) // 2]


def checkpoints_written(cfg, steps_per_epoch, start, last):
    """How many checkpoints steps start+1..last write: at epoch ends, every save_steps and at the last step."""
    if last <= start:
        return 0
    ends = {e * steps_per_epoch for e in range(1, cfg["epochs"] + 1) if start < e * steps_per_epoch <= last} | {last}
    every = cfg["save_steps"]
    return len(ends) + (last // every - start // every - sum(s % every == 0 for s in ends) if every else 0)


def build_parser():
    parser = arg_parser(__doc__)
    parser.add_argument("--phase", default="tiny", help="phase in configs/phases.yaml whose values fill the options")
    parser.add_argument("--phases_file", default=str(PHASES_FILE.relative_to(REPO)),
                        help="the phases file (relative paths start at the repo root)")
    parser.add_argument("--dry_run", nargs="?", const="5", default=None, metavar="STEPS",
                        help="print the phase's plan (samples, steps, img/s from STEPS timed steps, hours, memory, "
                             "disk) and exit, writing nothing")
    for name, (_, default, help_text, *choices) in OPTIONS.items():
        shown = "|".join(default) if isinstance(default, list) and default and isinstance(default[0], str) else default
        parser.add_argument(f"--{name}", default=argparse.SUPPRESS, metavar=name.upper(),
                            help=f"{help_text} [default: {shown!r}; phases may set it]" +
                                 (f" {{{','.join(choices[0])}}}" if choices else ""))
    return parser


def parse_args(argv=None):
    """Flags -> namespace; an unknown flag is refused with the closest known one (no silent typos)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next(u for u in unknown if u.startswith("--")) if any(u.startswith("--") for u in unknown) else unknown[0]
        raise _unknown(flag.lstrip("-").split("=")[0], "command line")
    args.phases_file = REPO / args.phases_file if not Path(args.phases_file).is_absolute() else Path(args.phases_file)
    return args


if __name__ == "__main__":
    faulthandler.enable()                            # a native crash (segfault in a kernel, a library) prints
    run_main(lambda argv: main(parse_args(argv)), None)   # every thread's Python stack: days-long jobs need it
