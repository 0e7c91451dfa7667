"""The latent dataset format, writer and reader in one place: encode_latents.py writes it, SD_Train.py reads it,
mixes several datasets by ratio and hands each rank its micro-batches with every sample's noise.

    OUT/latent_info.json           {"vae", "scaling_factor", "resolution", "latent_shape", "dtype": "float16",
                                    "count"}
    OUT/latents/<key[:5]>/<key>.npy float16 latent_shape (4, res/f, res/f for a VAE downsampling f), already
                                    x scaling_factor
    CAPTIONS/ (05_build_hf_dataset.py) a DatasetDict ("train", "validation") of (image_key, caption,
                                    input_ids[tokenizer.model_max_length]) saved with save_to_disk

Reads top to bottom: the files (write / read one latent, latent_info.json, captions) -> a source (one latent
folder + its captions, partly in RAM) -> the epoch order (mix ratios, shards, per-sample randomness) -> batches.
"""
import io
import json
import os
import threading
from pathlib import Path
from queue import Queue

import numpy as np
import torch
from tqdm import tqdm

from sd_common import UserError, write_atomic

#################################################################################
#                                 The Files                                     #
#################################################################################

LATENT_INFO = "latent_info.json"


def latent_path(root, key):
    """Where the latent of `key` lives: sharded by the key's first 5 characters so no folder holds
    millions of files."""
    return Path(root) / "latents" / key[:5] / f"{key}.npy"


def write_latent(root, key, latent):
    """Save one fp16 latent atomically. No fsync: millions of 32 KB files, and the rename alone already keeps a
    killed process from leaving a part behind. `shared`: a key in shards of two encode_latents ranks is written by
    both, each through its own temp name."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(latent, dtype=np.float16))
    write_atomic(latent_path(root, key), buf.getvalue(), fsync=False, shared=True)


def read_latent(root, key, shape=None):
    """The float16 latent of `key`; with `shape`, one that is not float16 of that shape (latent_info.json's
    promise) is a one-line error naming the file."""
    path = latent_path(root, key)
    try:
        x = np.load(path)
    except (OSError, ValueError) as e:
        raise UserError(f"unreadable latent '{path}' ({type(e).__name__}: {e})") from None
    if shape is not None and (x.shape != tuple(shape) or x.dtype != np.float16):
        raise UserError(f"latent '{path}' is {x.dtype}{list(x.shape)}, but latent_info.json of '{root}' promises "
                        f"float16{list(shape)}")
    return x


def existing_latent_keys(root):
    """Keys whose latent file is already written (one scandir per shard folder, not a stat per key)."""
    base = Path(root) / "latents"
    if not base.is_dir():
        return set()
    return {e.name[:-4] for d in os.scandir(base) if d.is_dir()
            for e in os.scandir(d.path) if e.name.endswith(".npy")}


def load_latent_info(root):
    """latent_info.json of a latent folder, with a clear error when it is not one."""
    path = Path(root) / LATENT_INFO
    if not path.exists():
        raise UserError(f"'{root}' is not a latent folder (no {LATENT_INFO}); run encode_latents.py first")
    return json.loads(path.read_text())


def write_latent_info(root, info):
    write_atomic(Path(root) / LATENT_INFO, json.dumps(info, indent=2) + "\n", shared=True)   # every rank writes it


def open_captions(root, split):
    """The (image_key, caption, input_ids) split written by 05_build_hf_dataset.py."""
    import datasets
    if not (Path(root) / "dataset_dict.json").exists():
        raise UserError(f"'{root}' is not a caption dataset; run 05_build_hf_dataset.py first")
    dd = datasets.load_from_disk(str(root))
    if split not in dd:
        raise UserError(f"caption dataset '{root}' has no split '{split}' (has {list(dd)})")
    return dd[split]


#################################################################################
#                      Sources, Mixing and Per-Sample Randomness                #
#################################################################################

class LatentSource:
    """One latent folder with its caption split, as arrays: keys, token ids (n, 77) and, for the first
    `latent_fraction` of the samples, the latents in RAM (the others are read from disk batch by batch)."""

    def __init__(self, name, root, keys, ids, latent_shape, info, ram=None):
        self.name, self.root, self.keys, self.ids, self.info = name, root, keys, ids, info
        self.latent_shape = tuple(latent_shape)
        self.ram = ram if ram is not None else np.empty((0, *self.latent_shape), np.float16)

    def __len__(self):
        return len(self.ids)

    def read_one(self, i):
        return read_latent(self.root, self.keys[i], self.latent_shape)

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
    """(A LatentSource for one `datasets` entry, or a clear error for every way it can fail to fit; the number
    of its captions without a latent; for the train split, the number of latents whose key no split's captions
    hold). Both counts are data lost between the steps (a tar tokenized while still being written, one encoded
    but never tokenized): the trainer says so."""
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
    tokens = text.max_length                         # 77 for CLIP: every caption is this many ids
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False)
    if (lengths != tokens).any():
        raise UserError(f"{int((lengths != tokens).sum())} captions in '{captions}' ({split}) have token id lists of "
                        f"length {sorted(set(lengths.tolist()) - {tokens})[:5]}, not {tokens}; tokenize them with "
                        f"the text encoder's tokenizer padded to {tokens} (04_preprocess_to_cache.py)")
    keys = table.column("image_key").to_pylist()
    ids = table.column("input_ids").combine_chunks().flatten().to_numpy().reshape(-1, tokens)
    if "caption" in table.column_names:
        # CLIP-L and OpenCLIP-H share a vocabulary but pad differently (end-of-text vs "!"): SD1 token ids fed to
        # SD2 pass every size check and silently train on the wrong padding. Re-tokenize a few captions to see.
        probe = table.column("caption").slice(0, 8).to_pylist()
        if (text.tokenize(probe).numpy() != ids[:len(probe)]).any():
            raise UserError(f"the token ids in '{captions}' are not what '{text.name}' gives for their captions; "
                            f"they were tokenized for another text encoder: rerun 04_preprocess_to_cache.py with "
                            f"--tokenizer {text.name} and 05_build_hf_dataset.py")
    have = existing_latent_keys(root)
    orphans = None
    if split == "train":
        import datasets
        named = {k for s in datasets.load_from_disk(str(captions)).values() for k in s.data.column("image_key").to_pylist()}
        orphans = len(have - named)
    keep = [i for i, k in enumerate(keys) if k in have]
    if not keep:
        raise UserError(f"none of the {len(keys)} '{split}' captions in '{captions}' has a latent in '{root}'; "
                        "encode the same image keys with encode_latents.py")
    source = LatentSource(f"{root.name}:{split}", root, [keys[i] for i in keep], ids[keep].astype(np.int64),
                          shape, info)
    source.read_one(0)                               # the first file must match latent_info.json too
    return source, len(keys) - len(keep), orphans


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


def sample_randomness(seed, epoch, positions, shape, draw_t, cfg_dropout, noise_offset=0.0):
    """Timestep, CFG-dropout coin and noise (plus noise_offset x a per-channel constant) of each sample, a pure
    function of (seed, epoch, position in the epoch): the same sample gets the same draws whatever the world
    size, micro-batching or resume point, which is what makes DDP == one process, accumulation == a bigger
    batch and resume == no interruption. `draw_t(rng)` draws one timestep (SD_Model.NoiseSchedule.draw_train_t:
    DDPM's integer t, or a flow model's continuous one).
    A counter-based Philox stream per sample (key = seed, epoch; counter = position) keeps every stream
    distinct; torch's CPU generator would keep only 32 bits of a combined seed."""
    t, drop, noise = [], [], []
    for p in positions:
        rng = np.random.Generator(np.random.Philox(counter=[0, p, 0, 0], key=[seed, epoch]))
        t.append(draw_t(rng))
        drop.append(rng.random() < cfg_dropout)
        noise.append(rng.standard_normal(tuple(shape), dtype=np.float32))
        if noise_offset:                                  # drawn last: offset 0 leaves every other draw as it was
            noise[-1] += noise_offset * rng.standard_normal((shape[0], 1, 1), dtype=np.float32)
    return torch.tensor(t), torch.tensor(drop), torch.from_numpy(np.stack(noise))   # t: int64, or float32 (flow)


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
        ids = np.empty((len(rows), self.sources[0].ids.shape[1]), np.int64)
        for s, source in enumerate(self.sources):
            at = np.flatnonzero(rows[:, 0] == s)
            if len(at):
                latents[at] = source.read(rows[at, 1], self.pool)
                ids[at] = source.ids[rows[at, 1]]
        return torch.from_numpy(latents), torch.from_numpy(ids)


def step_batches(mix, order, first_step, cfg, world, rank, epoch, draw_t, pin):
    """Yield (step_in_epoch, [micro-batch dicts]) from `first_step` on; skipped steps load nothing."""
    B, A = cfg["batch_size"], cfg["grad_accum"]
    for p in range(first_step, len(order) // (B * A * world)):
        micro = []
        for a in range(A):
            pos = micro_slice(p, a, rank, B, A, world)
            latents, ids = mix.read(order[pos.start:pos.stop])
            t, drop, noise = sample_randomness(cfg["seed"], epoch, pos, latents.shape[1:], draw_t,
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
