"""Encode webdataset tar shards into per-image fp16 VAE latents (.npy) for SD_Train.py.

The seed's 4-stage pipeline, each stage overlapping the next through bounded queues:
  1. shard prefetch   (thread)     read the next tar files into memory ahead of use
  2. tar extract      (thread)     split them into samples, drop keys already encoded, send chunks to ...
  3. decode + resize  (processes)  cv2 decode, shorter side to --resolution, centre crop (sd_data); with
                                   --buckets, resize to cover the nearest aspect bucket and centre crop
     then batching    (thread)     stack into uint8 batches of one size, pinned for an async copy on CUDA
  4. VAE encode       (main)       posterior mean x scaling factor (bf16, channels_last on CUDA), one batch
                                   in flight while the last one's latents come back through pinned memory;
                                   a writer thread saves each latent as fp16 .npy atomically (and, with
                                   --buckets, records each key's bucket).
Then OUT/preview.png: random samples, each source image beside the VAE's decode of its stored latent, so a wrong
colour space, a white 16-bit image or a bad scaling factor shows at a glance.
"""
import multiprocessing as mp
import os
import queue
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import SD_Model
import sd_data
import sd_latents
from sd_common import UserError, arg_parser, check_writable, pick_device, pick_dtype, run_main

DONE = object()  # end-of-stream marker passed down the queues


def decode_chunk(items, resolution, min_size, buckets=None):
    """Worker-process job: [(key, bytes)] -> ([(key, bucket, (h, w, 3) uint8)], Counter of skip reasons); without
    `buckets` every image is the (res, res) square, bucket 0."""
    import cv2
    cv2.setNumThreads(1)  # one image per process at a time; cv2's own threads would oversubscribe
    ok, skipped = [], Counter()
    for key, data in items:
        try:
            ok.append((key, *(sd_data.load_image_bucket(data, buckets, min_size) if buckets else
                              (0, sd_data.load_image_square(data, resolution, min_size)))))
        except sd_data.BadSample as e:
            skipped[f"skipped: {e}"] += 1
        except Exception as e:  # a codec crash on one odd file must not end a multi-day run
            skipped[f"skipped: decode error ({type(e).__name__})"] += 1
    return ok, skipped


class Stage(threading.Thread):
    """A daemon thread whose exception is kept and re-raised by the main loop (check())."""

    def __init__(self, fn, name):
        super().__init__(target=self._run, args=(fn,), name=name, daemon=True)
        self.error = None

    def _run(self, fn):
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 -- handed to the main thread, not swallowed
            self.error = e


def put(q, item, stop):
    """queue.put that gives up when the run is stopping (so no thread blocks forever on a full queue)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.2)
            return True
        except queue.Full:
            continue
    return False


def get(q, stop):
    """queue.get that returns DONE when the run is stopping."""
    while not stop.is_set():
        try:
            return q.get(timeout=0.2)
        except queue.Empty:
            continue
    return DONE


def run_pipeline(args, tars, done_keys, encode, on_batch):
    """Stream every not-yet-encoded sample of `tars` through stages 1-3 and call encode/on_batch on
    each uint8 batch; returns the Counter of what was seen and skipped."""
    counts = Counter()
    stop = threading.Event()
    shard_q = queue.Queue(maxsize=args.prefetch_shards)            # stage 1 -> 2: whole tar bytes
    chunk_q = queue.Queue(maxsize=max(2, args.workers * 4))       # stage 2 -> 3: pending decode jobs
    batch_q = queue.Queue(maxsize=args.prefetch_batches)           # stage 3 -> 4: ready batches
    pin = args.device.type == "cuda"
    lock = threading.Lock()

    def count(c):
        with lock:
            counts.update(c)

    def prefetch():
        for tar in tars:
            try:
                data = Path(tar).read_bytes()
            except OSError:
                count({"skipped: unreadable tar": 1})
                continue
            if not put(shard_q, (tar, data), stop):
                return
        put(shard_q, DONE, stop)

    def decode_job(chunk):
        return pool.apply_async(decode_chunk, (chunk, args.resolution, args.min_image_size, args.bucket_sizes))

    def extract():
        local = Counter()
        while (item := get(shard_q, stop)) is not DONE:
            _, data = item
            chunk = []
            for key, sample in sd_data.iter_tar_samples(data, local):
                local["samples in"] += 1
                if key in done_keys:
                    local["already encoded"] += 1
                    continue
                done_keys.add(key)  # a key repeated in a later shard is encoded once
                try:   # the same check as 04, so captions and latents hold the same keys
                    chunk.append((key, sd_data.usable_sample(sample, args.min_image_size)[0]))
                except sd_data.BadSample as e:
                    local[f"skipped: {e}"] += 1
                if len(chunk) == args.chunk_size:
                    if not put(chunk_q, decode_job(chunk), stop):
                        return
                    chunk = []
            if chunk and not put(chunk_q, decode_job(chunk), stop):
                return
            count(local)
            local.clear()
        put(chunk_q, DONE, stop)

    def batcher():
        pending = {}                                  # bucket -> (keys, images): a batch holds one image size

        def emit(bucket):
            keys, imgs = pending.pop(bucket)
            batch = torch.from_numpy(np.stack(imgs))  # (B, h, w, 3) uint8
            return put(batch_q, (keys, bucket, batch.pin_memory() if pin else batch), stop)

        while (job := get(chunk_q, stop)) is not DONE:
            ok, skipped = job.get()
            count(skipped)
            for key, bucket, img in ok:
                keys, imgs = pending.setdefault(bucket, ([], []))
                keys.append(key)
                imgs.append(img)
                if len(keys) == args.batch_size and not emit(bucket):
                    return
        for bucket in sorted(pending):
            if not emit(bucket):
                return
        put(batch_q, DONE, stop)

    ctx = mp.get_context("spawn")  # fork after torch/CUDA initialisation is unsafe
    with ctx.Pool(max(1, args.workers)) as pool:
        stages = [Stage(prefetch, "prefetch"), Stage(extract, "extract"), Stage(batcher, "batcher")]
        for s in stages:
            s.start()
        try:
            while True:
                try:
                    item = batch_q.get(timeout=0.5)
                except queue.Empty:
                    for s in stages:
                        if s.error is not None:
                            raise s.error
                    continue
                if item is DONE:
                    break
                keys, bucket, batch = item
                on_batch(keys, bucket, encode(batch))
        finally:
            stop.set()
            for s in stages:
                s.join(timeout=5)
        for s in stages:
            if s.error is not None:
                raise s.error
    return counts


def main(args):
    # under `torchrun --nproc_per_node=G` each process takes every G-th shard on its own GPU; they share
    # nothing but the output folder, so no process group is needed
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    sd_data.check_preview(args.preview)
    if args.resolution < 1 or args.batch_size < 1:
        raise UserError(f"--resolution and --batch_size must be positive (got {args.resolution}, {args.batch_size})")
    tars = sd_data.list_tars(args.tars)[rank::world]
    out = Path(args.out)
    check_writable(out, "--out")
    device = args.device = pick_device(args.device, index=int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # conv/matmul speed; bf16 weights dominate anyway
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest conv kernels once per shape

    vae = SD_Model.FrozenVAE(args.vae, device=device, dtype=pick_dtype(device, gpu="bf16"))
    if args.resolution % vae.factor:
        raise UserError(f"--resolution must be a multiple of {vae.factor} (the VAE downsamples "
                                 f"{vae.factor}x), not {args.resolution}")
    lat, channels = args.resolution // vae.factor, vae.vae.config.latent_channels
    info = {"vae": vae.name, "scaling_factor": vae.scaling_factor, "resolution": args.resolution,
            "latent_shape": [channels, lat, lat], "dtype": "float16"}
    args.bucket_sizes = None
    if args.buckets:
        # sides a multiple of 8 latent pixels, whatever the VAE's factor: 64 px for SD's 8x VAE, 32 for the demo's 4x
        args.bucket_sizes = sd_data.aspect_buckets(args.resolution, sd_data.BUCKET_LATENT_MULTIPLE * vae.factor)
        del info["latent_shape"]
        info.update(buckets=[list(b) for b in args.bucket_sizes],
                    latent_shapes=[[channels, h // vae.factor, w // vae.factor] for w, h in args.bucket_sizes])
    if (out / sd_latents.LATENT_INFO).exists():
        old = sd_latents.load_latent_info(out)
        clash = {k: (old.get(k), v) for k, v in info.items() if old.get(k) != v}
        if clash:
            raise UserError(f"'{out}' holds latents made with other settings {clash}; pick a new --out")

    def done():
        """Keys finished: the latent written (and with --buckets its bucket recorded), then what latent_info.json
        says of them (every rank rewrites it from the folder, so an interrupted run leaves it truthful)."""
        keys = sd_latents.existing_latent_keys(out)
        if not args.buckets:
            return keys, dict(info, count=len(keys))
        records = sd_latents.read_bucket_records(out)
        keys &= records.keys()
        counts = np.bincount([records[k] for k in keys], minlength=len(args.bucket_sizes)).tolist()
        return keys, dict(info, count=len(keys), bucket_counts=counts)

    done_keys, done_info = done()
    sd_latents.write_latent_info(out, done_info)

    encode_fn = torch.compile(vae.encode) if args.compile else vae.encode

    def encode(batch):
        """Queue the VAE on one uint8 batch and the copy of its latents into pinned host memory; returns a
        function that waits for them. on_batch calls it one batch later, so the GPU already holds the next batch's
        work while the host waits (no idle gap between batches)."""
        images = sd_data.images_to_tensor(batch.to(device, non_blocking=True))  # (B, 3, h, w) in [-1, 1]
        latents = encode_fn(images).to(torch.float16)                          # (B, 4, h/f, w/f)
        if device.type != "cuda":
            return lambda: latents.cpu().numpy()
        host = torch.empty(latents.shape, dtype=latents.dtype, pin_memory=True).copy_(latents, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return lambda: (done.synchronize(), host.numpy())[1]

    write_q = queue.Queue(maxsize=4)
    written = [0]

    def writer():
        while (item := write_q.get()) is not DONE:
            keys, bucket, latents = item
            for key, latent in zip(keys, latents):
                sd_latents.write_latent(out, key, latent)
                written[0] += 1
            if args.buckets:                          # after the latents: a recorded key has its file
                sd_latents.append_bucket_records(out, rank, keys, [bucket] * len(keys))

    writer_thread = Stage(writer, "writer")
    writer_thread.start()
    bar = tqdm(desc="encode", unit="img", smoothing=0.1)
    pending = []                                            # (keys, bucket, wait for latents) of the batch in flight
    first = []                                                      # (time, images) when the first batch came back

    def finish(keys, bucket, wait):
        write_q.put((keys, bucket, wait()))
        bar.update(len(keys))
        if not first:
            first.append((time.time(), len(keys)))

    def on_batch(keys, bucket, wait):
        if writer_thread.error is not None:
            raise writer_thread.error
        pending.append((keys, bucket, wait))
        if len(pending) > 1:
            finish(*pending.pop(0))

    start = time.time()
    try:
        counts = run_pipeline(args, tars, done_keys, encode, on_batch)
        for item in pending:
            finish(*item)
    finally:
        write_q.put(DONE)
        writer_thread.join()
        bar.close()
        done_keys, done_info = done()              # all processes' work, so far
        sd_latents.write_latent_info(out, done_info)
    if writer_thread.error is not None:
        raise writer_thread.error
    end = time.time()
    counts["encoded now"] = written[0]
    rate = written[0] / max(end - start, 1e-9)
    # the steady rate leaves out the start: worker spawn, VAE load, compile and cuDNN autotuning on the first batch
    steady = (written[0] - first[0][1]) / max(end - first[0][0], 1e-9) if first and written[0] > first[0][1] else rate
    rows = [("shards", len(tars))] + sd_data.count_rows(counts, ("truncated tar", "samples in", "already encoded",
                                                                 "encoded now"))
    rows += [("latents in folder", len(done_keys))]
    if args.buckets:
        rows += [(f"  bucket {w}x{h}", n) for (w, h), n in zip(args.bucket_sizes, done_info["bucket_counts"])]
    rows += [("img/s", f"{rate:.1f}"), ("img/s after the first batch", f"{steady:.1f}")]
    part = f", shards {rank}::{world}" if world > 1 else ""
    sd_data.print_summary(f"encode_latents ({device}{part}, {vae.name}) -> {out}", rows,
                          written[0] + counts["already encoded"] if tars else None, "no usable image in the tars")
    if args.preview and rank == 0:                   # from rank 0's shards, whose latents it has just written
        write_preview(args, tars, out, vae, done_keys)
    return {"img_s": rate, "steady_img_s": steady}


def write_preview(args, tars, out, vae, keys):
    """OUT/preview.png: each sample's source image (as the VAE saw it) beside the decode of its stored latent (with
    --buckets, both shown as their centre square, as every preview tile is)."""
    samples = sd_data.preview_samples(tars, args.preview, args.preview_seed, keys, args.min_image_size)
    latents = {key: sd_latents.read_latent(out, key) for key, _, _ in samples}
    decoded = {}
    for shape in sorted({x.shape for x in latents.values()}):      # one decode per shape (with --buckets, per bucket)
        same = [key for key, x in latents.items() if x.shape == shape]
        for i in range(0, len(same), args.batch_size):
            chunk = same[i:i + args.batch_size]
            images = vae.decode_images(torch.from_numpy(np.stack([latents[k] for k in chunk])).float())  # (b, h, w, 3)
            decoded.update(zip(chunk, images))
    tiles = []
    for key, image, _ in samples:
        src = sd_data.load_image_bucket(image, args.bucket_sizes, args.min_image_size)[1] if args.buckets else \
            sd_data.load_image_square(image, args.resolution, args.min_image_size)
        tiles.append(np.concatenate([sd_data.resize_center_crop(x, sd_data.PREVIEW_TILE) for x in (src, decoded[key])],
                                    1))
    sd_data.write_preview(out / sd_data.PREVIEW_NAME, tiles, [c for _, _, c in samples], [k for k, _, _ in samples])

if __name__ == "__main__":
    parser = arg_parser(__doc__)
    parser.add_argument("--tars", nargs="+", default=["data/laion_tars"],
                        help="input folder(s) of webdataset tar shards (phase 3: DiffusionDB's and JourneyDB's)")
    parser.add_argument("--out", default="data/laion_latents", help="output latent folder")
    parser.add_argument("--vae", default=SD_Model.DEFAULT_VAE,
                        help="AutoencoderKL: hub id, folder, or diffusers pipeline folder")
    parser.add_argument("--resolution", type=int, default=512,
                        help="square image side before encoding; with --buckets, the side of the base area")
    parser.add_argument("--buckets", action="store_true",
                        help="aspect-ratio buckets: each image at the size of sd_data.aspect_buckets(resolution) "
                             "nearest its aspect (sides multiples of 8 latent px, area <= resolution^2, 1:2 to 2:1), "
                             "not a centre square; train with SD_Train.py --buckets true")
    parser.add_argument("--batch_size", type=int, default=32, help="images per VAE call")
    parser.add_argument("--workers", type=int, default=max(1, os.cpu_count() - 1),
                        help="decode processes")
    parser.add_argument("--chunk_size", type=int, default=16, help="images per decode job")
    parser.add_argument("--prefetch_shards", type=int, default=2, help="tar files read ahead")
    parser.add_argument("--prefetch_batches", type=int, default=4, help="decoded batches queued for the VAE")
    parser.add_argument("--min_image_size", type=int, default=64, help="skip images whose shorter side is smaller")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, cuda:N, mps or cpu; "
                                                         "under torchrun each process takes GPU LOCAL_RANK")
    parser.add_argument("--compile", action="store_true", help="torch.compile the VAE encoder (~20-30%% faster on GPU per the seed)")
    sd_data.add_preview_args(parser)
    run_main(main, parser.parse_args())
