"""Download the filtered LAION images with img2dataset into resized, centre-cropped webdataset tar shards (and
OUT/preview.png: a grid of random samples with their captions)."""
import argparse
import json
import os
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

import sd_data
from sd_common import UserError, check_writable, run_main

# albumentations (imported by img2dataset) asks PyPI for a newer version on import; a downloader on a
# cluster node should not phone home, and the tests must not touch the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# img2dataset reserves these names for its own output columns
RESERVED = {"key", "caption", "url", "width", "height", "original_width", "original_height", "status",
            "error_message", "exif", "md5", "sha256", "sha512"}


def read_stats(out):
    """{shard id: img2dataset's per-shard stats} from the NNNNN_stats.json files it writes when a shard
    is finished (its incremental mode uses the same files to skip finished shards)."""
    stats = {}
    for p in sorted(Path(out).glob("*_stats.json")):
        try:
            stats[int(p.name.split("_")[0])] = json.loads(p.read_text())
        except (ValueError, json.JSONDecodeError):
            continue
    return stats


def main(args):
    sd_data.check_preview(args.preview)
    files = sd_data.list_files(args.meta, [".parquet"], "filtered metadata")
    columns = pq.read_schema(files[0]).names
    for needed in ("url", "caption"):
        if needed not in columns:
            raise UserError(f"'{files[0]}' has no '{needed}' column; run 01/02 on it first")
    extra = [c for c in columns if c not in RESERVED]  # keep the LAION scores next to each image
    out = check_writable(args.out, "--out")
    before = read_stats(out)

    from img2dataset import download
    download(
        url_list=str(args.meta), input_format="parquet", url_col="url", caption_col="caption",
        save_additional_columns=extra, output_folder=str(out), output_format="webdataset",
        image_size=args.image_size, resize_mode=args.resize_mode, resize_only_if_bigger=False,
        encode_format="jpg", encode_quality=args.jpeg_quality,
        processes_count=args.processes, thread_count=args.threads,
        number_sample_per_shard=args.shard_size, timeout=args.timeout, retries=args.retries,
        min_image_size=args.min_image_size, max_image_area=args.max_image_area,
        max_aspect_ratio=args.max_aspect_ratio, incremental_mode=args.incremental_mode,
        disallowed_header_directives=args.disallowed_header_directives,
        user_agent_token=args.user_agent_token, enable_wandb=False, distributor="multiprocessing",
    )

    stats = read_stats(out)
    new = {k: v for k, v in stats.items() if k not in before}
    total, reasons = Counter(), Counter()
    for s in stats.values():
        total.update({k: s[k] for k in ("count", "successes", "failed_to_download", "failed_to_resize")})
        reasons.update({k: v for k, v in s.get("status_dict", {}).items() if k != "success"})
    rows = [("shards", len(stats)), ("shards already done", len(stats) - len(new)),
            ("shards downloaded now", len(new)), ("urls in", total["count"]),
            ("kept (downloaded + resized)", total["successes"]),
            ("skipped: download failed", total["failed_to_download"]),
            ("skipped: decode/resize failed", total["failed_to_resize"])]
    rows += [(f"  {reason[:60]}", n) for reason, n in reasons.most_common(args.top_errors)]
    sd_data.print_summary(f"03 img2dataset -> {out}", rows)
    tars = sorted(out.glob("*.tar"))
    if args.preview and tars:
        sd_data.write_tar_preview(out, tars, args.preview, args.preview_seed)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--meta", default="data/laion_filtered", help="input folder of filtered parquet (from 02)")
    parser.add_argument("--out", default="data/laion_tars", help="output folder of webdataset tar shards")
    parser.add_argument("--image_size", type=int, default=512, help="output side in pixels")
    parser.add_argument("--resize_mode", default="center_crop", choices=["center_crop", "keep_ratio", "border", "no"],
                        help="img2dataset resize mode; center_crop matches encode_latents' square crop")
    parser.add_argument("--jpeg_quality", type=int, default=95, help="JPEG quality of the stored images")
    parser.add_argument("--processes", type=int, default=os.cpu_count(), help="download processes")
    parser.add_argument("--threads", type=int, default=64, help="download threads per process")
    parser.add_argument("--shard_size", type=int, default=10000, help="samples per tar shard")
    parser.add_argument("--timeout", type=int, default=10, help="seconds before a download is abandoned")
    parser.add_argument("--retries", type=int, default=0, help="retries per failed download")
    parser.add_argument("--min_image_size", type=int, default=256,
                        help="skip images whose shorter side is below this (1x1 trackers, thumbnails)")
    parser.add_argument("--max_image_area", type=float, default=sd_data.MAX_PIXELS,
                        help="skip images with more pixels than this (decompression bombs)")
    parser.add_argument("--max_aspect_ratio", type=float, default=3.0, help="skip images more elongated than this")
    parser.add_argument("--incremental_mode", default="incremental", choices=["incremental", "overwrite", "extend"],
                        help="incremental resumes (skips finished shards); overwrite empties --out first")
    parser.add_argument("--disallowed_header_directives", nargs="*",
                        default=["noai", "noimageai", "noindex", "noimageindex"],
                        help="X-Robots-Tag directives that make img2dataset drop an image")
    parser.add_argument("--user_agent_token", default=None, help="token added to the user agent (X-Robots-Tag scoping)")
    parser.add_argument("--top_errors", type=int, default=8, help="most common failure reasons listed in the summary")
    sd_data.add_preview_args(parser)
    run_main(main, parser.parse_args())
