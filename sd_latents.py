"""The latent dataset format, writer and reader in one place: encode_latents.py writes it, SD_Train.py reads it,
mixes several datasets by ratio and hands each rank its micro-batches with every sample's noise.

    OUT/latent_info.json           {"vae", "scaling_factor", "resolution", "latent_shape", "dtype": "float16",
                                    "count"}
    OUT/latents/<key[:5]>/<key>.npy float16 latent_shape (4, res/f, res/f for a VAE downsampling f), already
                                    x scaling_factor
  aspect-bucketed (encode_latents.py --buckets), instead of "latent_shape":
    OUT/latent_info.json           "buckets": [[width, height] px, ...] (sd_data.aspect_buckets of the resolution),
                                    "latent_shapes": [[4, height/f, width/f], ...], "bucket_counts"
    OUT/buckets/part-<rank>.tsv    "key<TAB>bucket index" lines, appended once a batch's latents are written
    CAPTIONS/ (05_build_hf_dataset.py) a DatasetDict ("train", "validation") of (image_key, caption,
                                    input_ids[tokenizer.model_max_length]) saved with save_to_disk

Reads top to bottom: the files (write / read one latent, latent_info.json, bucket records, captions) -> a source
(one latent folder + its captions, partly in RAM) -> the epoch order (mix ratios, aspect buckets, shards,
per-sample randomness) -> batches.
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


def bucket_records_path(root, rank):
    return Path(root) / "buckets" / f"part-{rank:05d}.tsv"


def append_bucket_records(root, rank, keys, buckets):
    """Record each key's aspect bucket: one append per batch, after its latents are written, so a recorded key
    always has its latent (a key whose latent was written but not recorded is encoded again)."""
    path = bucket_records_path(root, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab+") as f:
        end = f.seek(0, os.SEEK_END)
        cut = end > 0 and f.seek(end - 1) >= 0 and f.read(1) != b"\n"          # a line a kill cut short: end it
        f.write((b"\n" if cut else b"") + "".join(f"{k}\t{b}\n" for k, b in zip(keys, buckets)).encode())


def read_bucket_records(root):
    """{key: bucket index} from every rank's records; lines a kill cut short are ignored."""
    out = {}
    for path in sorted((Path(root) / "buckets").glob("part-*.tsv")):
        for line in path.read_text().split("\n")[:-1]:   # the last piece is '' or a cut line
            fields = line.split("\t")
            if len(fields) == 2 and fields[1].isdigit():
                out[fields[0]] = int(fields[1])
    return out


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
    """One latent folder with its caption split, as arrays: keys, token ids (n, 77), each sample's aspect bucket
    (an index into `shapes`, the latent shape of each bucket, and `sizes`, its (width, height) in pixels; a square
    folder has one bucket) and, for the first `latent_fraction` of the samples, the latents in RAM, one array per
    bucket (the others are read from disk batch by batch)."""

    def __init__(self, name, root, keys, ids, shapes, info, sizes, bucket=None, ram=None):
        self.name, self.root, self.keys, self.ids, self.info = name, root, keys, ids, info
        self.shapes, self.sizes = [tuple(s) for s in shapes], [tuple(s) for s in sizes]
        self.bucket = np.zeros(len(ids), np.int64) if bucket is None else np.asarray(bucket, np.int64)
        self.slot = np.empty(len(ids), np.int64)                    # position of a sample within its bucket
        for b in range(len(self.shapes)):
            members = np.flatnonzero(self.bucket == b)
            self.slot[members] = np.arange(len(members))
        self.ram = ram if ram is not None else [np.empty((0, *s), np.float16) for s in self.shapes]
        self.n_ram = len(self) if ram is not None else 0            # samples [0, n_ram) are in RAM

    def __len__(self):
        return len(self.ids)

    def read_one(self, i):
        return read_latent(self.root, self.keys[i], self.shapes[self.bucket[i]])

    def load_into_ram(self, fraction, pool, show):
        n = round(fraction * len(self))
        self.ram = [np.empty((int((self.bucket[:n] == b).sum()), *s), np.float16) for b, s in enumerate(self.shapes)]

        def read(i):
            self.ram[self.bucket[i]][self.slot[i]] = self.read_one(i)
        list(tqdm(pool.map(read, range(n)), total=n, disable=not show or n == 0, desc=f"loading {self.name}",
                  unit="latent", mininterval=2))
        self.n_ram = n

    def read(self, idx, pool):
        """Latents of sample indices `idx`, all of one bucket, as (len(idx), 4, h, w) float16."""
        b = self.bucket[idx[0]] if len(idx) else 0
        out = np.empty((len(idx), *self.shapes[b]), np.float16)
        in_ram = idx < self.n_ram
        out[in_ram] = self.ram[b][self.slot[idx[in_ram]]]
        disk = np.flatnonzero(~in_ram)
        for j, x in zip(disk, pool.map(self.read_one, idx[disk])):
            out[j] = x
        return out


def open_source(spec, split, resolution, in_channels, text, buckets=False):
    """(A LatentSource for one `datasets` entry, or a clear error for every way it can fail to fit; the number
    of its captions without a latent; for the train split, the number of latents whose key no split's captions
    hold). Both counts are data lost between the steps (a tar tokenized while still being written, one encoded
    but never tokenized): the trainer says so. `buckets`: aspect-bucketed folders are welcome (a square one is
    then a single bucket); without it they are refused."""
    import pyarrow.compute as pc
    root, captions = Path(spec["latents"]), Path(spec["captions"])
    info = load_latent_info(root)
    if info.get("resolution") != resolution:
        raise UserError(f"latents in '{root}' were encoded at {info.get('resolution')} px but this phase trains at "
                        f"{resolution} px; encode them at {resolution} or set --resolution")
    if "buckets" in info:
        if not buckets:
            raise UserError(f"'{root}' holds aspect-bucketed latents ({len(info['buckets'])} sizes, encode_latents.py "
                            "--buckets); train on them with --buckets true, or encode square latents without --buckets")
        shapes, sizes = info.get("latent_shapes", []), info["buckets"]
    else:
        shapes, sizes = [info.get("latent_shape", [])], [[resolution, resolution]]
        # square latents whose side divides the resolution (by the VAE's factor: SD's 8, the demo's 4)
        if len(shapes[0]) != 3 or shapes[0][1] != shapes[0][2] or resolution % shapes[0][1]:
            raise UserError(f"latent_info.json of '{root}' says latent_shape {shapes[0]}; square latents at "
                            f"{resolution} px are [{in_channels}, {resolution}/f, {resolution}/f] (f: the VAE's "
                            "downsampling)")
    if not shapes or len(shapes) != len(sizes) or info.get("dtype") != "float16" or \
            any(len(sh) != 3 or sh[0] != in_channels for sh in shapes):
        raise UserError(f"latent_info.json of '{root}' says {info.get('dtype')}{shapes}; this UNet trains on "
                        f"float16 latents of {in_channels} channels")
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
                            f"--text_encoder {text.name} and 05_build_hf_dataset.py")
    have = existing_latent_keys(root)
    records = read_bucket_records(root) if "buckets" in info else dict.fromkeys(have, 0)
    done = have & records.keys()                     # a bucketed latent without its record: not finished
    orphans = None
    if split == "train":
        import datasets
        named = {k for s in datasets.load_from_disk(str(captions)).values() for k in s.data.column("image_key").to_pylist()}
        orphans = len(done - named)
    keep = [i for i, k in enumerate(keys) if k in done]
    if not keep:
        raise UserError(f"none of the {len(keys)} '{split}' captions in '{captions}' has a latent in '{root}'; "
                        "encode the same image keys with encode_latents.py")
    bucket = np.array([records[keys[i]] for i in keep], np.int64)
    if bucket.max() >= len(shapes):
        raise UserError(f"'{root}/buckets' names bucket {bucket.max()}, but latent_info.json lists {len(shapes)}")
    source = LatentSource(f"{root.name}:{split}", root, [keys[i] for i in keep], ids[keep].astype(np.int64),
                          shapes, info, sizes, bucket)
    source.read_one(0)                               # the first file must match latent_info.json too
    return source, len(keys) - len(keep), orphans


def synthetic_source(n, shapes, sizes, text, seed, name):
    """n random latents and short captions: the data contract without data. Sample i is in bucket i mod the
    number of `shapes` (latent shapes; `sizes` their pixel sizes)."""
    g = torch.Generator().manual_seed(seed)
    bucket = np.arange(n) % len(shapes)
    ram = [torch.randn((int((bucket == b).sum()), *s), generator=g).half().numpy() for b, s in enumerate(shapes)]
    ids = text.tokenize([f"a photo of synthetic sample {i}" for i in range(n)]).numpy().astype(np.int64)
    return LatentSource(name, None, None, ids, shapes, {}, sizes, bucket, ram=ram)


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


def bucket_counts(bucket_sizes, ratios, epoch_samples):
    """(S, K) samples that source s gives aspect bucket k each epoch: its ratio share of the epoch (mix_counts),
    split over its buckets in proportion to their sizes (largest remainder). The same every epoch, so an epoch
    has the same number of steps; a full pass over a source takes every sample of every bucket once."""
    bucket_sizes = np.asarray(bucket_sizes, np.int64)                              # (S, K)
    counts = np.zeros_like(bucket_sizes)
    for s, c in enumerate(mix_counts(bucket_sizes.sum(1), ratios, epoch_samples)):
        if c:
            counts[s] = mix_counts(bucket_sizes[s], bucket_sizes[s], c)
    return counts


def bucket_epoch_order(buckets, ratios, epoch_samples, step_samples, seed, epoch):
    """The epoch's samples as (n, 2) [source, index] rows, in whole optimizer steps of `step_samples` (batch x
    accumulation x ranks) that each hold one aspect bucket: so at every step every rank and micro-batch has one
    latent shape. `buckets[s]` is the bucket of each sample of source s. Each (source, bucket) gives its
    bucket_counts share from reshuffled passes over itself; each bucket's samples are shuffled together and cut
    into steps, and the steps of all buckets are shuffled. A bucket's last len % step_samples samples are
    dropped for this epoch (a different few each epoch, as the bucket is reshuffled). Seeded by (seed, epoch)."""
    K = 1 + max(int(b.max()) for b in buckets)
    counts = bucket_counts([np.bincount(b, minlength=K) for b in buckets], ratios, epoch_samples)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    steps = []
    for k in range(K):
        parts = []
        for s, b in enumerate(buckets):
            members, c = np.flatnonzero(b == k), int(counts[s, k])
            if c:
                passes = torch.cat([torch.randperm(len(members), generator=g) for _ in range(-(-c // len(members)))])
                parts.append(np.stack([np.full(c, s), members[passes[:c].numpy()]], 1))
        if parts:
            rows = np.concatenate(parts)
            rows = rows[torch.randperm(len(rows), generator=g).numpy()]
            steps.append(rows[:len(rows) // step_samples * step_samples].reshape(-1, step_samples, 2))
    steps = np.concatenate(steps) if steps else np.zeros((0, step_samples, 2), np.int64)
    return steps[torch.randperm(len(steps), generator=g).numpy()].reshape(-1, 2)


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
    """All sources of a phase: the epoch order, and batches of (source, index) rows read from RAM or disk.
    `bucketed`: steps of one aspect bucket each (bucket_epoch_order); the buckets are the sources' latent shapes,
    so a square folder joins the bucket of its shape."""

    def __init__(self, sources, ratios, epoch_samples, pool, bucketed=False):
        self.sources, self.ratios, self.epoch_samples, self.pool = sources, ratios, epoch_samples, pool
        self.sizes, self.bucketed = [len(s) for s in sources], bucketed
        self.shapes = sorted({shape for s in sources for shape in s.shapes})           # the mix's buckets
        self.pixels = {shape: size for s in sources for shape, size in zip(s.shapes, s.sizes)}
        self.buckets = [np.array([self.shapes.index(shape) for shape in s.shapes])[s.bucket] for s in sources]

    def __len__(self):
        return self.epoch_samples or sum(self.sizes)

    def bucket_counts(self):
        """(S, K) samples each source gives each bucket per epoch."""
        return bucket_counts([np.bincount(b, minlength=len(self.shapes)) for b in self.buckets], self.ratios,
                             self.epoch_samples)

    def steps_per_epoch(self, step_samples):
        """Optimizer steps of `step_samples` per epoch (each bucket's leftover < one step is dropped)."""
        if self.bucketed:
            return int((self.bucket_counts().sum(0) // step_samples).sum())
        return len(self) // step_samples

    def epoch_order(self, seed, epoch, step_samples):
        if self.bucketed:
            return bucket_epoch_order(self.buckets, self.ratios, self.epoch_samples, step_samples, seed, epoch)
        return epoch_order(self.sizes, self.ratios, self.epoch_samples, seed, epoch)

    def bucket_of(self, rows):
        """The bucket (index into self.shapes) of each [source, index] row."""
        out = np.empty(len(rows), np.int64)
        for s, b in enumerate(self.buckets):
            at = rows[:, 0] == s
            out[at] = b[rows[at, 1]]
        return out

    def read(self, rows):
        """(latents (N, 4, h, w) float16, token ids (N, 77) int64) of `rows` [(source, index)] of one bucket, in
        order."""
        shape = set(self.bucket_of(rows).tolist())
        if len(shape) != 1:
            raise ValueError(f"a batch must hold one aspect bucket, these rows span {sorted(shape)}")
        latents = np.empty((len(rows), *self.shapes[shape.pop()]), np.float16)
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
