"""SD_Train.py: its pure pieces against independent references (formulas, diffusers' DDPM alphas, a hand EMA),
then the real script end to end on the `small` UNet, a tiny local CLIP and VAE and tiny latent datasets in the
encode_latents / 05 contract: overfitting, grad accumulation and DDP equivalence, SIGKILL + resume bitwise, a kill
in the middle of a checkpoint write, FSDP2 checkpoint/resume, NaN stop, --init, and every bad input's error."""
import importlib.util
import io
import json
import math
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import SD_Model
import SD_Train
import sd_common
import sd_latents
from tiny_models import save_tiny_clip, save_tiny_vae

REPO = Path(__file__).resolve().parents[1]
RES, LATENT = 64, (4, 8, 8)                           # the `tiny` phase: 64 px images, 8x8 latents
DRAW_T = SD_Model.NoiseSchedule().draw_train_t       # DDPM's integer timesteps
# aspect buckets at 64 px for the tiny VAE (8x): square, landscape, portrait (encode_latents.py --buckets' layout)
BUCKET_SIZES, BUCKET_SHAPES = [(64, 64), (80, 48), (48, 80)], [(4, 8, 8), (4, 6, 10), (4, 10, 6)]

#################################################################################
#                  Shared fixture: tiny models and latent datasets              #
#################################################################################


def write_dataset(root, name, n_train, n_val, tokenizer, seed, scaling_factor, vae, ids_len=77, latents_for=None,
                  pad_id=None, bucketed=False):
    """A latent folder (latent_info.json + latents/<key[:5]>/<key>.npy, fp16) and its caption DatasetDict, as
    encode_latents.py and 05_build_hf_dataset.py write them (`bucketed`: as --buckets writes it, half of the samples
    square, 30% landscape, 20% portrait). Returns (latents dir, captions dir)."""
    import datasets
    lat, cap = root / name / "latents", root / name / "captions"
    rng = np.random.default_rng(seed)
    keys = [f"{name}{i:05d}" for i in range(n_train + n_val)]
    bucket = rng.choice(3, len(keys), p=[0.5, 0.3, 0.2]) if bucketed else np.zeros(len(keys), int)
    lat.mkdir(parents=True)
    for k in (keys if latents_for is None else latents_for):      # latents_for may name keys with no caption
        b = bucket[keys.index(k)] if k in keys else 0
        sd_latents.write_latent(lat, k, rng.standard_normal(BUCKET_SHAPES[b]).astype(np.float16))
    info = {"vae": str(vae), "scaling_factor": scaling_factor, "resolution": RES, "latent_shape": list(LATENT),
            "dtype": "float16", "count": len(keys)}
    if bucketed:
        del info["latent_shape"]
        info.update(buckets=BUCKET_SIZES, latent_shapes=BUCKET_SHAPES)
        sd_latents.append_bucket_records(lat, 0, keys, bucket)
    sd_latents.write_latent_info(lat, info)
    words = ["red circle", "blue square", "green triangle", "yellow circle"]
    caps = [f"a photo of a {words[i % 4]}" for i in range(len(keys))]
    ids = [row[:ids_len] + [row[-1]] * (ids_len - 77) for row in SD_Model.tokenize(tokenizer, caps).tolist()]
    if pad_id is not None:                           # OpenCLIP-H's tokenizer pads with "!" (0), CLIP-L's with <eos>
        ids = [row[:row.index(tokenizer.eos_token_id) + 1] + [pad_id] * (76 - row.index(tokenizer.eos_token_id))
               for row in ids]

    def split(sl):
        return datasets.Dataset.from_dict({"image_key": keys[sl], "caption": caps[sl], "input_ids": ids[sl]})
    splits = {"train": split(slice(0, n_train)), "validation": split(slice(n_train, None))}
    datasets.DatasetDict(splits).save_to_disk(str(cap))
    return lat, cap


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Tiny CLIP (32-d, as the `small` UNet), tiny VAE, and datasets: `a` (32 train + 4 validation), `four` (4
    samples to overfit), and broken ones for the error tests."""
    root = tmp_path_factory.mktemp("train")
    clip, vae = save_tiny_clip(root / "clip"), save_tiny_vae(root / "vae")
    sf = float(SD_Model.FrozenVAE(vae).scaling_factor)          # read from the VAE, as encode_latents does
    tok = SD_Model.load_tokenizer(clip)
    d = SimpleNamespace(root=root, clip=clip, vae=vae, scaling_factor=sf)
    d.a = write_dataset(root, "a", 32, 4, tok, 0, sf, vae)
    d.four = write_dataset(root, "four", 4, 2, tok, 1, sf, vae)
    d.other_vae = write_dataset(root, "othervae", 8, 1, tok, 2, 0.5, vae)
    d.short_ids = write_dataset(root, "shortids", 8, 1, tok, 3, sf, vae, ids_len=76)
    d.no_latents = write_dataset(root, "nolat", 8, 1, tok, 4, sf, vae, latents_for=[])
    d.other_pad = write_dataset(root, "otherpad", 8, 1, tok, 5, sf, vae, pad_id=0)
    d.bucketed = write_dataset(root, "bucketed", 40, 6, tok, 6, sf, vae, bucketed=True)
    return d


def spec(pair, ratio=None):
    return f"{pair[0]}:{pair[1]}" + (f":{ratio}" if ratio else "")


def base_args(tiny, out, data=None):
    """Flags of a `tiny` run on dataset `a` without the validation grid (the VAE decode is tested once)."""
    return ["--phase", "tiny", "--datasets", spec(data or tiny.a), "--text_encoder", str(tiny.clip),
            "--out_dir", str(out), "--val_prompts", ""]


def script_cmd(args, nproc):
    if nproc == 1:
        return [sys.executable, str(REPO / "SD_Train.py"), *map(str, args)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(REPO / "SD_Train.py"), *map(str, args)]


ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled",
           TOKENIZERS_PARALLELISM="false")


def run_train(args, nproc=1, check=True, timeout=400):
    """Run the real script as a user would (torchrun for nproc > 1) and return the CompletedProcess."""
    proc = subprocess.run(script_cmd(args, nproc), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"SD_Train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-12000:]}")
    return proc


def start_train(args, nproc, output):
    """Start the real script in its own process group (so one SIGKILL takes torchrun and every rank), its
    output going to a file (a pipe nobody reads would fill up and stall it)."""
    with open(output, "w") as f:
        return subprocess.Popen(script_cmd(args, nproc), cwd=REPO, env=ENV, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def start_until_step(args, output, step=5):
    """start_train on 2 ranks, returned once `step` is logged (the run carries on)."""
    proc, deadline = start_train(args, 2, output), time.time() + 300
    while not re.search(rf"\bstep {step}/", output.read_text()):
        assert proc.poll() is None and time.time() < deadline, output.read_text()[-3000:]
        time.sleep(0.05)
    return proc


def descendants(pid):
    """Every process below `pid` (torchrun starts its workers in their own sessions, so a process-group kill
    would miss them)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def kill_tree(proc):
    """SIGKILL the run: torchrun and every worker at once, as a node failure would."""
    for pid in [proc.pid] + descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_trees_equal(a, b, where="ckpt"):
    """Bitwise equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_trees_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_trees_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    else:
        assert a == b, where


def assert_same_state(path_a, path_b):
    """UNet, EMA, optimizer, LR schedule and progress bitwise equal (meta differs only in resume flags)."""
    a, b = load_ckpt(path_a), load_ckpt(path_b)
    for key in ("unet", "ema", "optimizer", "lr_scheduler", "scaler", "progress"):
        assert_trees_equal(a[key], b[key], key)


def max_diff(path_a, path_b, key="unet"):
    a, b = load_ckpt(path_a)[key], load_ckpt(path_b)[key]
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def logged(out, name):
    """Values of `name` (e.g. 'mse', 'lr') per logged step from a run's train.log: {step: value}."""
    vals = {}
    for line in (Path(out) / "train.log").read_text().splitlines():
        m = re.match(r"step (\d+)/\d+ .*\| " + name + r" ([-+.\deE]+|nan)", line)
        if m:
            vals[int(m.group(1))] = float(m.group(2))
    return vals


#################################################################################
#                           Config: phases and flags                            #
#################################################################################

def resolve(*argv):
    return SD_Train.resolve_config(SD_Train.parse_args(list(argv)))


def test_flags_override_phases_with_type_checks(tmp_path):
    cfg = resolve("--phase", "phase4", "--lr", "3e-4", "--fsdp", "true", "--val_prompts", "a cat|a dog, at night",
                  "--datasets", "x/lat:x/cap:0.7,y/lat:y/cap")
    assert cfg["lr"] == 3e-4 and cfg["fsdp"] is True and cfg["cfg_dropout"] == 0.15   # phase4 value kept
    assert cfg["val_prompts"] == ["a cat", "a dog, at night"]
    assert cfg["datasets"] == [{"latents": "x/lat", "captions": "x/cap", "ratio": 0.7},
                               {"latents": "y/lat", "captions": "y/cap", "ratio": 1.0}]
    assert cfg["out_dir"] == "runs/phase4"
    with pytest.raises(SD_Model.UserError, match=r"--lr: .*'abc'"):
        resolve("--phase", "phase1", "--lr", "abc")
    with pytest.raises(SD_Model.UserError, match=r"--batch_size: expected an integer"):
        resolve("--phase", "phase1", "--batch_size", "2.5")
    with pytest.raises(SD_Model.UserError, match=r"unknown option 'lrr' \(did you mean 'lr'\?\)"):
        resolve("--phase", "phase1", "--lrr", "1e-4")
    with pytest.raises(SD_Model.UserError, match=r"'bf32' is not one of"):
        resolve("--phase", "phase1", "--precision", "bf32")
    with pytest.raises(SD_Model.UserError, match="unknown phase 'phase9'"):
        resolve("--phase", "phase9")
    bad = tmp_path / "phases.yaml"
    bad.write_text("p:\n  learning_rate: 1.0e-4\n  datasets: [{latents: a, captions: b}]\n")
    with pytest.raises(SD_Model.UserError, match="phase 'p': unknown option 'learning_rate'"):
        resolve("--phase", "p", "--phases_file", str(bad))
    with pytest.raises(SD_Model.UserError, match="zero_terminal_snr needs prediction_type v_prediction"):
        resolve("--phase", "tiny", "--synthetic", "8", "--zero_terminal_snr", "true")
    flow = resolve("--phase", "tiny", "--prediction_type", "flow", "--flow_shift", "auto", "--resolution", "512")
    assert flow["flow_shift"] == 2.0 and flow["flow_t_density"] == "logit_normal"   # SD3's sqrt(512^2 / 256^2)
    assert SD_Model.NoiseSchedule.from_dict(flow).flow and "flow_shift" in SD_Train.RUN_IDENTITY
    for argv, message in [(["--prediction_type", "flow", "--zero_terminal_snr", "true"], "reaches pure noise at t = T"),
                          (["--prediction_type", "rf"], r"'rf' is not one of \['epsilon', 'v_prediction', 'flow'\]"),
                          (["--flow_shift", "-1"], "flow_shift and flow_logit_std must be positive"),
                          (["--flow_shift", "big"], "--flow_shift: expected a number"),
                          (["--ema_every", "0"], r"ema_every must be at least 1 \(got 0\)"),
                          (["--ema_device", "gpu"], r"'gpu' is not one of \['model', 'cpu'\]"),
                          (["--fsdp", "true", "--ema_device", "cpu"], "FSDP already shards the EMA|--fsdp already")]:
        with pytest.raises(SD_Model.UserError, match=message):
            resolve("--phase", "tiny", *argv)


#################################################################################
#                 Pure pieces against formulas and references                   #
#################################################################################

def test_adamw_is_fused_on_cuda_and_cpu_and_foreach_elsewhere():
    hp = {"lr": 1e-3, "weight_decay": 0.01}
    cpu, meta = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3, device="meta"))
    cpu.grad, meta.grad = torch.ones(3), torch.ones(3, device="meta")
    opt = SD_Train.build_optimizer([cpu], hp)
    assert opt.defaults["fused"] is True
    opt.step()                                       # the device has a kernel for what was chosen
    assert torch.all(cpu < 0)
    opt = SD_Train.build_optimizer([meta], hp)       # a device without the fused kernel
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]
    opt.step()


def test_lr_schedule_matches_the_formula():
    lr, warmup, total = 1e-3, 10, 50
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = SD_Train.build_lr_scheduler(opt, lr, warmup, total)
    used = []
    for _ in range(total):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()

    def formula(s):                                  # LR used at step s (from 0)
        if s < warmup:
            return lr * (1e-2 + (1 - 1e-2) * s / warmup)
        return lr * 1e-2 + (lr - lr * 1e-2) * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))) / 2
    for s in (0, warmup // 2, warmup, (warmup + total) // 2, total - 1):
        assert used[s] == pytest.approx(formula(s), rel=1e-9, abs=1e-15), s
    assert used[warmup] == pytest.approx(lr) and used[0] == pytest.approx(lr * 1e-2)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_and_targets_match_the_formula(prediction_type):
    from diffusers import DDPMScheduler
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod.double()
    schedule = SD_Model.NoiseSchedule(prediction_type=prediction_type)
    gamma = 5.0
    t = torch.tensor([0, 1, 50, 200, 500, 999])
    x0, noise = torch.randn(6, *LATENT), torch.randn(6, *LATENT)
    zero_model = lambda x, tt, c: torch.zeros_like(x)  # noqa: E731 - the loss is then the target's square
    per_sample, weight = SD_Train.diffusion_loss(zero_model, schedule, x0, None, t, noise, "min_snr", gamma)
    a = ref[t]
    snr = a / (1 - a)
    expected_w = torch.clamp(snr, max=gamma) / (snr if prediction_type == "epsilon" else snr + 1)
    torch.testing.assert_close(weight.double(), expected_w, rtol=1e-5, atol=0)
    target = noise.double() if prediction_type == "epsilon" else \
        a.sqrt()[:, None, None, None] * noise.double() - (1 - a).sqrt()[:, None, None, None] * x0.double()
    torch.testing.assert_close(per_sample.double(), target.square().mean((1, 2, 3)), rtol=1e-5, atol=1e-7)
    _, ones = SD_Train.diffusion_loss(lambda x, tt, c: x, schedule, x0, None, t, noise, "none")
    assert torch.equal(ones, torch.ones(6))


def test_ema_matches_a_hand_computation():
    assert SD_Train.ema_decay_at(0, 0.9999) == pytest.approx(0.1)
    assert SD_Train.ema_decay_at(90, 0.9999) == pytest.approx(91 / 100)
    assert SD_Train.ema_decay_at(10 ** 7, 0.9999) == 0.9999
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    ema = [p.clone() for p in params]
    hand = [p.double().clone() for p in params]
    for s in range(20):
        for p in params:
            p.add_(torch.randn(p.shape, generator=g))
        d = SD_Train.ema_decay_at(s, 0.9999)
        SD_Train.ema_update_(ema, params, d)
        hand = [d * h + (1 - d) * p.double() for h, p in zip(hand, params)]
    for e, h in zip(ema, hand):
        torch.testing.assert_close(e.double(), h, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", ["model", "cpu"])
def test_ema_every_n_steps_matches_a_hand_computation(device):
    """EMA every 3 steps with decay_at(step) ** 3, folded in after steps 2, 5, 8, ... (from 0) and unchanged in
    between; the CPU path (staging copy + worker thread) is bit for bit the in-place one on a CPU machine."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    every, max_decay = 3, 0.9
    ema = SD_Train.EMA(params, device, every, max_decay)
    hand = [p.double().clone() for p in params]
    for s in range(12):
        for p in params:
            p.add_(torch.randn(p.shape, generator=g))
        before = [e.clone() for e in ema.tensors]
        ema.update(s)
        if (s + 1) % every == 0:
            d = SD_Train.ema_decay_at(s, max_decay) ** every
            hand = [d * h + (1 - d) * p.double() for h, p in zip(hand, params)]
            ref = [e.clone() for e in before]
            SD_Train.ema_update_(ref, params, d)
            assert all(torch.equal(a, b) for a, b in zip(ema.tensors, ref))           # bitwise the in-place update
        else:
            assert all(torch.equal(a, b) for a, b in zip(ema.tensors, before))
        for e, h in zip(ema.tensors, hand):
            torch.testing.assert_close(e.double(), h, rtol=1e-6, atol=1e-6)
    ema.close()


def test_cfg_dropout_rate_and_substitution():
    p, n = 0.15, 4000
    _, drop, _ = sd_latents.sample_randomness(0, 0, range(n), (1, 1, 1), DRAW_T, p)
    tolerance = 4 * math.sqrt(p * (1 - p) / n)                                  # 4 sigma
    assert abs(drop.float().mean().item() - p) < tolerance
    _, none, _ = sd_latents.sample_randomness(0, 0, range(100), (1, 1, 1), DRAW_T, 0.0)
    assert not none.any()
    context, uncond = torch.randn(6, 77, 32), torch.randn(1, 77, 32)
    drop = torch.tensor([True, False, False, True, False, False])
    out = SD_Train.apply_cfg_dropout(context, uncond, drop)
    assert torch.equal(out[drop], uncond.expand(2, -1, -1)) and torch.equal(out[~drop], context[~drop])


def test_sample_randomness_is_a_function_of_the_sample_position_only():
    whole = sd_latents.sample_randomness(3, 2, range(8), LATENT, DRAW_T, 0.5)
    halves = [sd_latents.sample_randomness(3, 2, r, LATENT, DRAW_T, 0.5) for r in (range(0, 4), range(4, 8))]
    for i in range(3):
        assert torch.equal(whole[i], torch.cat([h[i] for h in halves]))
    other_epoch = sd_latents.sample_randomness(3, 3, range(8), LATENT, DRAW_T, 0.5)
    assert not torch.equal(whole[2], other_epoch[2])


def test_noise_offset_adds_one_constant_per_sample_and_channel():
    t, drop, noise = sd_latents.sample_randomness(3, 2, range(8), LATENT, DRAW_T, 0.5)
    t_off, drop_off, noise_off = sd_latents.sample_randomness(3, 2, range(8), LATENT, DRAW_T, 0.5, noise_offset=0.1)
    assert torch.equal(t, t_off) and torch.equal(drop, drop_off)          # the other draws are unchanged
    offset = noise_off - noise                                             # (8, C, h, w)
    assert torch.allclose(offset, offset[:, :, :1, :1].expand_as(offset), atol=1e-6)
    assert 0.02 < offset[:, :, 0, 0].abs().mean() < 0.2 and offset[:, :, 0, 0].unique().numel() == 8 * LATENT[0]


def test_epoch_order_mixes_by_ratio_and_shards_consistently():
    sizes, ratios = [10, 30], [0.5, 0.5]
    order = sd_latents.epoch_order(sizes, ratios, 40, seed=1, epoch=0)
    assert len(order) == 40 and (order[:, 0] == 0).sum() == 20 and (order[:, 0] == 1).sum() == 20
    small = np.sort(order[order[:, 0] == 0, 1])
    assert np.array_equal(small, np.repeat(np.arange(10), 2))                    # two full passes over source 0
    assert np.array_equal(order, sd_latents.epoch_order(sizes, ratios, 40, seed=1, epoch=0))
    assert not np.array_equal(order, sd_latents.epoch_order(sizes, ratios, 40, seed=1, epoch=1))
    assert list(sd_latents.mix_counts([213, 250, 51, 58], [0.37, 0.44, 0.09, 0.10], 572)) == [212, 252, 51, 57]
    # (batch 2, 2 ranks, accum 2) covers exactly the positions of (batch 8, 1 rank, accum 1), step by step
    for step in range(3):
        many = [i for a in range(2) for r in range(2) for i in sd_latents.micro_slice(step, a, r, 2, 2, 2)]
        assert sorted(many) == list(sd_latents.micro_slice(step, 0, 0, 8, 1, 1))


def random_buckets(sizes, n_buckets, seed):
    """Each source's samples spread unevenly over the buckets, as real aspect ratios are."""
    rng = np.random.default_rng(seed)
    return [rng.choice(n_buckets, n, p=np.arange(1, n_buckets + 1) / sum(range(1, n_buckets + 1))) for n in sizes]


@pytest.mark.parametrize("epoch_samples,ratios", [(0, [300, 97]), (500, [0.75, 0.25])])
def test_bucket_order_one_bucket_per_step_on_every_rank_each_sample_once(epoch_samples, ratios):
    """Sources of 300 and 97 samples over 5 buckets, one pass over each or 500 samples mixed 3:1: every optimizer
    step holds one bucket on every rank and micro-batch for world sizes 1, 2 and 4; a full pass takes each sample
    once, dropping only each bucket's leftover (< one step); the mix ratio holds; the steps per epoch are fixed."""
    sizes, B, A = [300, 97], 3, 2
    buckets = random_buckets(sizes, 5, seed=0)
    counts = sd_latents.bucket_counts([np.bincount(b, minlength=5) for b in buckets], ratios, epoch_samples)
    assert counts.sum() == (epoch_samples or 397) and list(counts.sum(1)) == \
        list(sd_latents.mix_counts(sizes, ratios, epoch_samples))
    for world in (1, 2, 4):
        G = B * A * world
        orders = [sd_latents.bucket_epoch_order(buckets, ratios, epoch_samples, G, seed=5, epoch=e) for e in (0, 1)]
        for order in orders:
            of = np.array([buckets[s][i] for s, i in order])
            assert len(order) == (counts.sum(0) // G * G).sum()                   # whole steps; per bucket < G dropped
            for k in range(5):
                assert (of == k).sum() == counts[:, k].sum() // G * G
            for p in range(len(order) // G):
                seen = {int(of[i]) for a in range(A) for r in range(world)
                        for i in sd_latents.micro_slice(p, a, r, B, A, world)}
                assert len(seen) == 1, (world, p, seen)
            if not epoch_samples:                                                   # one pass: each sample once
                assert len({(s, i) for s, i in order}) == len(order)
            for s in range(2):                                                      # the ratio, up to the leftovers
                assert abs((order[:, 0] == s).sum() - counts[s].sum()) <= (counts.sum(0) % G).sum()
        assert not np.array_equal(*orders)                                          # reshuffled every epoch
        assert np.array_equal(orders[0], sd_latents.bucket_epoch_order(buckets, ratios, epoch_samples, G, 5, 0))


def test_bucketed_batches_have_one_shape_per_step_on_both_ranks_and_resume_exactly():
    """The real step_batches over a LatentMix of bucketed synthetic latents and a square source (the latter joins
    the bucket of its shape): per step, both ranks' micro-batches have one latent shape; a resume from step 3 of the
    epoch yields exactly what the uninterrupted epoch yields from there."""
    from concurrent.futures import ThreadPoolExecutor

    class Text:                                                                  # synthetic_source's only need
        def tokenize(self, texts):
            return torch.zeros((len(texts), 77), dtype=torch.long)
    shapes, sizes = [(4, 8, 8), (4, 6, 10), (4, 10, 6)], [(64, 64), (80, 48), (48, 80)]
    sources = [sd_latents.synthetic_source(40, shapes, sizes, Text(), 0, "bucketed"),
               sd_latents.synthetic_source(9, shapes[:1], sizes[:1], Text(), 1, "square")]
    mix = sd_latents.LatentMix(sources, [0.8, 0.2], 0, ThreadPoolExecutor(1), bucketed=True)
    assert mix.shapes == sorted(shapes) and [list(b) for b in mix.buckets[1:]] == [[1] * 9]
    cfg = {"batch_size": 2, "grad_accum": 2, "seed": 0, "cfg_dropout": 0.1, "noise_offset": 0.0}
    order = mix.epoch_order(0, 0, 8)
    assert len(order) == 8 * mix.steps_per_epoch(8) == 32                         # 49 samples: 4 whole steps of 8
    ranks = [list(sd_latents.step_batches(mix, order, 0, cfg, 2, r, 0, DRAW_T, pin=False)) for r in (0, 1)]
    for (p0, micro0), (p1, micro1) in zip(*ranks):
        assert p0 == p1 and len({tuple(mb["latents"].shape[1:]) for mb in micro0 + micro1}) == 1
        assert all(mb["noise"].shape == mb["latents"].shape for mb in micro0 + micro1)
    resumed = list(sd_latents.step_batches(mix, order, 3, cfg, 2, 1, 0, DRAW_T, pin=False))
    assert [p for p, _ in resumed] == [3] and all(torch.equal(a[k], b[k]) for a, b in zip(resumed[0][1], ranks[1][3][1])
                                                  for k in a)


#################################################################################
#                      Bad inputs: clear errors before compute                  #
#################################################################################

def run_main(*argv):
    SD_Train.main(SD_Train.parse_args([str(a) for a in argv]))


def test_key_sets_that_disagree_are_counted_both_ways(tiny):
    """Captions without a latent (a tar encoded but tokenized short) and latents without a caption (a tar tokenized
    while still being written: issue 15's 10 lost captions) are both counted; SD_Train prints each as a note."""
    keys = [f"mix{i:05d}" for i in range(10)]        # 8 train + 2 validation captions
    tok = SD_Model.load_tokenizer(tiny.clip)
    pair = write_dataset(tiny.root, "mix", 8, 2, tok, 6, tiny.scaling_factor, tiny.vae,
                         latents_for=keys[3:] + ["mix99990", "mix99991", "mix99992"])
    text = SD_Model.FrozenTextEncoder(tiny.clip)
    source, dropped, orphans = sd_latents.open_source({"latents": str(pair[0]), "captions": str(pair[1])}, "train",
                                                      RES, 4, text)
    assert (len(source), dropped, orphans) == (5, 3, 3)


def test_each_bad_input_gets_its_clear_error(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "run"
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint")
    slim = tmp_path / "ema_final.safetensors"
    SD_Model.save_unet(SD_Model.build_unet("small").state_dict(), "small", slim)
    (tmp_path / "file.txt").write_text("a file where a folder should be")
    cases = [
        (base_args(tiny, out) + ["--resolution", "128"], r"encoded at 64 px but this phase trains at 128 px"),
        (base_args(tiny, out, tiny.short_ids), r"8 captions .* have token id lists of length \[76\], not 77"),
        (base_args(tiny, out, tiny.no_latents), r"none of the 8 'train' captions .* has a latent"),
        (base_args(tiny, out, tiny.other_pad), r"tokenized for another text encoder: rerun 04_preprocess_to_cache.py"),
        (base_args(tiny, out, (tmp_path / "nowhere", tiny.a[1])), r"is not a latent folder"),
        (base_args(tiny, out) + ["--datasets", f"{spec(tiny.a)},{spec(tiny.other_vae)}"],
         r"encoded by different VAEs / scaling factors"),
        (base_args(tiny, out) + ["--model", "small_sd2"], r"gives 32-d context but the UNet cross-attends to 48-d"),
        (base_args(tiny, out) + ["--batch_size", "64"], r"epoch of 32 samples is less than one optimizer step of 64"),
        (base_args(tiny, out) + ["--resume", tmp_path / "missing.pt"], r"checkpoint '.*missing.pt' does not exist"),
        (base_args(tiny, out) + ["--init", tmp_path / "missing.pt"], r"checkpoint '.*missing.pt' does not exist"),
        (["--phase", "tiny", "--out_dir", out], r"names no datasets"),
        (base_args(tiny, out) + ["--resume", notes], r"--resume: '.*notes.txt' is not a readable training checkpoint"),
        (base_args(tiny, out) + ["--resume", slim], r"is a weights-only export .* start a new phase from it with --init"),
        (base_args(tiny, out) + ["--loss_weighting", "minsnr"], r"'minsnr' is not one of \['none', 'min_snr'"),
        (base_args(tiny, out) + ["--loss_weighting", "min_snr", "--min_snr_gamma", 0], r"needs min_snr_gamma > 0"),
        (base_args(tiny, out) + ["--max_steps", -1], r"max_steps must be 0 or more \(got -1\)"),
        (base_args(tiny, out) + ["--epochs", 0], r"epochs must be at least 1 \(got 0\)"),
        (base_args(tiny, out) + ["--device", "cuda"], r"--device cuda, but torch sees no CUDA device"),
        (base_args(tiny, out, tiny.bucketed), r"holds aspect-bucketed latents \(3 sizes.*train on them with --buckets"),
        (base_args(tiny, out, tiny.bucketed) + ["--buckets", "true", "--batch_size", 24],
         r"epoch of 40 samples is less than one optimizer step of 24 samples .* in any one aspect bucket"),
        (base_args(tiny, tmp_path / "file.txt" / "run"), r"--out_dir '.*file.txt/run' is not writable"),
    ]
    for argv, message in cases:
        with pytest.raises(SD_Model.UserError, match=message):
            run_main(*argv)
    assert not (out / "checkpoints").exists()                                   # nothing ran


@pytest.mark.slow
def test_a_resume_that_changes_the_maths_is_refused_with_the_differences(tiny, ref_run, tmp_path):
    """The reference ran on 2 ranks; here 1 process resumes it (world_size named as a deliberate change)."""
    def resume(*extra):
        run_main(*ref_args(tiny, tmp_path / "run", "--resume", ckpt(ref_run, 4), "--resume_override", "world_size",
                           "--max_steps", 5, *extra))
    with pytest.raises(SD_Model.UserError, match=r"that run differs in \{'seed': \(0, 1\)\} \(then, now\).*"
                                                 r"--resume_override 'seed'"):
        resume("--seed", 1)
    with pytest.raises(SD_Model.UserError, match=r"differs in \{'min_snr_gamma': \(5.0, 3.0\), 'grad_clip': \(1.0, "
                                                 r"2.0\)\}.*--resume_override 'min_snr_gamma\|grad_clip'"):
        resume("--grad_clip", 2, "--min_snr_gamma", 3)
    data = tmp_path / "data"                                                   # same paths, other sample keys
    shutil.copytree(tiny.a[0], data / "lat")
    shutil.copytree(tiny.a[1], data / "cap")
    args = base_args(tiny, tmp_path / "run2", (data / "lat", data / "cap"))
    run_main(*args, "--max_steps", 1, "--save_steps", 1)
    sd_latents.latent_path(data / "lat", "a00000").unlink()
    with pytest.raises(SD_Model.UserError, match=r"differs in \{'data_fingerprint'"):
        run_main(*args, "--resume", "auto")
    resume("--resume_override", "world_size|seed", "--seed", 1)                 # named on purpose: it runs


#################################################################################
#                     End to end: the real script, CPU, gloo                    #
#################################################################################

REF_STEPS, REF_SAVE = 10, 4               # 32 samples / global batch 4 = 8 steps per epoch: saves at 4, 8, 10


def ref_args(tiny, out, *extra):
    """Two datasets mixed 3:1, half of the latents in RAM and half read from disk per batch."""
    return base_args(tiny, out) + ["--datasets", f"{spec(tiny.a, 0.75)},{spec(tiny.four, 0.25)}", "--epoch_samples",
                                   32, "--latent_fraction", 0.5, "--batch_size", 2, "--epochs", 2, "--max_steps",
                                   REF_STEPS, "--save_steps", REF_SAVE, *extra]


@pytest.fixture(scope="session")
def ref_run(tiny):
    """The uninterrupted reference: 2 gloo processes x batch 2, 10 steps across an epoch boundary."""
    out = tiny.root / "ref"
    run_train(ref_args(tiny, out), nproc=2)
    return out


def ckpt(out, step):
    return SD_Train.checkpoint_path(out, step)


@pytest.mark.slow
def test_sigkill_between_saves_then_resume_auto_is_bitwise_exact(tiny, ref_run):
    out = tiny.root / "killed"
    output = tiny.root / "killed.out"
    kill_tree(start_until_step(ref_args(tiny, out), output))   # SIGKILL the whole torchrun group once step 5 is logged
    assert [s for s, _ in SD_Train.list_checkpoints(out)] == [4]                 # killed between saves 4 and 8
    proc = run_train(ref_args(tiny, out, "--resume", "auto"), nproc=2)
    assert "resumed from" in proc.stdout and "at step 4 (epoch 0, batch 4)" in proc.stdout
    assert [s for s, _ in SD_Train.list_checkpoints(out)] == [4, 8, 10]
    for step in (8, 10):
        assert_same_state(ckpt(ref_run, step), ckpt(out, step))


@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_the_previous_one_and_resume_picks_it(tiny, ref_run):
    """Deterministic kill mid-write, no hook in the loop: the temp name that sd_common.atomic_path writes through is
    made a FIFO before the run starts. The save of step 8 opens it and streams the checkpoint into it; the test
    reads the first 64 KiB (so the write has provably started), stops reading (the writer blocks with the
    checkpoint half written) and SIGKILLs every process. The FIFO is then replaced by the bytes it received: the
    on-disk state a kill at any instant of a write leaves (a partial temp file, the final name absent, older
    checkpoints untouched). Resume must drop the partial file, pick step 4 and finish bitwise equal."""
    out = tiny.root / "killed_mid_write"
    fifo = sd_common.temp_name(ckpt(out, 8))
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    output = tiny.root / "killed_mid_write.out"
    proc = start_train(ref_args(tiny, out), 2, output)
    received, deadline = b"", time.time() + 300
    while len(received) < 1 << 16:
        assert proc.poll() is None and time.time() < deadline, output.read_text()[-3000:]
        if select.select([reader], [], [], 1.0)[0]:
            received += os.read(reader, 1 << 16)
    kill_tree(proc)
    os.close(reader)
    assert [s for s, _ in SD_Train.list_checkpoints(out)] == [4] and not ckpt(out, 8).exists()
    assert load_ckpt(ckpt(out, 4))["progress"]["step"] == 4                      # the previous one is intact
    fifo.unlink()                                 # what a kill mid-write leaves on a disk: the bytes written so far
    fifo.write_bytes(received)
    proc = run_train(ref_args(tiny, out, "--resume", "auto"), nproc=2)
    assert "at step 4 (epoch 0, batch 4)" in proc.stdout and not fifo.exists()
    assert_same_state(ckpt(ref_run, 10), ckpt(out, 10))


def bucketed_args(tiny, out, *extra):
    """The reference's shape with aspect buckets: the bucketed dataset mixed 3:1 with the square `four` (which joins
    the 64x64 bucket), half of the latents in RAM; each epoch end validates per bucket and draws the grid at its
    landscape and portrait buckets."""
    mixed = f"{spec(tiny.bucketed, 0.75)},{spec(tiny.four, 0.25)}"
    return ref_args(tiny, out, "--buckets", "true", "--datasets", mixed, "--val_prompts", "a red circle", "--vae",
                    tiny.vae, *extra)


@pytest.fixture(scope="session")
def bucketed_run(tiny):
    """The uninterrupted bucketed reference: 2 gloo processes x batch 2, 7 steps per epoch, 10 steps in all."""
    out = tiny.root / "bucketed_ref"
    proc = run_train(bucketed_args(tiny, out), nproc=2)
    return out, proc.stdout


@pytest.mark.slow
def test_bucketed_run_validates_per_bucket_and_resumes_bitwise_after_sigkill(tiny, bucketed_run):
    """Square 64x64 (the bucketed set's 24 + `four`'s 8 of the epoch's 32), 80x48 and 48x80 buckets: whole steps of 4
    per bucket, the leftovers dropped; the grid at both aspects; SIGKILL between saves and --resume auto ends bitwise
    equal to the uninterrupted run."""
    ref, stdout = bucketed_run
    m = re.search(r"aspect buckets: 3 \| 80x48 (\d+), 64x64 (\d+), 48x80 (\d+) samples/epoch \| (\d+) left over",
                  stdout)
    assert m, stdout[-3000:]
    assert "four/latents' holds square latents (encoded without --buckets): its 4 samples train as the 64x64 " \
        "bucket" in stdout                                                    # a square folder joins, one line says so
    per_bucket = [int(g) for g in m.groups()[:3]]
    assert sum(per_bucket) == 32 and int(m[4]) == sum(c % 4 for c in per_bucket)
    steps = sum(c // 4 for c in per_bucket)
    assert f"| {steps} steps/epoch x 2 epochs" in stdout and steps < REF_STEPS
    from PIL import Image
    assert Image.open(ref / "samples" / f"step_{steps:08d}.png").size == (80, 48 + 80)   # landscape over portrait
    assert re.search(rf"validation at step {steps}: val/loss_t100 [\d.]+", (ref / "train.log").read_text())
    out, output = tiny.root / "bucketed_killed", tiny.root / "bucketed_killed.out"
    kill_tree(start_until_step(bucketed_args(tiny, out), output))
    assert [s for s, _ in SD_Train.list_checkpoints(out)] == [4]
    proc = run_train(bucketed_args(tiny, out, "--resume", "auto"), nproc=2)
    assert "at step 4 (epoch 0, batch 4)" in proc.stdout
    for step in (8, 10):
        assert_same_state(ckpt(ref, step), ckpt(out, step))


@pytest.fixture(scope="session")
def single_run(tiny):
    """One process, batch 4 (the reference's global batch), a checkpoint after every step."""
    out = tiny.root / "single"
    run_train(ref_args(tiny, out, "--batch_size", 4, "--save_steps", 1))
    return out


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_at_the_same_global_batch(ref_run, single_run):
    # Same samples, timesteps and noise per step (sample_randomness); only the float summation order differs.
    for key in ("unet", "ema"):
        assert max_diff(ckpt(ref_run, REF_STEPS), ckpt(single_run, REF_STEPS), key) < 5e-6, key


@pytest.mark.slow
def test_grad_accumulation_equals_a_bigger_batch(tiny, single_run):
    out = tiny.root / "accum"
    run_train(ref_args(tiny, out, "--grad_accum", 2))
    assert max_diff(ckpt(single_run, REF_STEPS), ckpt(out, REF_STEPS)) < 5e-6
    # Total steps come from the loader and accumulation: 32 samples / (2 x 2) = 8 per epoch, 16 in 2 epochs,
    # so the logged LR follows a 16-step cosine (the seed computed it from the dataset length).
    lr = logged(out, "lr")
    lr0, warm, total = 1e-3, 2, 16
    for s in (3, 6, 10):                          # step s logs the LR of its update, index s - 1
        expected = lr0 * 1e-2 + lr0 * (1 - 1e-2) * (1 + math.cos(math.pi * (s - 1 - warm) / (total - warm))) / 2
        assert lr[s] == pytest.approx(expected, rel=1e-3)


@pytest.mark.slow
def test_ema_in_the_run_matches_a_hand_computation(single_run):
    for step in (1, 5, 9):                        # ema_s = d * ema_{s-1} + (1 - d) * params_s, d = decay_at(s - 1)
        prev, cur = load_ckpt(ckpt(single_run, step)), load_ckpt(ckpt(single_run, step + 1))
        d = SD_Train.ema_decay_at(step, 0.9999)
        for k, e in cur["ema"].items():
            torch.testing.assert_close(e, d * prev["ema"][k] + (1 - d) * cur["unet"][k], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_flow_run_with_cpu_ema_every_3_resumes_bitwise_and_equals_the_in_place_ema(tiny, tmp_path, monkeypatch):
    """A rectified-flow run (logit-normal sigmas, shift 3, SD3's plain loss) with its EMA in host memory, folded in
    every 3 steps: the checkpoints record the objective; resumed from step 3 it ends bit for bit as the
    uninterrupted run; the EMA moves only after steps 3 and 6, by the hand formula with decay ** 3; and the in-place
    EMA (--ema_device model) gives the same bits. In-process runs: 6 steps each."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)

    def run(out, *extra):
        run_main(*base_args(tiny, out), "--prediction_type", "flow", "--flow_shift", 3, "--loss_weighting", "none",
                 "--ema_every", 3, "--ema_decay", 0.9, "--max_steps", 6, "--save_steps", 1, "--val_steps", 3, *extra)
    run(tmp_path / "a", "--ema_device", "cpu")
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpt(tmp_path / "a", 3), ckpt(tmp_path / "b", 3))
    run(tmp_path / "b", "--ema_device", "cpu", "--resume", "auto")
    assert "resumed from" in (tmp_path / "b" / "train.log").read_text()
    assert_same_state(ckpt(tmp_path / "a", 6), ckpt(tmp_path / "b", 6))
    run(tmp_path / "c", "--ema_device", "model")
    assert_same_state(ckpt(tmp_path / "a", 6), ckpt(tmp_path / "c", 6))

    a = {k: load_ckpt(ckpt(tmp_path / "a", k)) for k in range(1, 7)}
    schedule = a[6]["meta"]["schedule"]
    assert schedule["prediction_type"] == "flow" and schedule["flow_shift"] == 3.0
    assert re.search(r"validation at step 3: val/loss_t100 [\d.]+", (tmp_path / "a" / "train.log").read_text())
    for k in (2, 4, 5):
        assert_trees_equal(a[k]["ema"], a[k - 1]["ema"], f"ema {k}")
    for k in (3, 6):
        d = SD_Train.ema_decay_at(k - 1, 0.9) ** 3
        for n, e in a[k]["ema"].items():
            torch.testing.assert_close(e, d * a[k - 1]["ema"][n] + (1 - d) * a[k]["unet"][n], rtol=1e-6, atol=1e-7)
    assert not torch.equal(a[6]["ema"]["conv_out.weight"], a[5]["ema"]["conv_out.weight"])


@pytest.mark.slow
def test_fsdp2_runs_validates_checkpoints_and_resumes(tiny):
    def fsdp_args(out, *extra):
        return base_args(tiny, out) + ["--fsdp", "true", "--batch_size", 2, "--max_steps", 6, "--save_steps", 3,
                                       *extra]
    out = tiny.root / "fsdp"
    run_train(fsdp_args(out, "--val_steps", 3, "--val_prompts", "a red circle|a blue square", "--vae", tiny.vae),
              nproc=2)
    assert [s for s, _ in SD_Train.list_checkpoints(out)] == [3, 6]
    from PIL import Image
    grid = Image.open(out / "samples" / "step_00000003.png")
    assert grid.size == (2 * RES, RES)                                           # two prompts, one row
    assert "val/loss_t500" in (out / "train.log").read_text()
    state, cfg, meta = SD_Model.read_unet_state(out / "ema_final.safetensors")   # the phase-end slim export
    assert cfg == SD_Model.unet_config("small") and meta["scaling_factor"] == tiny.scaling_factor
    assert meta["text_encoder"] == str(tiny.clip) and meta["schedule"]["prediction_type"] == "epsilon"
    assert meta["resolution"] == RES                                             # what the samplers default to
    full = load_ckpt(ckpt(out, 6))
    assert all(torch.equal(state[k], v.half()) for k, v in full["ema"].items())
    # validation used the EMA weights (gathered from the FSDP shards): its logged loss is the EMA's, not the live's
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import nullcontext
    text = SD_Model.FrozenTextEncoder(tiny.clip)
    val = sd_latents.open_source({"latents": str(tiny.a[0]), "captions": str(tiny.a[1])}, "validation", RES, 4,
                                 text)[0]
    val_mix = sd_latents.LatentMix([val], [1.0], 0, ThreadPoolExecutor(1))
    val_cfg = {"val_samples": 64, "val_timesteps": [100, 300, 500, 700, 900], "val_prompts": []}

    def val_loss(weights):
        unet = SD_Model.build_unet("small", weights).eval()
        return SD_Train.validate(unet, SD_Model.NoiseSchedule(), text, None, val_mix, val_cfg, torch.device("cpu"),
                                 nullcontext, 6, out)[0]["val/loss"]
    logged_val = float(re.search(r"validation at step 6: .*val/loss ([\d.]+)", (out / "train.log").read_text())[1])
    assert val_loss(full["ema"]) == pytest.approx(logged_val, abs=1e-4)
    assert abs(val_loss(full["unet"]) - logged_val) > 1e-3
    resumed = tiny.root / "fsdp_resumed"                                         # resume the step-3 checkpoint
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpt(out, 3), ckpt(resumed, 3))
    proc = run_train(fsdp_args(resumed, "--resume", "auto"), nproc=2)
    assert "at step 3" in proc.stdout
    assert_same_state(ckpt(out, 6), ckpt(resumed, 6))


@pytest.mark.slow
def test_tiny_config_overfits_a_small_fixed_set(tiny):
    """--synthetic 4: four fixed random latents and captions, seen 200 times; also logs to wandb offline (when
    wandb, an optional package, is installed)."""
    out = tiny.root / "overfit"
    use_wandb = importlib.util.find_spec("wandb") is not None
    run_train(["--phase", "tiny", "--synthetic", 4, "--text_encoder", tiny.clip, "--out_dir", out, "--val_prompts",
               "", "--epoch_samples", 400, "--epochs", 2, "--cfg_dropout", 0, "--loss_weighting", "none", "--lr", "2e-3",
               "--warmup_steps", 10, "--log_every", 20, "--wandb", "offline" if use_wandb else "disabled"])
    mse = logged(out, "mse")
    first, last = mse[20], mse[200]
    assert last < first / 3, mse
    if use_wandb:
        assert list((out / "wandb").glob("offline-run-*")) and (out / "wandb_id.txt").exists()


@pytest.mark.slow
def test_init_loads_unet_weights_only(tiny, ref_run):
    out = tiny.root / "init"
    export = ref_run / "ema_final.safetensors"
    run_train(base_args(tiny, out) + ["--init", export, "--lr", 0, "--max_steps", 1, "--seed", 7])
    state = load_ckpt(ckpt(out, 1))
    weights, _, _ = SD_Model.read_unet_state(export)
    assert all(torch.equal(state["unet"][k], v.float()) for k, v in weights.items())   # lr 0: still the init
    assert state["progress"]["step"] == 1 and state["optimizer"]["state"]  # fresh optimizer, one step old
    assert next(iter(state["optimizer"]["state"].values()))["step"].item() == 1


@pytest.mark.slow
def test_non_finite_losses_stop_the_run_and_keep_the_last_good_checkpoint(tiny):
    out = tiny.root / "diverged"
    proc = run_train(base_args(tiny, out) + ["--lr", "1e30", "--warmup_steps", 0, "--max_bad_steps", 2,
                                             "--save_steps", 1, "--max_steps", 8], check=False)
    assert proc.returncode == 1
    m = re.search(r"error: 2 non-finite losses in a row \(steps (\d+)-(\d+)\); stopped without saving\. Last good "
                  r"checkpoint: (\S+)\. Lower --lr", proc.stderr)
    assert m, proc.stderr[-2000:]
    first_bad, last_bad = int(m.group(1)), int(m.group(2))
    assert last_bad == first_bad + 1 and first_bad >= 2                        # step 1 (at init) was finite
    assert [s for s, _ in SD_Train.list_checkpoints(out)] == list(range(1, first_bad))
    # the checkpoint of step first_bad - 1 holds the weights whose loss blew up (~1e30 after one update): not good
    assert m.group(3) == (str(ckpt(out, first_bad - 2)) if first_bad >= 3 else "none")


@pytest.mark.slow
def test_the_runs_own_export_samples_and_exports_with_no_model_flags(ref_run, tmp_path):
    """After a phase, as a user: SD_ImageGen.py samples ema_final.safetensors with no model flags (its meta names
    the VAE, text encoder, schedule and resolution, written by the run itself). Its default (fp16) exports draw
    that image everywhere with no other arguments: diffusers' plain from_pretrained(DIR), from_single_file(FILE,
    config=DIR), and SD_ImageGen.py on the single file alone (which carries its own VAE, text encoder, tokenizer)."""
    import SD_ImageGen
    from PIL import Image
    from conftest import diffusers_draw
    export, prompt = ref_run / "ema_final.safetensors", "a red circle"

    def imagegen(*argv):
        SD_ImageGen.main(SD_ImageGen.build_parser().parse_args(["--ckpt", *map(str, argv), "--prompt", prompt,
                                                                "--steps", "3", "--seed", "1", "--device", "cpu"]))

    def image(path):
        return np.asarray(Image.open(path), dtype=np.float64)

    imagegen(export, "--out", tmp_path / "ours.png")
    ours = image(tmp_path / "ours.png")
    assert ours.shape == (RES, RES, 3)                                          # the run's resolution
    imagegen(export, "--export", "diffusers", tmp_path / "exp")
    imagegen(export, "--export", "single-file", tmp_path / "exp.safetensors")
    imagegen(tmp_path / "exp.safetensors", "--out", tmp_path / "single.png")
    drawn = {"SD_ImageGen single file": image(tmp_path / "single.png"),
             "from_pretrained": diffusers_draw(tmp_path / "exp", prompt, steps=3, seed=1, size=RES),
             "from_single_file": diffusers_draw(tmp_path / "exp", prompt, steps=3, seed=1, size=RES,
                                                single_file=tmp_path / "exp.safetensors")}
    for name, img in drawn.items():
        assert np.abs(img - ours).max() <= 1.0, name                            # fp16 weights: within a level


@pytest.mark.slow
def test_sigterm_under_torchrun_checkpoints_the_step_and_resume_is_bitwise_exact(tiny, ref_run):
    """A pod's preemption: SIGTERM to torchrun, which forwards it to both ranks. They finish the step, agree, save
    it and exit non-zero with one line; --resume auto then ends equal to the uninterrupted run, logged losses too."""
    out, output = tiny.root / "sigterm", tiny.root / "sigterm.out"
    proc = start_until_step(ref_args(tiny, out), output)
    os.kill(proc.pid, signal.SIGTERM)
    time.sleep(0.2)
    for pid in descendants(proc.pid):                # a second signal, straight to the ranks: changes nothing
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    assert proc.wait(timeout=120) != 0
    m = re.search(r"error: stopped by SIGTERM at step (\d+); checkpoint (\S+); continue with --resume auto",
                  output.read_text())
    assert m, output.read_text()[-3000:]
    stopped = int(m.group(1))
    assert 5 <= stopped < REF_STEPS and Path(m.group(2)) == ckpt(out, stopped)   # the step it was in: nothing lost
    assert load_ckpt(ckpt(out, stopped))["progress"]["step"] == stopped
    proc = run_train(ref_args(tiny, out, "--resume", "auto"), nproc=2)
    assert f"at step {stopped} " in proc.stdout
    later = [s for s, _ in SD_Train.list_checkpoints(ref_run) if s > stopped]
    assert later and [s for s, _ in SD_Train.list_checkpoints(out)] == [4, stopped] + later
    for step in later:
        assert_same_state(ckpt(ref_run, step), ckpt(out, step))
    for name in ("loss", "mse", "lr", "grad"):
        assert {s: v for s, v in logged(out, name).items() if s > stopped} == \
            {s: v for s, v in logged(ref_run, name).items() if s > stopped}, name


@pytest.mark.slow
def test_resume_skips_a_damaged_newest_checkpoint_and_keeps_it(tiny, ref_run, tmp_path):
    out = tmp_path / "damaged"
    (out / "checkpoints").mkdir(parents=True)
    for step in (4, 8):
        shutil.copy(ckpt(ref_run, step), ckpt(out, step))
    data = ckpt(out, 8).read_bytes()
    ckpt(out, 8).write_bytes(data[:len(data) // 2])                             # a save cut short by a dead node
    proc = run_train(ref_args(tiny, out, "--resume", "auto"), nproc=2)
    assert "skipping checkpoint step_00000008.pt, it does not verify" in proc.stdout
    assert "resumed from" in proc.stdout and "at step 4 " in proc.stdout
    assert_same_state(ckpt(ref_run, 10), ckpt(out, 10))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu_and_skips_a_non_finite_step(tiny, precision, tmp_path):
    """Autocast bf16, and fp16 with its GradScaler (NeMo's O1), run on CPU. One latent of the data is inf, so
    exactly one step of the epoch has a non-finite loss: it is skipped and counted, and the steps after it train
    normally (the seed's skip path left fp16's scaler un-updated, and the next step crashed in unscale_)."""
    lat, cap = tmp_path / "lat", tiny.a[1]
    shutil.copytree(tiny.a[0], lat)
    key = sorted(sd_latents.existing_latent_keys(lat))[0]
    sd_latents.write_latent(lat, key, np.full(LATENT, np.inf, np.float16))
    out = tmp_path / "run"
    proc = run_train(base_args(tiny, out, (lat, cap)) + ["--precision", precision, "--max_steps", 8,
                                                         "--save_steps", 1, "--loss_weighting", "none"])
    assert len(re.findall(r"non-finite loss .*; step skipped \(1 in a row, 1 in all\)", proc.stdout)) == 1
    last = SD_Train.list_checkpoints(out)[-1][1]
    state = load_ckpt(last)
    assert state["progress"]["bad_steps"] == 1 and state["progress"]["step"] >= 7
    assert all(torch.isfinite(v).all() for v in state["unet"].values())
    assert len([v for v in logged(out, "mse").values() if math.isfinite(v)]) == 7   # the 7 other steps trained


@pytest.mark.slow
def test_ddp_no_sync_accumulation_equals_one_process_at_the_same_global_batch(tiny, single_run):
    """2 ranks x batch 1 x accum 2: the first micro-step of each step skips DDP's all-reduce (no_sync)."""
    out = tiny.root / "ddp_accum"
    run_train(ref_args(tiny, out, "--batch_size", 1, "--grad_accum", 2), nproc=2)
    for key in ("unet", "ema"):
        assert max_diff(ckpt(single_run, REF_STEPS), ckpt(out, REF_STEPS), key) < 5e-6, key


@pytest.mark.slow
def test_two_nodes_on_localhost_equal_one_node_with_two_processes(tiny, ref_run):
    """The README's multi-node command as 2 'nodes' of one process each (c10d rendezvous on 127.0.0.1, gloo):
    bitwise the same run as one node with 2 processes."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tiny.root / "two_nodes"
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two_nodes",
               str(REPO / "SD_Train.py"), *map(str, ref_args(tiny, out))]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    for step in (REF_SAVE, REF_STEPS):
        assert_same_state(ckpt(ref_run, step), ckpt(out, step))


def test_a_disk_too_small_for_one_checkpoint_is_one_line_before_training(tiny, tmp_path, monkeypatch):
    import collections
    import shutil as shutil_module
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10 ** 9, 10 ** 9 - 10 ** 6, 10 ** 6))
    with pytest.raises(SD_Model.UserError, match=r"has 0.00 GB free but one checkpoint of this UNet takes 0.04 GB"):
        run_main(*base_args(tiny, tmp_path / "run"))
    assert not SD_Train.list_checkpoints(tmp_path / "run")


#################################################################################
#               Watching the run: TensorBoard, the loss curve, the dry run      #
#################################################################################

def test_logger_choice_maps_the_older_wandb_flag_and_names_a_missing_package(monkeypatch):
    import importlib.util
    pick = lambda logger, mode="disabled": SD_Train.pick_loggers({"logger": logger, "wandb": mode})  # noqa: E731
    assert pick("auto") == (True, None)                           # tensorboard is in requirements.txt
    assert pick("auto", "offline") == (True, "offline")           # the older `--wandb offline` alone still works
    assert pick("tensorboard") == (True, None) and pick("none") == (False, None)
    assert pick("wandb") == (False, "online") and pick("both", "offline") == (True, "offline")
    with pytest.raises(SD_Model.UserError, match="--wandb offline asks for wandb but --logger tensorboard leaves"):
        pick("tensorboard", "offline")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name))
    assert pick("auto") == (False, None)                          # a pod without it: auto only notes it
    with pytest.raises(SD_Model.UserError, match=r"needs the tensorboard package: pip install tensorboard"):
        pick("both")


def tensorboard_events(out):
    """A run folder's event files, read by TensorBoard's own loader (which applies purge_step as the UI does)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


@pytest.mark.slow
def test_tensorboard_events_metrics_and_loss_curve_across_a_resume(tiny, tmp_path, monkeypatch):
    """--logger tensorboard, read back with TensorBoard's EventAccumulator: every scalar of the log line at every
    step, the validation loss and grid at every validation. A run stopped after logging step 3 whose checkpoint of
    step 3 was lost resumes at 2: step 3 is logged again and appears once (TensorBoard hides the stopped run's,
    metrics.jsonl drops it), and loss_curve.png is redrawn at the next validation."""
    from PIL import Image
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    args = [*base_args(tiny, out), "--logger", "tensorboard", "--save_steps", 2, "--val_steps", 2,
            "--val_prompts", "a red circle|a blue square", "--vae", tiny.vae]
    run_main(*args, "--max_steps", 3)                                            # validates at 2, saves 2 and 3
    curve_at_2 = np.asarray(Image.open(out / "loss_curve.png"))
    ckpt(out, 3).unlink()
    run_main(*args, "--max_steps", 4, "--resume", "auto")                        # from step 2; validates at 4
    events = tensorboard_events(out)
    train_tags = {"train/loss", "train/mse", "train/lr", "train/grad_norm", "train/img_per_s", "train/rss_gb",
                  *(f"train/mse_q{i}" for i in range(4))}
    val_tags = {"val/loss", *(f"val/loss_t{t}" for t in (100, 300, 500, 700, 900))}
    assert train_tags | val_tags <= set(events.Tags()["scalars"])
    for tag in train_tags:
        assert [e.step for e in events.Scalars(tag)] == [1, 2, 3, 4], tag
    for tag in val_tags:
        assert [e.step for e in events.Scalars(tag)] == [2, 4], tag
    loss = {e.step: e.value for e in events.Scalars("train/loss")}
    assert loss == pytest.approx(logged(out, "loss"), abs=1e-4)                  # train.log's (last) line per step
    lr = {e.step: e.value for e in events.Scalars("train/lr")}
    assert lr == pytest.approx(logged(out, "lr"), rel=1e-3)
    grids = events.Images("val/images")
    assert [g.step for g in grids] == [2, 4] and (grids[1].width, grids[1].height) == (2 * RES, RES)
    grid = np.asarray(Image.open(io.BytesIO(grids[1].encoded_image_string)).convert("RGB"))
    assert np.array_equal(grid, np.asarray(Image.open(out / "samples" / "step_00000004.png").convert("RGB")))
    # metrics.jsonl: each step once, the same values; the curve was redrawn with the steps after 2
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "train/loss" in h] == [1, 2, 3, 4]
    assert [h["step"] for h in history if "val/loss" in h] == [2, 4]
    assert {h["step"]: h["train/loss"] for h in history if "train/loss" in h} == pytest.approx(loss, rel=1e-6)
    curve_at_4 = np.asarray(Image.open(out / "loss_curve.png"))
    assert curve_at_4.shape == curve_at_2.shape == (520, 900, 3) and not np.array_equal(curve_at_4, curve_at_2)


def test_loss_curve_puts_each_point_on_a_log_axis():
    """Two series drawn by draw_loss_curve: the points' pixels carry their series' colour where a log axis puts
    them (three decades apart -> evenly spaced rows), and non-finite or non-positive values are left out."""
    steps = [0, 50, 100]
    img = np.asarray(SD_Train.draw_loss_curve({"a": [(s, v) for s, v in zip(steps, (1.0, 0.1, 0.01))],
                                               "b": [(50, float("nan")), (60, 0.0), (100, 1.0)]}))

    def colour_rows(colour):
        ys, xs = np.nonzero((np.abs(img.astype(int) - colour).sum(-1) < 30))
        return ys, xs
    ys, xs = colour_rows((31, 119, 180))
    dots = [ys[np.abs(xs - x) <= 1].mean() for x in (xs.min() + 3, (xs.min() + xs.max()) / 2, xs.max() - 3)]
    assert abs((dots[1] - dots[0]) - (dots[2] - dots[1])) < 3 and dots[2] > dots[1] > dots[0]   # equal decades
    ys_b, xs_b = colour_rows((255, 127, 14))
    assert len(ys_b) and xs_b.max() > xs.max() - 5                               # b's one finite point, at step 100


def summary_rows(output):
    """{label: value} of every printed summary table row."""
    return {k.strip(): v.strip() for line in output.splitlines() if " | " in line for k, v in [line.split(" | ", 1)]}


def test_dry_run_prints_the_plan_and_writes_nothing(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "runs" / "tiny"
    before = sorted(tmp_path.rglob("*"))
    run_main(*base_args(tiny, out), "--epochs", 2, "--save_steps", 3, "--keep_last", 2, "--dry_run", 2)
    assert sorted(tmp_path.rglob("*")) == before and not out.exists()           # not even the run folder
    text = capsys.readouterr().out
    rows = summary_rows(text)
    n = sum(p.numel() for p in SD_Model.build_unet("small").parameters())
    ckpt_gb = 16 * n * 1.02 / 1e9
    assert rows["UNet parameters"] == f"{n:,}" and rows["dataset latents:train"] == "32"
    assert rows["samples per epoch"] == "32" and rows["global batch"] == "4 (4 x 1 accum x 1 ranks)"
    assert rows["steps"] == "8/epoch x 2 epochs = 16"
    assert re.fullmatch(r"\d+\.\d{3} s \(median of 2, fp32 on cpu\)", rows["step time"])
    sec = float(rows["step time"].split()[0])
    assert re.fullmatch(r"[\d,.]+ \([\d,.]+ per rank\)", rows["img/s"]) and rows["MFU"] == "n/a (CPU)"
    hours = lambda label: float(rows[label].split()[0].replace(",", ""))  # noqa: E731
    assert rows["estimated hours"].endswith(" for 16 steps") and hours("estimated hours") == \
        pytest.approx(16 * sec / 3600, abs=0.006)                               # sec as printed, to 1 ms
    assert re.fullmatch(r"\d+\.\d\d GB RSS \(CPU\)", rows["memory"])
    # checkpoints at steps 3, 6, 8 (epoch end), 9, 12, 15 and 16 (epoch end, last): 7, at most 2 + 1 on disk
    assert rows["checkpoints"] == f"{ckpt_gb:.2f} GB each, 7 written, 3 on disk at once (keep_last 2)"
    assert rows["disk needed"] == f"{(3 * 16 * n * 1.02 + 2 * n) / 1e9:.2f} GB (checkpoints + {2 * n / 1e9:.2f} GB " \
                                  "EMA export)"
    assert rows["disk free"].endswith(f"at {tmp_path}: room enough")
    assert hours("8 processes: global batch 32, 2 steps") == pytest.approx(2 * 32 / (4 / sec * 8) / 3600, abs=0.006)
    assert "note: these are CPU figures" in text
    # with buckets: whole steps of one bucket (each bucket's leftover dropped), timed at the largest bucket
    run_main(*base_args(tiny, out, tiny.bucketed), "--buckets", "true", "--dry_run", 1)
    records = sd_latents.read_bucket_records(tiny.bucketed[0])
    per_bucket = np.bincount([records[f"bucketed{i:05d}"] for i in range(40)], minlength=3)     # the train split
    steps = int((per_bucket // 4).sum())
    assert summary_rows(capsys.readouterr().out)["steps"] == f"{steps}/epoch x 1 epochs = {steps}" and steps < 40 // 4
    for bad in (0, -1, "abc"):
        with pytest.raises(SD_Model.UserError, match=rf"--dry_run STEPS: how many steps to time, at least 1 \(got "
                                                     rf"'{bad}'\)"):
            run_main(*base_args(tiny, out), "--dry_run", bad)
