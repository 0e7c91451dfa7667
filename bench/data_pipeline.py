"""Benchmark the data pipeline: JPEG decode cv2 vs PIL, encode_latents vs its slowest stage, latent loading, 02's
rows/s and 03's images/s per core over loopback, with projections to LAION-2B-en, phase 1 and 100M images."""
import argparse
import importlib
import io
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from common import ROOT, append_results  # noqa: I001 (puts the repo on sys.path)
import sd_data
import sd_latents
from sd_common import arg_parser, pick_device, require_positive, run_main


def make_jpeg(i, w, h):
    """A photo-like JPEG (smooth gradients + fine noise, so the entropy coder has real work)."""
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([127 + 90 * np.sin(x / (17 + 5 * c + i % 7) + y / (23 + c)) for c in range(3)], -1)
    img += rng.normal(0, 12, img.shape)
    return sd_data.encode_jpeg(np.clip(img, 0, 255).astype(np.uint8), 90)


def rate(fn, n):
    """Items per second of fn() which handles n items (best of one warm call)."""
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def decode_cv2(jpegs):
    import cv2
    cv2.setNumThreads(1)
    for d in jpegs:
        cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR)


def decode_pil(jpegs):
    from PIL import Image
    for d in jpegs:
        Image.open(io.BytesIO(d)).convert("RGB").load()


def decode_resize_rate(jpegs, resolution, workers):
    """img/s of the decode + resize stage alone in `workers` processes, timed once they are up (as in a long run)."""
    with get_context("spawn").Pool(workers) as pool:
        pool.starmap(sd_data.load_image_square, [(d, resolution) for d in jpegs[:2 * workers]], chunksize=1)
        return rate(lambda: pool.starmap(sd_data.load_image_square, [(d, resolution) for d in jpegs], chunksize=8),
                    len(jpegs))


def save_vae(path, arch):
    """A random AutoencoderKL: SD's real VAE architecture ('sd'), or a tiny one for smoke runs."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    if arch == "sd":  # stabilityai/sd-vae-ft-mse's config; speed does not depend on the weights
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            sample_size=512, scaling_factor=0.18215)
    else:
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4,
                            norm_num_groups=32, sample_size=64)
    vae.save_pretrained(path)
    return str(path)


def bench_decode(args, jpegs, tmp, device):
    """1. JPEG decode, one core each."""
    decode_cv2(jpegs[:4]), decode_pil(jpegs[:4])  # warm up codecs
    cv2_rate, pil_rate = rate(lambda: decode_cv2(jpegs), len(jpegs)), rate(lambda: decode_pil(jpegs), len(jpegs))
    return [(f"JPEG decode cv2, 1 core ({args.source_width}x{args.source_height})", f"{cv2_rate:.0f} img/s"),
            ("JPEG decode PIL, 1 core", f"{pil_rate:.0f} img/s"), ("cv2 / PIL", f"{cv2_rate / pil_rate:.2f}x")]


def bench_encode(args, jpegs, tmp, device):
    """2. encode_latents end to end vs each stage alone."""
    import SD_Model
    tars = tmp / "tars"
    tars.mkdir()
    for s in range(0, len(jpegs), args.shard_size):
        w = sd_data.TarShardWriter(tars / f"{s:06d}.tar")
        for i, d in enumerate(jpegs[s:s + args.shard_size]):
            w.write(f"{s + i:09d}", d, "a caption")
        w.close()
    vae_path = args.vae if args.vae not in ("sd", "tiny") else save_vae(tmp / "vae", args.vae)
    encode_latents = importlib.import_module("encode_latents")
    enc_args = argparse.Namespace(tars=str(tars), out=str(tmp / "latents"), vae=vae_path, resolution=args.resolution,
                                  batch_size=args.batch_size, workers=args.workers, chunk_size=16,
                                  prefetch_shards=2, prefetch_batches=4, min_image_size=64, device=str(device),
                                  compile=args.compile, preview=0, preview_seed=0, buckets=False)
    pipeline = encode_latents.main(enc_args)       # its img/s, and the steady one (after the first batch)

    decode_stage = decode_resize_rate(jpegs, args.resolution, args.workers)
    vae = SD_Model.FrozenVAE(vae_path, device=device)   # bf16 on CUDA, as encode_latents
    encode = torch.compile(vae.encode) if args.compile else vae.encode   # as encode_latents runs it
    batch = torch.randint(0, 256, (args.batch_size, args.resolution, args.resolution, 3), dtype=torch.uint8)
    n_batches = max(1, len(jpegs) // args.batch_size)

    def vae_only(n):
        for _ in range(n):
            encode(sd_data.images_to_tensor(batch.to(device)))
        if device.type == "cuda":
            torch.cuda.synchronize()
    vae_only(2)                                  # warm up at the timed shape: compile, cuDNN autotuning
    vae_stage = rate(lambda: vae_only(n_batches), n_batches * args.batch_size)
    slowest = min(decode_stage, vae_stage)
    return [(f"decode+resize stage alone ({args.workers} procs, {args.resolution}px)", f"{decode_stage:.1f} img/s"),
            (f"VAE encode stage alone (batch {args.batch_size}, compile {args.compile})", f"{vae_stage:.1f} img/s"),
            ("encode_latents end to end (start included)", f"{pipeline['img_s']:.1f} img/s"),
            ("encode_latents after its first batch", f"{pipeline['steady_img_s']:.1f} img/s"),
            ("after the first batch / slowest stage", f"{pipeline['steady_img_s'] / slowest:.2f}")]


def bench_load(args, jpegs, tmp, device):
    """3. Loading latents into RAM, as SD_Train does (a thread pool of np.load)."""
    lat_dir = tmp / "ram"
    lat = args.resolution // 8
    keys = [f"{i:09d}" for i in range(args.latents)]
    for k in keys:
        sd_latents.write_latent(lat_dir, k, np.zeros((4, lat, lat), np.float16))
    with ThreadPoolExecutor(args.load_threads) as ex:
        load_rate = rate(lambda: list(ex.map(lambda k: sd_latents.read_latent(lat_dir, k), keys)), len(keys))
    return [(f"latent load to RAM ({args.load_threads} threads, 4x{lat}x{lat} fp16)", f"{load_rate:.0f} latents/s")]


def laion_metadata(folder, rows, files=4):
    """LAION-2B-en-like parquet shards: ~100-character URLs and ~60-character captions, scores spread so that the
    phase-1 preset keeps a few percent, 1% duplicate URLs."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    per = rows // files
    for f in range(files):
        ids = np.arange(f * per, (f + 1) * per)
        ids[::100] = ids[1::100][:len(ids[::100])]                       # a duplicate URL every 100 rows
        pq.write_table(pa.table({
            "url": [f"https://images.example-cdn.com/photos/{i % 9973}/{i:012d}-a-long-image-slug-for-the-url.jpg"
                    for i in ids],
            "caption": [f"a photo of a red house number {i} by the sea at dawn, high detail" for i in ids],
            "width": rng.integers(200, 2000, per), "height": rng.integers(200, 2000, per),
            "similarity": rng.uniform(0.15, 0.4, per), "punsafe": rng.uniform(0, 1, per) ** 4,
            "pwatermark": rng.uniform(0, 1, per) ** 2, "aesthetic": rng.normal(5.5, 0.8, per),
            "hash": [str(i) for i in ids]}), folder / f"part-{f:05d}.parquet", row_group_size=100_000)


def bench_filter(args, jpegs, tmp, device):
    """4. 02_filter_metadata.py's streaming pyarrow filter, one process, on LAION-like metadata: rows/s, and what
    that makes of LAION-2B-en's 2.3B rows (01's normalised shards in, as 02 reads them)."""
    filter_metadata = importlib.import_module("02_filter_metadata")
    laion_metadata(tmp / "meta", args.filter_rows)
    out = []
    for preset in ("phase1", "nemo_pretrain_256"):     # most rows dropped by a score / every row through dedup
        ns = argparse.Namespace(meta=str(tmp / "meta"), out=str(tmp / f"f_{preset}"), preset=preset,
                                **{k: None for k in filter_metadata.THRESHOLDS}, min_caption_chars=5,
                                max_caption_chars=1000, batch_rows=262144)
        r = rate(lambda: filter_metadata.main(ns), args.filter_rows)
        out += [(f"02 filter --preset {preset}, 1 process", f"{r:,.0f} rows/s"),
                ("  -> LAION-2B-en, 2.3B rows, 1 process", f"{2.3e9 / r / 3600:.1f} h")]
    return out


def bench_download(args, jpegs, tmp, device):
    """5. 03_download_images.py (real img2dataset) over a loopback server, one process: images/s per core, which
    is the CPU side of a download (decode, resize, encode, write); a real run also waits on the network, which
    more threads per process hide. Projected to one 16-core node for phase 1 (1.3M kept images) and 100M."""
    import json
    import subprocess
    import sys
    w, h = (int(v) for v in args.download_size.split("x"))
    www = tmp / "www"
    www.mkdir()
    for i in range(args.download_images):
        (www / f"{i}.jpg").write_bytes(jpegs[i % len(jpegs)] if (w, h) == (args.source_width, args.source_height)
                                       else make_jpeg(i, w, h))
    import pyarrow as pa
    import pyarrow.parquet as pq
    with sd_data.LoopbackServer(www) as server:
        (tmp / "dl_meta").mkdir()
        pq.write_table(pa.table({"url": [f"{server.url}/{i}.jpg" for i in range(args.download_images)],
                                 "caption": ["a photo of a red house"] * args.download_images}),
                       tmp / "dl_meta" / "a.parquet")
        proc = subprocess.run([sys.executable, str(ROOT / "03_download_images.py"), "--meta", str(tmp / "dl_meta"),
                               "--out", str(tmp / "dl"), "--processes", "1", "--threads", "16",
                               "--resolution", str(args.download_resolution), "--shard_size", str(args.download_images)],
                              capture_output=True, text=True,
                              env=dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1"))
        if proc.returncode:
            raise RuntimeError(f"03_download_images.py failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    stats = [json.loads(p.read_text()) for p in (tmp / "dl").glob("*_stats.json")]
    kept = sum(s["successes"] for s in stats)
    seconds = sum(s["end_time"] - s["start_time"] for s in stats)   # the shard's own time: no process start-up
    per_core = kept / seconds
    node = 16 * per_core
    return [(f"03 download+resize, 1 process x 16 threads ({w}x{h} JPEG -> {args.download_resolution} px)",
             f"{per_core:.1f} img/s per core ({kept} of {args.download_images} kept)"),
            ("  -> phase 1, 1.3M images, one 16-core node (CPU bound)", f"{1.3e6 / node / 3600:.1f} h"),
            ("  -> 100M images, one 16-core node (CPU bound)", f"{1e8 / node / 3600:.0f} h")]


STAGES = {"decode": bench_decode, "encode": bench_encode, "load": bench_load, "filter": bench_filter,
          "download": bench_download}


def main(args):
    require_positive(args, "images", "source_width", "source_height", "resolution", "batch_size", "workers",
                     "shard_size", "latents", "load_threads")
    device = pick_device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # 64 distinct photos, repeated: decoding costs the same, and thousands of images need not be drawn in numpy
        distinct = [make_jpeg(i, args.source_width, args.source_height) for i in range(min(args.images, 64))]
        jpegs = [distinct[i % len(distinct)] for i in range(args.images)]
        for stage in args.stages:
            rows += STAGES[stage](args, jpegs, tmp, device)
    settings = dict(images=args.images, source=f"{args.source_width}x{args.source_height}", vae=args.vae,
                    resolution=args.resolution, cpu_cores=os.cpu_count(),
                    load_average=f"{os.getloadavg()[0]:.1f}")   # a busy shared machine slows every figure
    append_results(device, "Data pipeline (bench/data_pipeline.py)", settings, ["what", "value"], rows)


if __name__ == "__main__":
    parser = arg_parser(__doc__)
    parser.add_argument("--images", type=int, default=64, help="JPEGs generated and pushed through the pipeline")
    parser.add_argument("--source_width", type=int, default=640, help="width of the generated JPEGs")
    parser.add_argument("--source_height", type=int, default=512, help="height of the generated JPEGs")
    parser.add_argument("--resolution", type=int, default=256, help="encode resolution (512 in training)")
    parser.add_argument("--vae", default="sd", help="'sd' (SD VAE architecture, random weights), 'tiny', or a VAE path/id")
    parser.add_argument("--batch_size", type=int, default=8, help="VAE batch size")
    parser.add_argument("--workers", type=int, default=max(1, os.cpu_count() - 1), help="decode processes")
    parser.add_argument("--shard_size", type=int, default=32, help="images per generated tar")
    parser.add_argument("--latents", type=int, default=4000, help="latent files loaded in the RAM test")
    parser.add_argument("--load_threads", type=int, default=16, help="loader threads (the seed used 16)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, cuda:N, mps or cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile the VAE in the pipeline run")
    parser.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES), help="what to measure")
    parser.add_argument("--filter_rows", type=int, default=1_000_000, help="LAION-like rows filtered by 02")
    parser.add_argument("--download_images", type=int, default=300, help="images 03 downloads over loopback")
    parser.add_argument("--download_size", default="1024x768", help="size of the served JPEGs (phase 1: >= 512 px)")
    parser.add_argument("--download_resolution", type=int, default=512, help="03's --resolution (phase 1: 512)")
    run_main(main, parser.parse_args())
