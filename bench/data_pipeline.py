"""Benchmark the data pipeline: JPEG decode cv2 vs PIL, encode_latents vs its slowest stage, latent loading."""
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

from common import append_results, require_positive  # noqa: I001 (puts the repo on sys.path)
import sd_data
import sd_latents
from sd_common import pick_device, run_main


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


def main(args):
    import SD_Model
    require_positive(args, "images", "source_width", "source_height", "resolution", "batch_size", "workers",
                     "shard_size", "latents", "load_threads")
    device = pick_device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # 64 distinct photos, repeated: decoding costs the same, and thousands of images need not be drawn in numpy
        distinct = [make_jpeg(i, args.source_width, args.source_height) for i in range(min(args.images, 64))]
        jpegs = [distinct[i % len(distinct)] for i in range(args.images)]

        # 1. JPEG decode, one core each
        decode_cv2(jpegs[:4]), decode_pil(jpegs[:4])  # warm up codecs
        cv2_rate, pil_rate = rate(lambda: decode_cv2(jpegs), len(jpegs)), rate(lambda: decode_pil(jpegs), len(jpegs))
        rows += [(f"JPEG decode cv2, 1 core ({args.source_width}x{args.source_height})", f"{cv2_rate:.0f} img/s"),
                 ("JPEG decode PIL, 1 core", f"{pil_rate:.0f} img/s"), ("cv2 / PIL", f"{cv2_rate / pil_rate:.2f}x")]

        # 2. encode_latents end to end vs each stage alone
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
                                      compile=args.compile)
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
        rows += [(f"decode+resize stage alone ({args.workers} procs, {args.resolution}px)", f"{decode_stage:.1f} img/s"),
                 (f"VAE encode stage alone (batch {args.batch_size}, compile {args.compile})", f"{vae_stage:.1f} img/s"),
                 ("encode_latents end to end (start included)", f"{pipeline['img_s']:.1f} img/s"),
                 ("encode_latents after its first batch", f"{pipeline['steady_img_s']:.1f} img/s"),
                 ("after the first batch / slowest stage", f"{pipeline['steady_img_s'] / slowest:.2f}")]

        # 3. loading latents into RAM, as SD_Train does (a thread pool of np.load)
        lat_dir = tmp / "ram"
        lat = args.resolution // 8
        keys = [f"{i:09d}" for i in range(args.latents)]
        for k in keys:
            sd_latents.write_latent(lat_dir, k, np.zeros((4, lat, lat), np.float16))
        with ThreadPoolExecutor(args.load_threads) as ex:
            load_rate = rate(lambda: list(ex.map(lambda k: sd_latents.read_latent(lat_dir, k), keys)), len(keys))
        rows.append((f"latent load to RAM ({args.load_threads} threads, 4x{lat}x{lat} fp16)", f"{load_rate:.0f} latents/s"))

    settings = dict(images=args.images, source=f"{args.source_width}x{args.source_height}", vae=args.vae,
                    resolution=args.resolution, cpu_cores=os.cpu_count())
    append_results(device, "Data pipeline (bench/data_pipeline.py)", settings, ["what", "value"], rows)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    run_main(main, parser.parse_args())
