"""Train the SD UNet on precomputed latents: one script for every phase (configs/phases.yaml), DDP or FSDP2
under torchrun, checkpoints that resume the same run bit for bit.

    python SD_Train.py --phase tiny --synthetic 64                 # one process, no data needed
    torchrun --nproc_per_node=2 SD_Train.py --phase phase1 --resume auto
    torchrun --nnodes=4 --node_rank=R --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        SD_Train.py --phase sd15 --init runs/sd12/ema_final.safetensors

Reads top to bottom: config (phases + flags) -> data (latents + captions, mixed, sharded, per-sample noise) ->
loss, EMA, LR schedule -> checkpoints -> validation -> logging -> main(args) -> argparse.
"""
import os

# Before torch touches CUDA: expandable segments stop the allocator fragmenting when activation shapes vary
# between steps (the seed's setting); setdefault keeps a user's own choice.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse
import difflib
import faulthandler
import math
import random
import re
import resource
import secrets
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, fields
from pathlib import Path
from queue import Queue

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from PIL import Image

from SD_Model import (DEFAULT_TEXT_ENCODER, DEFAULT_VAE, FrozenTextEncoder, FrozenVAE, NoiseSchedule, Pipeline,
                      UserError, _atomic, build_unet, configure_cuda_backends, generate, make_grid, peak_tflops,
                      read_unet_state, save_unet, unet_config)
from sd_data import existing_latent_keys, latent_path, load_latent_info, open_captions

REPO = Path(__file__).resolve().parent
PHASES_FILE = REPO / "configs" / "phases.yaml"
TOKENS = 77                                          # CLIP's context length: every caption is 77 token ids

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
    "resume": (str, "", "'auto' (latest checkpoint in out_dir, or a fresh start when there is none) or a "
                        "checkpoint path: continue that run exactly"),
    # model and frozen parts
    "model": (str, "sd1", "UNet config name from SD_Model.UNET_CONFIGS (a checkpoint's own config wins)"),
    "text_encoder": (str, DEFAULT_TEXT_ENCODER["sd1"], "frozen CLIP text encoder: hub id or local folder"),
    "text_layer": (str, "last", "context from the last layer (SD1) or the penultimate one (SD2, OpenCLIP-H)",
                   ("last", "penultimate")),
    "vae": (str, "", "VAE for validation images ('' -> the one named in the latents' latent_info.json)"),
    # noise schedule (SD_Model.NoiseSchedule)
    "num_train_timesteps": (_int, 1000, "diffusion timesteps"),
    "beta_start": (_float, 0.00085, "first beta"),
    "beta_end": (_float, 0.012, "last beta"),
    "beta_schedule": (str, "scaled_linear", "beta schedule", ("scaled_linear", "linear", "squaredcos_cap_v2")),
    "prediction_type": (str, "epsilon", "UNet target", ("epsilon", "v_prediction")),
    "zero_terminal_snr": (_bool, False, "rescale betas to zero terminal SNR (Lin et al. 2023; needs v_prediction)"),
    # data
    "datasets": (_datasets, [], "latent folders (encode_latents.py) with their caption datasets (05) and mix "
                                "ratios: LATENTS:CAPTIONS[:RATIO],..."),
    "synthetic": (_int, 0, "train on N random latents and captions of the configured shape instead (smoke runs, "
                           "benchmarks on machines without data)"),
    "resolution": (_int, 512, "image resolution the latents were encoded at; a dataset that differs is refused"),
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
    "min_snr_gamma": (_float, 5.0, "Min-SNR-gamma loss weighting (Hang et al. 2023); 0 turns it off"),
    "noise_offset": (_float, 0.0, "offset noise (Guttenberg 2023): add this x a per-sample, per-channel constant to "
                                  "the noise, so an epsilon model learns to move an image's mean (very dark / light "
                                  "images); 0 = off, as SD"),
    "ema_decay": (_float, 0.9999, "EMA decay, warmed up as min(decay, (1 + step) / (10 + step))"),
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
    # checkpoints
    "save_steps": (_int, 0, "also checkpoint every N steps (0 -> at epoch ends only)"),
    "keep_last": (_int, 3, "keep the newest K step checkpoints (0 -> keep all); an 860M checkpoint is ~13 GB"),
    # watching the run
    "log_every": (_int, 10, "log loss, lr, grad norm, img/s, MFU and memory every N steps"),
    "val_steps": (_int, 0, "also validate every N steps (0 -> at epoch ends only)"),
    "val_prompts": (_str_list, VAL_PROMPTS, "validation prompt grid ('a|b|c'; empty -> no images)"),
    "negative_prompt": (str, "", "negative prompt of the validation grid (the unconditional branch of CFG)"),
    "val_cfg_scale": (_float, 7.5, "CFG scale of the validation grid"),
    "val_ddim_steps": (_int, 50, "DDIM steps of the validation grid"),
    "val_timesteps": (_int_list, [100, 300, 500, 700, 900], "fixed timesteps of the validation loss"),
    "wandb": (str, "disabled", "wandb mode", ("online", "offline", "disabled")),
    "wandb_project": (str, "stable-diffusion", "wandb project"),
    "peak_tflops": (_float, 0.0, "GPU peak dense bf16 TFLOP/s for MFU (0 -> look the GPU up)"),
}
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
    for key in ("batch_size", "grad_accum", "epochs", "log_every", "loader_threads", "max_bad_steps"):
        if cfg[key] < 1:
            raise UserError(f"{key} must be at least 1 (got {cfg[key]})")
    if not 0.0 <= cfg["latent_fraction"] <= 1.0 or not 0.0 <= cfg["cfg_dropout"] < 1.0:
        raise UserError("latent_fraction must be in [0, 1] and cfg_dropout in [0, 1)")
    if cfg["resolution"] % 8:
        raise UserError(f"resolution must be a multiple of 8 (the VAE's factor), got {cfg['resolution']}")
    return cfg


def schedule_from(cfg):
    return NoiseSchedule(**{f.name: cfg[f.name] for f in fields(NoiseSchedule) if f.init})


#################################################################################
#                                     Data                                      #
#################################################################################

class LatentSource:
    """One latent folder with its caption split, as arrays: keys, token ids (n, 77) and, for the first
    `n_ram` samples, the latents in RAM (the others are read from disk batch by batch)."""

    def __init__(self, name, root, keys, ids, latent_shape, info, ram=None):
        self.name, self.root, self.keys, self.ids, self.info = name, root, keys, ids, info
        self.latent_shape = tuple(latent_shape)
        self.ram = ram if ram is not None else np.empty((0, *self.latent_shape), np.float16)

    def __len__(self):
        return len(self.ids)

    def read_one(self, i):
        path = latent_path(self.root, self.keys[i])
        try:
            x = np.load(path)
        except (OSError, ValueError) as e:
            raise UserError(f"unreadable latent '{path}' ({type(e).__name__}: {e})") from None
        if x.shape != self.latent_shape or x.dtype != np.float16:
            raise UserError(f"latent '{path}' is {x.dtype}{list(x.shape)}, but latent_info.json of "
                            f"'{self.root}' promises float16{list(self.latent_shape)}")
        return x

    def load_into_ram(self, fraction, pool, show):
        n = round(fraction * len(self))
        self.ram = np.empty((n, *self.latent_shape), np.float16)

        def read(i):
            self.ram[i] = self.read_one(i)
        list(tqdm(pool.map(read, range(n)), total=n, disable=not show or n == 0, desc=f"loading {self.name}",
                  unit="latent", mininterval=2))

    def read(self, idx, pool):
        """Latents of sample indices `idx` as (len(idx), 4, h, w) float16."""
        out = np.empty((len(idx), *self.latent_shape), np.float16)
        in_ram = idx < len(self.ram)
        out[in_ram] = self.ram[idx[in_ram]]
        disk = np.flatnonzero(~in_ram)
        for j, x in zip(disk, pool.map(self.read_one, idx[disk])):
            out[j] = x
        return out


def open_source(spec, split, resolution, in_channels, text):
    """A LatentSource for one `datasets` entry, or a clear error for every way it can fail to fit."""
    import pyarrow.compute as pc
    root, captions = Path(spec["latents"]), Path(spec["captions"])
    info = load_latent_info(root)
    if info.get("resolution") != resolution:
        raise UserError(f"latents in '{root}' were encoded at {info.get('resolution')} px but this phase trains at "
                        f"{resolution} px; encode them at {resolution} or set --resolution")
    shape = list(info.get("latent_shape", []))
    # square latents of in_channels whose side divides the resolution (by the VAE's factor: SD's 8, the demo's 4)
    if len(shape) != 3 or shape[0] != in_channels or shape[1] != shape[2] or resolution % shape[1] or \
            info.get("dtype") != "float16":
        raise UserError(f"latent_info.json of '{root}' says {info.get('dtype')}{shape}; this UNet trains on "
                        f"float16[{in_channels}, {resolution}/f, {resolution}/f] (f: the VAE's downsampling)")
    ds = open_captions(captions, split)
    missing = {"image_key", "input_ids"} - set(ds.column_names)
    if missing:
        raise UserError(f"caption dataset '{captions}' ({split}) lacks columns {sorted(missing)}")
    if len(ds) == 0:
        raise UserError(f"caption dataset '{captions}' has an empty '{split}' split")
    if ds.data.num_rows != len(ds):                  # an index mapping (select/shuffle) over the Arrow table
        ds = ds.flatten_indices()
    table = ds.data.table                            # the memory-mapped Arrow table: no copy of the captions
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False)
    if (lengths != TOKENS).any():
        raise UserError(f"{int((lengths != TOKENS).sum())} captions in '{captions}' ({split}) have token id lists of "
                        f"length {sorted(set(lengths.tolist()) - {TOKENS})[:5]}, not {TOKENS}; tokenize them with "
                        "the text encoder's tokenizer padded to 77 (04_preprocess_to_cache.py)")
    keys = table.column("image_key").to_pylist()
    ids = table.column("input_ids").combine_chunks().flatten().to_numpy().reshape(-1, TOKENS)
    if "caption" in table.column_names:
        # CLIP-L and OpenCLIP-H share a vocabulary but pad differently (end-of-text vs "!"): SD1 token ids fed to
        # SD2 pass every size check and silently train on the wrong padding. Re-tokenize a few captions to see.
        probe = table.column("caption").slice(0, 8).to_pylist()
        if (text.tokenize(probe).numpy() != ids[:len(probe)]).any():
            raise UserError(f"the token ids in '{captions}' are not what '{text.name}' gives for their captions; "
                            f"they were tokenized for another text encoder: rerun 04_preprocess_to_cache.py with "
                            f"--tokenizer {text.name} and 05_build_hf_dataset.py")
    have = existing_latent_keys(root)
    keep = [i for i, k in enumerate(keys) if k in have]
    if not keep:
        raise UserError(f"none of the {len(keys)} '{split}' captions in '{captions}' has a latent in '{root}'; "
                        "encode the same image keys with encode_latents.py")
    source = LatentSource(f"{root.name}:{split}", root, [keys[i] for i in keep], ids[keep].astype(np.int64),
                          shape, info)
    source.read_one(0)                               # the first file must match latent_info.json too
    return source, len(keys) - len(keep)


def synthetic_source(n, shape, text, seed, name):
    """n random latents and short captions: the data contract without data."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn((n, *shape), generator=g).half().numpy()
    ids = text.tokenize([f"a photo of synthetic sample {i}" for i in range(n)]).numpy().astype(np.int64)
    return LatentSource(name, None, None, ids, shape, {}, ram=latents)


def mix_counts(sizes, ratios, epoch_samples):
    """Samples each source contributes per epoch: its ratio share of epoch_samples (largest remainder)."""
    total = epoch_samples or sum(sizes)
    share = np.asarray(ratios, np.float64) / sum(ratios) * total
    counts = np.floor(share).astype(np.int64)
    counts[np.argsort(-(share - counts), kind="stable")[:total - counts.sum()]] += 1
    return counts


def epoch_order(sizes, ratios, epoch_samples, seed, epoch):
    """The epoch's samples as (n, 2) [source, index] rows, the same on every rank: each source gives its ratio
    share from reshuffled passes over itself, then everything is shuffled together. Seeded by (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    parts = []
    for s, (n, c) in enumerate(zip(sizes, mix_counts(sizes, ratios, epoch_samples))):
        passes = [torch.randperm(n, generator=g) for _ in range(-(-int(c) // n))]
        idx = torch.cat(passes)[:c] if passes else torch.zeros(0, dtype=torch.int64)
        parts.append(torch.stack([torch.full_like(idx, s), idx], 1))
    order = torch.cat(parts)
    return order[torch.randperm(len(order), generator=g)].numpy()


def micro_slice(step_in_epoch, micro, rank, batch_size, grad_accum, world):
    """Positions in the epoch order of one rank's micro-batch. An optimizer step takes the next
    batch_size x grad_accum x world samples; micro-step a of rank r takes block a * world + r of it, so
    (B, accum 2) == (2B, accum 1) and (B, 2 ranks) == (2B, 1 rank) see the same samples."""
    start = step_in_epoch * batch_size * grad_accum * world + (micro * world + rank) * batch_size
    return range(start, start + batch_size)


def sample_randomness(seed, epoch, positions, shape, num_timesteps, cfg_dropout, noise_offset=0.0):
    """Timestep, CFG-dropout coin and noise (plus noise_offset x a per-channel constant) of each sample, a pure
    function of (seed, epoch, position in the epoch): the same sample gets the same draws whatever the world
    size, micro-batching or resume point, which is what makes DDP == one process, accumulation == a bigger
    batch and resume == no interruption.
    A counter-based Philox stream per sample (key = seed, epoch; counter = position) keeps every stream
    distinct; torch's CPU generator would keep only 32 bits of a combined seed."""
    t, drop, noise = [], [], []
    for p in positions:
        rng = np.random.Generator(np.random.Philox(counter=[0, p, 0, 0], key=[seed, epoch]))
        t.append(rng.integers(0, num_timesteps))
        drop.append(rng.random() < cfg_dropout)
        noise.append(rng.standard_normal(tuple(shape), dtype=np.float32))
        if noise_offset:                                  # drawn last: offset 0 leaves every other draw as it was
            noise[-1] += noise_offset * rng.standard_normal((shape[0], 1, 1), dtype=np.float32)
    return torch.tensor(t, dtype=torch.long), torch.tensor(drop), torch.from_numpy(np.stack(noise))


class LatentMix:
    """All sources of a phase: reads batches of (source, index) rows from RAM or disk."""

    def __init__(self, sources, ratios, epoch_samples, pool):
        self.sources, self.ratios, self.epoch_samples, self.pool = sources, ratios, epoch_samples, pool
        self.sizes = [len(s) for s in sources]

    def __len__(self):
        return self.epoch_samples or sum(self.sizes)

    def read(self, rows):
        """(latents (N, 4, h, w) float16, token ids (N, 77) int64) of `rows` [(source, index)], in order."""
        latents = np.empty((len(rows), *self.sources[0].latent_shape), np.float16)
        ids = np.empty((len(rows), TOKENS), np.int64)
        for s, source in enumerate(self.sources):
            at = np.flatnonzero(rows[:, 0] == s)
            if len(at):
                latents[at] = source.read(rows[at, 1], self.pool)
                ids[at] = source.ids[rows[at, 1]]
        return torch.from_numpy(latents), torch.from_numpy(ids)


def step_batches(mix, order, first_step, cfg, world, rank, epoch, num_timesteps, pin):
    """Yield (step_in_epoch, [micro-batch dicts]) from `first_step` on; skipped steps load nothing."""
    B, A = cfg["batch_size"], cfg["grad_accum"]
    for p in range(first_step, len(order) // (B * A * world)):
        micro = []
        for a in range(A):
            pos = micro_slice(p, a, rank, B, A, world)
            latents, ids = mix.read(order[pos.start:pos.stop])
            t, drop, noise = sample_randomness(cfg["seed"], epoch, pos, latents.shape[1:], num_timesteps,
                                               cfg["cfg_dropout"], cfg["noise_offset"])
            mb = {"latents": latents, "ids": ids, "t": t, "drop": drop, "noise": noise}
            micro.append({k: v.pin_memory() for k, v in mb.items()} if pin else mb)
        yield p, micro


def prefetch(items, depth=2):
    """Iterate `items` in a background thread, `depth` ahead: the next batches are read while the GPU works."""
    q, done = Queue(depth), object()

    def run():
        try:
            for item in items:
                q.put(item)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(e)
        q.put(done)
    threading.Thread(target=run, daemon=True).start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


#################################################################################
#                          Loss, EMA and LR Schedule                            #
#################################################################################

def diffusion_loss(model, schedule, x0, context, t, noise, snr_gamma):
    """(per-sample MSE to the schedule's target, per-sample Min-SNR-gamma weight or ones)."""
    x_t = schedule.q_sample(x0, t, noise)
    pred = model(x_t, t, context)
    per_sample = F.mse_loss(pred.float(), schedule.target(x0, t, noise).float(), reduction="none").mean((1, 2, 3))
    weight = schedule.min_snr_weight(t, snr_gamma) if snr_gamma > 0 else torch.ones_like(per_sample)
    return per_sample, weight


def apply_cfg_dropout(context, uncond, drop):
    """Replace the context of dropped samples with the empty prompt's embedding (precomputed once), so the
    UNet also learns the unconditional branch that classifier-free guidance needs (Ho & Salimans 2022)."""
    return torch.where(drop.to(context.device)[:, None, None], uncond.to(context.dtype), context)


def ema_decay_at(step, max_decay):
    """The seed's EMA warmup: min(max_decay, (1 + step) / (10 + step)) at the step-th update (from 0)."""
    return min(max_decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update_(ema, params, decay):
    """ema <- decay * ema + (1 - decay) * param, as two foreach ops over all tensors (on the params' device)."""
    torch._foreach_mul_(ema, decay)
    torch._foreach_add_(ema, params, alpha=1 - decay)


def build_lr_scheduler(optimizer, lr, warmup_steps, total_steps):
    """LinearLR warmup from lr x 1e-2, then cosine annealing to eta_min = lr x 1e-2 at total_steps (the seed's)."""
    sched = torch.optim.lr_scheduler
    cosine = sched.CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps), eta_min=lr * 1e-2)
    if warmup_steps <= 0:
        return cosine
    warmup = sched.LinearLR(optimizer, start_factor=1e-2, end_factor=1.0, total_iters=warmup_steps)
    return sched.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


def build_optimizer(params, cfg):
    """AdamW (betas .9/.999, eps 1e-8), fused where this torch build and device support it."""
    kw = dict(lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg["weight_decay"])
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, ValueError):
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
        _atomic(path, lambda p: torch.save(state, p))
        if keep_last > 0:
            for _, old in list_checkpoints(path.parent.parent)[:-keep_last]:
                old.unlink()
    dist.barrier()


def load_checkpoint(path, unet, optimizer, ema, names, scheduler, scaler, rank, world):
    """Restore everything save_checkpoint wrote; returns the checkpoint's progress and meta."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
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
    return ckpt["progress"], ckpt["meta"]


def _shard_like(full, like):
    """`full` placed as `like` is: this rank's shard for an FSDP2 DTensor, else the tensor on its device."""
    if hasattr(like, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(full.to(like.device), like.device_mesh, like.placements)
    return full.to(like.device)


def find_resume(cfg):
    if not cfg["resume"]:
        return None
    if cfg["resume"] == "auto":
        found = list_checkpoints(cfg["out_dir"])
        return found[-1][1] if found else None
    path = Path(cfg["resume"])
    if not path.is_file():
        raise UserError(f"--resume: checkpoint '{path}' does not exist")
    return path


# Options that fix which sample and which noise every step sees; a resume that changes them is another run.
RUN_IDENTITY = ("seed", "datasets", "synthetic", "epoch_samples", "resolution", "cfg_dropout", "num_train_timesteps",
                "noise_offset")


#################################################################################
#                                  Validation                                   #
#################################################################################

@torch.no_grad()
def validate(ema_unet, schedule, text, vae, val_mix, cfg, device, amp, step, out_dir):
    """EMA weights on rank 0: the validation loss at fixed timesteps and noise on held-out latents, and the
    prompt grid sampled with DDIM + CFG (negative prompt as the unconditional branch, no x0 clamp) as a PNG."""
    metrics = {}
    if val_mix is not None:
        per_source = -(-cfg["val_samples"] // len(val_mix.sources))             # the first ones of each dataset
        rows = np.concatenate([np.stack([np.full(min(n, per_source), s), np.arange(min(n, per_source))], 1)
                               for s, n in enumerate(val_mix.sizes)])[:cfg["val_samples"]]
        latents, ids = val_mix.read(rows)
        x0 = latents.to(device).float()
        context = text.encode_ids(ids.to(device))
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).to(device)
        losses = []
        for t in cfg["val_timesteps"]:
            tt = torch.full((len(x0),), t, device=device, dtype=torch.long)
            with amp():
                per_sample, _ = diffusion_loss(ema_unet, schedule, x0, context, tt, noise, 0.0)
            metrics[f"val/loss_t{t}"] = per_sample.mean().item()
            losses.append(metrics[f"val/loss_t{t}"])
        metrics["val/loss"] = sum(losses) / len(losses)
    image_path = None
    if cfg["val_prompts"] and vae is not None:
        # The same sampler, seeds and CFG as SD_ImageGen.py, so a grid shows what the exported EMA will draw.
        res = cfg["resolution"]
        with amp():
            images = generate(Pipeline(ema_unet, text, vae, schedule), cfg["val_prompts"], cfg["negative_prompt"],
                              cfg["val_ddim_steps"], cfg["val_cfg_scale"], seed=0, height=res, width=res)
        image_path = Path(out_dir) / "samples" / f"step_{step:08d}.png"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(make_grid(images, cols=min(4, len(images)))).save(image_path)
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


class RunLog:
    """Rank 0's voice: stdout (through tqdm), train.log, and wandb when enabled (imported only then)."""

    def __init__(self, cfg, rank):
        self.rank, self.wandb = rank, None
        if rank != 0:
            return
        self.file = open(Path(cfg["out_dir"]) / "train.log", "a", buffering=1)
        if cfg["wandb"] != "disabled":
            try:
                import wandb
            except ImportError:
                raise UserError("--wandb online|offline needs `pip install wandb`") from None
            id_file = Path(cfg["out_dir"]) / "wandb_id.txt"   # one wandb run across resumes of this run
            if not id_file.exists():
                id_file.write_text(secrets.token_hex(4))
            self.wandb = wandb.init(project=cfg["wandb_project"], name=cfg["phase"], id=id_file.read_text(),
                                    resume="allow", mode=cfg["wandb"], dir=cfg["out_dir"], config=cfg)

    def print(self, msg):
        if self.rank == 0:
            tqdm.write(msg)
            self.file.write(msg + "\n")

    def metrics(self, values, step, image=None):
        if self.wandb is not None:
            import wandb
            if image is not None:
                values = dict(values, **{"val/images": wandb.Image(str(image))})
            self.wandb.log(values, step=step)

    def close(self):
        if self.rank == 0:
            self.file.close()
            if self.wandb is not None:
                self.wandb.finish()


#################################################################################
#                                     Main                                      #
#################################################################################

def setup_distributed(cfg):
    """(rank, local_rank, world, device): torchrun's env when present, else a one-process group, so every code
    path (collectives included) is the same with 1 or N processes. NCCL on CUDA, gloo on CPU."""
    want_cuda = cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA device")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if want_cuda else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend, device_id=device if want_cuda else None)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), local_rank, dist.get_world_size(), device


def main(args):
    cfg = resolve_config(args)
    rank, local_rank, world, device = setup_distributed(cfg)
    try:
        train(cfg, rank, world, device)
    finally:
        dist.destroy_process_group()


def train(cfg, rank, world, device):
    configure_cuda_backends()
    if not cfg["datasets"] and not cfg["synthetic"]:
        raise UserError(f"phase '{cfg['phase']}' names no datasets; pass --datasets LATENTS:CAPTIONS or --synthetic N")
    out_dir = Path(cfg["out_dir"])
    if cfg["global_batch"]:
        if cfg["global_batch"] % (cfg["batch_size"] * world):
            raise UserError(f"global_batch {cfg['global_batch']} is not a multiple of batch_size x GPUs = "
                            f"{cfg['batch_size']} x {world}")
        cfg["grad_accum"] = cfg["global_batch"] // (cfg["batch_size"] * world)
    B, A = cfg["batch_size"], cfg["grad_accum"]
    G = B * A * world
    precision = cfg["precision"] if cfg["precision"] != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    amp = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)  # noqa: E731
    show = rank == 0

    # Resume point and model config: a checkpoint's own config wins over the phase's named one.
    resume_path = find_resume(cfg)
    if resume_path is not None:
        ckpt_meta = torch.load(resume_path, map_location="cpu", weights_only=True, mmap=True)["meta"]
        changed = [k for k in RUN_IDENTITY if ckpt_meta["run_config"].get(k, OPTIONS[k][1]) != cfg[k]]
        old_g = ckpt_meta["run_config"]["batch_size"] * ckpt_meta["run_config"]["grad_accum"] * \
            ckpt_meta["run_config"].get("world_size", 1)
        if changed or old_g != G:
            raise UserError(f"--resume {resume_path}: that run used different {changed or ['global batch']}; "
                            "resuming with them changed would not continue it (use --init to start a new phase "
                            "from its weights)")
        model_cfg, init_sd, init_meta = unet_config(ckpt_meta["model_config"]), None, ckpt_meta
    elif cfg["init"] == "scratch":
        model_cfg, init_sd, init_meta = unet_config(cfg["model"]), None, {}
    else:
        init_sd, model_cfg, init_meta = read_unet_state(cfg["init"])

    # Frozen text encoder, and the data (every check that can fail runs here, before any GPU work).
    text_dtype = amp_dtype if device.type == "cuda" else torch.float32
    text = FrozenTextEncoder(cfg["text_encoder"], device=device, dtype=text_dtype, layer=cfg["text_layer"])
    if text.context_dim != model_cfg.context_dim:
        raise UserError(f"text encoder '{cfg['text_encoder']}' gives {text.context_dim}-d context but the UNet "
                        f"cross-attends to {model_cfg.context_dim}-d; pick the matching --text_encoder or --model")
    shape = (model_cfg.in_channels, cfg["resolution"] // 8, cfg["resolution"] // 8)   # SD's VAE; datasets set theirs
    pool = ThreadPoolExecutor(cfg["loader_threads"])
    if cfg["synthetic"]:
        sources = [synthetic_source(cfg["synthetic"], shape, text, cfg["seed"], "synthetic")]
        val_sources = [synthetic_source(max(cfg["val_samples"], 1), shape, text, cfg["seed"] + 1, "synthetic-val")]
        ratios, vae_id = [1.0], cfg["vae"] or DEFAULT_VAE
        scaling_factor = init_meta.get("scaling_factor")
    else:
        sources, val_sources = [], []
        for spec in cfg["datasets"]:
            source, dropped = open_source(spec, "train", cfg["resolution"], model_cfg.in_channels, text)
            sources.append(source)
            if show and dropped:
                print(f"note: {dropped} captions in '{spec['captions']}' have no latent in '{spec['latents']}'; skipped")
            try:
                val_sources.append(open_source(spec, "validation", cfg["resolution"], model_cfg.in_channels, text)[0])
            except UserError as e:
                if show:
                    print(f"note: no validation latents from '{spec['latents']}' ({e})")
        ratios = [spec["ratio"] for spec in cfg["datasets"]]
        latent_spaces = {(s.info.get("vae"), s.info.get("scaling_factor")) for s in sources}
        if len(latent_spaces) > 1:
            raise UserError("the datasets were encoded by different VAEs / scaling factors "
                            f"{sorted(map(str, latent_spaces))}; "
                            "one model trains in one latent space")
        vae_id, scaling_factor = latent_spaces.pop()
        vae_id = cfg["vae"] or vae_id
        shape = sources[0].latent_shape              # one VAE and one resolution: one latent shape
    for s in sources:
        if s.ids.max() >= text.model.config.vocab_size:
            raise UserError(f"token ids in '{s.name}' reach {s.ids.max()} but '{cfg['text_encoder']}' has "
                            f"{text.model.config.vocab_size}; the captions were tokenized for another text encoder")
    if None not in (init_meta.get("scaling_factor"), scaling_factor) and init_meta["scaling_factor"] != scaling_factor:
        raise UserError(f"--init weights were trained on latents x {init_meta['scaling_factor']} "
                        f"('{init_meta.get('vae')}'), these datasets are x {scaling_factor} ('{vae_id}')")
    mix = LatentMix(sources, ratios, cfg["epoch_samples"], pool)
    steps_per_epoch = len(mix) // G                  # from the loader, after grad accumulation (the seed's bug)
    if steps_per_epoch == 0:
        raise UserError(f"an epoch of {len(mix)} samples is less than one optimizer step of {G} samples "
                        f"(batch_size {B} x grad_accum {A} x {world} GPUs)")
    total_steps = cfg["epochs"] * steps_per_epoch
    val_mix = LatentMix(val_sources, [1.0] * len(val_sources), 0, pool) if val_sources else None
    vae = None
    if rank == 0 and cfg["val_prompts"]:
        vae = FrozenVAE(vae_id, device=device, dtype=amp_dtype if device.type == "cuda" else torch.float32)
        scaling_factor = scaling_factor if scaling_factor is not None else vae.scaling_factor
    meta = {"model_config": asdict(model_cfg), "vae": vae_id, "scaling_factor": scaling_factor,
            "text_encoder": cfg["text_encoder"], "text_layer": cfg["text_layer"],
            "resolution": cfg["resolution"],          # the samplers' default image size
            "schedule": {f.name: cfg[f.name] for f in fields(NoiseSchedule) if f.init},
            "run_config": dict(cfg, world_size=world)}

    # Run folder: partial checkpoints of a write that was killed (regular *.tmp files, up to ~13 GB each) are
    # removed, the resolved config is saved.
    if rank == 0:
        (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        for tmp in (out_dir / "checkpoints").glob("step_*.pt.tmp"):
            if tmp.is_file():
                tmp.unlink()
        (out_dir / "config.yaml").write_text(yaml.safe_dump(meta["run_config"], sort_keys=False))
        print(f"resolved config of phase '{cfg['phase']}':\n" + yaml.safe_dump(meta["run_config"], sort_keys=False))
    dist.barrier()
    log = RunLog(cfg, rank)
    for s in sources + val_sources:
        if s.root is not None:                       # synthetic sources are born in RAM
            s.load_into_ram(cfg["latent_fraction"], pool, show)

    # Model, EMA, optimizer, schedule. Same seed on every rank -> same init (DDP also broadcasts it).
    torch.manual_seed(cfg["seed"])
    unet = build_unet(model_cfg, init_sd, source=f"--init '{cfg['init']}'").to(device)
    unet.set_grad_checkpointing(cfg["grad_checkpointing"])
    if cfg["channels_last"]:
        unet.to(memory_format=torch.channels_last)
    flops = flops_per_sample(unet, shape, (TOKENS, model_cfg.context_dim), device, amp()) \
        if device.type == "cuda" else None
    if cfg["compile"]:
        unet.compile()                               # in place: parameter names stay clean
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
    names, params = zip(*[(n, p) for n, p in unet.named_parameters()])
    params = [p.detach() for p in params]
    ema = [p.clone() for p in params]                # on device, fp32, sharded like the params under FSDP
    optimizer = build_optimizer(unet.parameters(), cfg)
    scheduler = build_lr_scheduler(optimizer, cfg["lr"], cfg["warmup_steps"], total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    schedule = schedule_from(cfg)
    uncond = text.encode([""])                                                  # (1, 77, D)
    epoch, first_step, step, bad_total = 0, 0, 0, 0
    if resume_path is not None:
        progress, _ = load_checkpoint(resume_path, unet, optimizer, ema, names, scheduler, scaler, rank, world)
        epoch, first_step, step = progress["epoch"], progress["batch"], progress["step"]
        bad_total = progress["bad_steps"]
        log.print(f"resumed from {resume_path} at step {step} (epoch {epoch}, batch {first_step})")
    log.print(f"{sum(p.numel() for p in params):,} UNet parameters | {len(mix):,} samples/epoch | global batch {G} "
              f"({B} x {A} accum x {world} ranks) | {steps_per_epoch} steps/epoch x {cfg['epochs']} epochs = "
              f"{total_steps} steps | {precision} on {device.type}")

    def save(progress):
        path = checkpoint_path(out_dir, step)
        save_checkpoint(path, unet, optimizer, ema, names, scheduler, scaler, progress, meta, rank, cfg["keep_last"])
        log.print(f"saved {path}")

    def ema_state():
        return {n: _full(e).detach().cpu() for n, e in zip(names, ema)}

    def run_validation():
        if val_mix is None and vae is None:
            return
        full = ema_state()                           # every rank joins the FSDP gathers
        if rank == 0:
            ema_unet = build_unet(model_cfg, full).to(device).eval()
            metrics, image = validate(ema_unet, schedule, text, vae, val_mix, cfg, device, amp, step,
                                      out_dir)
            log.print(f"validation at step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()) +
                      (f" | grid {image}" if image else ""))
            log.metrics(metrics, step, image)
            del ema_unet
        dist.barrier()

    # The loop: one optimizer step per iteration; per-sample randomness comes with the batch.
    max_steps = cfg["max_steps"] or total_steps
    bar = tqdm(total=min(max_steps, total_steps), initial=step, disable=not show, desc=cfg["phase"], unit="step",
               dynamic_ncols=True)
    window = {"loss": 0.0, "weighted": 0.0, "n": 0, "q_sum": torch.zeros(4), "q_n": torch.zeros(4), "t0": time.time()}
    bad_in_row, stopped = 0, False
    while epoch < cfg["epochs"] and step < max_steps:
        order = epoch_order(mix.sizes, mix.ratios, mix.epoch_samples, cfg["seed"], epoch)
        batches = step_batches(mix, order, first_step, cfg, world, rank, epoch, cfg["num_train_timesteps"],
                               pin=device.type == "cuda")
        for p, micro in prefetch(batches):
            model.train()
            stats = torch.zeros(10, device=device)   # weighted loss, loss, 4 quartile sums, 4 quartile counts
            for a, mb in enumerate(micro):
                x0 = mb["latents"].to(device, non_blocking=True).float()
                noise = mb["noise"].to(device, non_blocking=True)
                t = mb["t"].to(device, non_blocking=True)
                if cfg["channels_last"]:
                    x0, noise = (z.contiguous(memory_format=torch.channels_last) for z in (x0, noise))
                with grad_sync(model, cfg["fsdp"], sync=a == A - 1):
                    with amp():
                        context = apply_cfg_dropout(text.encode_ids(mb["ids"].to(device, non_blocking=True)), uncond,
                                                    mb["drop"])
                        per_sample, weight = diffusion_loss(model, schedule, x0, context, t, noise,
                                                            cfg["min_snr_gamma"])
                        loss = (per_sample * weight).mean() / A
                    scaler.scale(loss).backward()
                quartile = (t * 4 // cfg["num_train_timesteps"]).clamp(max=3)
                stats[0] += loss.detach()
                stats[1] += per_sample.detach().mean() / A
                stats[2:6].index_add_(0, quartile, per_sample.detach().float())
                stats[6:10].index_add_(0, quartile, torch.ones_like(per_sample))
            dist.all_reduce(stats)
            stats[:2] /= world
            scaler.unscale_(optimizer)
            grad_norm = _full(torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg["grad_clip"])).item()
            weighted_loss = stats[0].item()
            if math.isfinite(weighted_loss) and (math.isfinite(grad_norm) or scaler.is_enabled()):
                scaler.step(optimizer)               # with fp16, the scaler itself skips inf/nan gradients
                scaler.update()
                ema_update_(ema, params, ema_decay_at(step, cfg["ema_decay"]))
                bad_in_row = 0
            else:
                bad_in_row, bad_total = bad_in_row + 1, bad_total + 1
                log.print(f"step {step + 1}: non-finite loss {weighted_loss} / grad norm {grad_norm}; step skipped "
                          f"({bad_in_row} in a row, {bad_total} in all)")
                if bad_in_row >= cfg["max_bad_steps"]:
                    found = list_checkpoints(out_dir)
                    raise UserError(f"{bad_in_row} non-finite losses in a row (steps {step + 2 - bad_in_row}-"
                                    f"{step + 1});"
                                    f" stopped without saving. Last good checkpoint: "
                                    f"{found[-1][1] if found else 'none'}. Lower --lr or check the data, then --resume")
            optimizer.zero_grad(set_to_none=True)
            lr = optimizer.param_groups[0]["lr"]      # the LR this step used
            scheduler.step()
            step += 1
            bar.update(1)

            # Bookkeeping: window stats, then log / checkpoint / validate as due.
            window["weighted"] += weighted_loss
            window["loss"] += stats[1].item()
            window["n"] += 1
            window["q_sum"] += stats[2:6].cpu()
            window["q_n"] += stats[6:10].cpu()
            epoch_done = p + 1 == steps_per_epoch
            progress = {"epoch": epoch + 1 if epoch_done else epoch, "batch": 0 if epoch_done else p + 1,
                        "step": step, "bad_steps": bad_total}
            if step % cfg["log_every"] == 0 or step == max_steps:
                elapsed = time.time() - window["t0"]
                img_s = window["n"] * G / elapsed
                q = (window["q_sum"] / window["q_n"]).tolist()                  # nan: no sample in that quartile
                values = {"train/loss": window["weighted"] / window["n"], "train/mse": window["loss"] / window["n"],
                          "train/lr": lr, "train/grad_norm": grad_norm,
                          "train/img_per_s": img_s, **{f"train/mse_q{i}": v for i, v in enumerate(q)}}
                line = (f"step {step}/{total_steps} | epoch {epoch} | loss {values['train/loss']:.4f} | mse "
                        f"{values['train/mse']:.4f} (t quartiles {' '.join(f'{v:.3f}' for v in q)}) | lr "
                        f"{values['train/lr']:.3e} | grad {grad_norm:.3f} | {img_s:.1f} img/s")
                if device.type == "cuda":
                    peak = cfg["peak_tflops"] or peak_tflops(device)
                    values["train/peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
                    if peak and amp_dtype is not None:
                        values["train/mfu"] = flops * img_s / world / (peak * 1e12)
                        line += f" | MFU {100 * values['train/mfu']:.1f}%"
                    line += f" | mem {values['train/peak_mem_gb']:.1f} GB"
                else:
                    line += f" | rss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GB"
                log.print(line)
                log.metrics(values, step)
                window.update(loss=0.0, weighted=0.0, n=0, q_sum=torch.zeros(4), q_n=torch.zeros(4), t0=time.time())
            if epoch_done or (cfg["save_steps"] and step % cfg["save_steps"] == 0) or step >= max_steps:
                if bad_in_row == 0:
                    save(progress)
                else:                                # mid-streak state must not prune the good checkpoints
                    log.print(f"checkpoint at step {step} not written: the step was skipped (non-finite loss)")
            if epoch_done or (cfg["val_steps"] and step % cfg["val_steps"] == 0):
                run_validation()
            if step >= max_steps:
                stopped = True
                break
        epoch, first_step = (epoch + 1, 0) if not stopped else (epoch, first_step)
    bar.close()

    # Phase end: a slim export of the EMA weights (fp16 safetensors) for inference and the next phase's --init.
    export = out_dir / "ema_final.safetensors"
    full = ema_state()
    if rank == 0:
        save_unet({k: v.half() for k, v in full.items()}, model_cfg, export, "ours", meta)
        log.print(f"done at step {step}: exported EMA weights to {export}")
    dist.barrier()
    log.close()
    pool.shutdown()


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--phase", default="tiny", help="phase in configs/phases.yaml whose values fill the options")
    parser.add_argument("--phases_file", default=str(PHASES_FILE.relative_to(REPO)),
                        help="the phases file (relative paths start at the repo root)")
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
    try:                                             # every thread's Python stack: days-long jobs need the clue
        main(parse_args())
    except UserError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
