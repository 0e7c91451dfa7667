"""Download the filtered LAION images with img2dataset into resized, centre-cropped webdataset tar shards (with
--buckets: resized with their aspect kept, for encode_latents.py --buckets; and OUT/preview.png: a grid of random
samples with their captions).

img2dataset's parts (its Reader, Resizer, Downloader, tar writer and distributors) do the work, on one machine
(`--distributor multiprocessing`) or many (`pyspark`, `ray`); this script assembles them instead of calling
img2dataset.download() for two things that function cannot be told:
  - which shards count as done: a shard whose URLs mostly failed for transient reasons (timeouts, refused or
    reset connections, HTTP 5xx / 429: a slow or down server) is fetched again on the next run, where download()
    skips every shard that has a stats file, however it ended;
  - what the resizer is handed: 16-bit and grey sources go through sd_data's decoder first (sd_data.RGB8Resizer),
    so they are stored as 8-bit RGB that looks like the source, where img2dataset alone stores a white image.
"""
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

import sd_data
from sd_common import UserError, arg_parser, check_writable, run_main

# albumentations (imported by img2dataset) asks PyPI for a newer version on import; a downloader on a
# cluster node should not phone home, and the tests must not touch the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

ROOT = Path(__file__).resolve().parent
# img2dataset reserves these names for its own output columns
RESERVED = {"key", "caption", "url", "width", "height", "original_width", "original_height", "status",
            "error_message", "exif", "md5", "sha256", "sha512"}
# Failure reasons (img2dataset's str(exception) per URL) that a later try may not meet: the server was slow,
# overloaded or briefly away. 404s, refusals by X-Robots-Tag, DNS names that do not exist and images that do not
# decode are permanent and never worth a second download.
TRANSIENT = re.compile(r"timed out|timeout|connection (refused|reset|aborted)|remote end closed|temporary failure|"
                       r"http error (429|5\d\d)|incompleteread|eof occurred", re.IGNORECASE)
DISTRIBUTORS = ["multiprocessing", "pyspark", "ray"]


def read_stats(out):
    """{shard id: img2dataset's per-shard stats} from the NNNNN_stats.json files it writes when a shard
    is finished."""
    stats = {}
    for p in sorted(Path(out).glob("*_stats.json")):
        try:
            stats[int(p.name.split("_")[0])] = json.loads(p.read_text())
        except (ValueError, json.JSONDecodeError):
            continue
    return stats


def transient_share(stats):
    """Share of a finished shard's URLs lost to transient failures."""
    lost = sum(n for reason, n in stats.get("status_dict", {}).items() if TRANSIENT.search(reason))
    return lost / max(stats.get("count", 0), 1)


def start_distributor(args):
    """The img2dataset distributor function for --distributor, with its engine started: a Spark session (the
    one spark-submit configured, else --spark_master, else local[--processes]) or a Ray connection. Workers on
    other machines unpickle sd_data.RGB8Resizer, so sd_data and sd_common are shipped to them."""
    from img2dataset import distributor
    modules = [ROOT / "sd_data.py", ROOT / "sd_common.py"]
    if args.distributor == "pyspark":
        try:
            from pyspark import SparkConf
            from pyspark.sql import SparkSession
        except ImportError:
            raise UserError("--distributor pyspark needs pyspark (pip install pyspark; Java 17+)") from None
        master = args.spark_master or SparkConf().get("spark.master", f"local[{args.processes}]")
        builder = SparkSession.builder.master(master).appName("03_download_images")
        if master.startswith("local"):                # this machine: loopback only, no web UI, and workers run
            # this Python (the one with img2dataset; pyspark reads the worker's Python from this variable alone)
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
            os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
            builder = builder.config("spark.ui.enabled", "false").config("spark.driver.host", "127.0.0.1") \
                .config("spark.driver.bindAddress", "127.0.0.1")
        spark = builder.getOrCreate()
        for m in modules:
            spark.sparkContext.addPyFile(str(m))
        return distributor.pyspark_distributor, spark.stop
    if args.distributor == "ray":
        try:
            import ray
        except ImportError:                         # img2dataset's ray distributor silently does nothing then
            raise UserError("--distributor ray needs ray (pip install ray)") from None
        import sd_common
        ray.init(address=args.ray_address, runtime_env={"py_modules": [sd_data, sd_common]})
        return distributor.ray_distributor, ray.shutdown
    return distributor.multiprocessing_distributor, lambda: None


def download(args, out, extra, done_shards, resize_mode):
    """img2dataset.download()'s assembly of its parts, with our done-shard set and resizer."""
    from img2dataset.downloader import Downloader
    from img2dataset.reader import Reader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter
    tmp = out / "_tmp"                                # the reader's per-shard input files (shared on a cluster)
    tmp.mkdir(exist_ok=True)
    reader = Reader(str(Path(args.meta).resolve()), "parquet", "url", "caption", None, None, extra, args.shard_size,
                    done_shards, str(tmp))
    resizer = sd_data.RGB8Resizer(Resizer(
        image_size=args.resolution, resize_mode=resize_mode, resize_only_if_bigger=False,
        encode_quality=args.jpeg_quality, encode_format="jpg", min_image_size=args.min_image_size,
        max_image_area=args.max_image_area, max_aspect_ratio=args.max_aspect_ratio))
    downloader = Downloader(
        sample_writer_class=WebDatasetSampleWriter, resizer=resizer, thread_count=args.threads, save_caption=True,
        extract_exif=True, output_folder=str(out.resolve()), column_list=reader.column_list, timeout=args.timeout,
        number_sample_per_shard=args.shard_size, oom_shard_count=5, compute_hash="sha256", verify_hash_type=None,
        encode_format="jpg", retries=args.retries, user_agent_token=args.user_agent_token,
        disallowed_header_directives=set(args.disallowed_header_directives) or None)
    run, stop = start_distributor(args)
    try:
        run(args.processes, downloader, reader, args.subjob_size, args.max_shard_retry)
    finally:
        stop()
    for p in tmp.iterdir():                           # inputs of shards that failed outright (the rest removed
        p.unlink()                                    # themselves); the next run writes them anew
    tmp.rmdir()


def main(args):
    sd_data.check_preview(args.preview)
    files = sd_data.list_files(args.meta, [".parquet"], "filtered metadata")
    columns = pq.read_schema(files[0]).names
    for needed in ("url", "caption"):
        if needed not in columns:
            raise UserError(f"'{files[0]}' has no '{needed}' column; run 01/02 on it first")
    for flag in ("processes", "threads", "shard_size", "subjob_size", "resolution", "timeout"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1 (got {getattr(args, flag)})")
    if args.retries < 0 or args.max_shard_retry < 0:
        raise UserError("--retries and --max_shard_retry must be 0 or more")
    if not 0 < args.refetch_transient <= 1:
        raise UserError(f"--refetch_transient {args.refetch_transient} is outside (0, 1]")
    extra = [c for c in columns if c not in RESERVED]  # keep the LAION scores next to each image
    # With buckets the aspect is kept: img2dataset's keep_ratio scales the shorter side to --resolution (the
    # buckets' base resolution), so every bucket of that base (shorter side <= base) is covered without upscaling.
    resize_mode = args.resize_mode or ("keep_ratio" if args.buckets else "center_crop")
    if args.buckets and resize_mode != "keep_ratio":
        raise UserError(f"--buckets keeps each image's aspect (resize_mode keep_ratio); --resize_mode {resize_mode} "
                        "would not: drop one of the two")
    out = check_writable(args.out, "--out")
    before = read_stats(out)
    again = {k for k, s in before.items() if transient_share(s) >= args.refetch_transient}
    if again:
        print(f"fetching {len(again)} shards again: {args.refetch_transient:.0%} or more of their URLs failed for "
              f"transient reasons last time ({sorted(again)[:8]}{' ...' if len(again) > 8 else ''})")
    download(args, out, extra, set(before) - again, resize_mode)

    stats = read_stats(out)
    fresh = {k for k, s in stats.items() if s != before.get(k)}    # written by this run
    total, reasons = Counter(), Counter()
    for s in stats.values():
        total.update({k: s[k] for k in ("count", "successes", "failed_to_download", "failed_to_resize")})
        reasons.update({k: v for k, v in s.get("status_dict", {}).items() if k != "success"})
    still = sum(transient_share(s) >= args.refetch_transient for s in stats.values())
    rows = [("shards", len(stats)), ("shards already done", len(stats) - len(fresh)),
            ("shards downloaded now", len(fresh) - len(again & fresh)), ("shards fetched again", len(again & fresh)),
            ("urls in", total["count"]), ("kept (downloaded + resized)", total["successes"]),
            ("skipped: download failed", total["failed_to_download"]),
            ("skipped: decode/resize failed", total["failed_to_resize"])]
    rows += [(f"  {reason[:60]}", n) for reason, n in reasons.most_common(args.top_errors)]
    rows.append(("shards to fetch again (re-run)", still))
    sd_data.print_summary(f"03 img2dataset -> {out}", rows, total["successes"],
                          f"none of the {total['count']:,} URLs gave an image; most common failures: "
                          f"{[r[:60] for r, _ in reasons.most_common(3)]}")
    if still:
        print(f"note: {still} shards lost {args.refetch_transient:.0%} or more of their URLs to timeouts or "
              "connection errors; run the same command again to fetch them again")
    tars = sorted(out.glob("*.tar"))
    if args.preview and tars:
        sd_data.write_tar_preview(out, tars, args.preview, args.preview_seed)


if __name__ == "__main__":
    parser = arg_parser(__doc__)
    parser.add_argument("--meta", default="data/laion_filtered", help="input folder of filtered parquet (from 02)")
    parser.add_argument("--out", default="data/laion_tars", help="output folder of webdataset tar shards (on a "
                        "cluster: a path every worker sees, e.g. a shared file system)")
    parser.add_argument("--resolution", type=int, default=512,
                        help="output side in pixels (with --buckets: the shorter side; use the base resolution)")
    parser.add_argument("--buckets", action="store_true",
                        help="keep each image's aspect (resize_mode keep_ratio) for aspect-ratio buckets: "
                             "encode_latents.py --buckets fits it to its bucket")
    parser.add_argument("--resize_mode", default=None, choices=["center_crop", "keep_ratio", "border", "no"],
                        help="img2dataset resize mode (default: center_crop, which matches encode_latents' square "
                             "crop; keep_ratio with --buckets)")
    parser.add_argument("--jpeg_quality", type=int, default=95, help="JPEG quality of the stored images")
    parser.add_argument("--distributor", default="multiprocessing", choices=DISTRIBUTORS,
                        help="img2dataset's engine: processes on this machine, a Spark cluster (under spark-submit, "
                             "or --spark_master) or a Ray cluster (--ray_address)")
    parser.add_argument("--spark_master", default=None,
                        help="Spark master URL (spark://HOST:7077, local[N]); default: spark-submit's, else "
                             "local[--processes]")
    parser.add_argument("--ray_address", default=None, help="Ray cluster address ('auto' on a cluster node); default: "
                        "a local Ray")
    parser.add_argument("--processes", type=int, default=os.cpu_count(),
                        help="download processes (multiprocessing; local Spark's cores)")
    parser.add_argument("--threads", type=int, default=64, help="download threads per process")
    parser.add_argument("--shard_size", type=int, default=10000, help="samples per tar shard")
    parser.add_argument("--subjob_size", type=int, default=1000, help="shards per Spark job")
    parser.add_argument("--max_shard_retry", type=int, default=1, help="retries of a shard whose process failed")
    parser.add_argument("--timeout", type=int, default=10, help="seconds before a download is abandoned")
    parser.add_argument("--retries", type=int, default=0, help="retries per failed download")
    parser.add_argument("--refetch_transient", type=float, default=0.1,
                        help="a finished shard that lost at least this share of its URLs to timeouts, refused or "
                             "reset connections or HTTP 5xx/429 is fetched again by the next run")
    parser.add_argument("--min_image_size", type=int, default=256,
                        help="skip images whose shorter side is below this (1x1 trackers, thumbnails)")
    parser.add_argument("--max_image_area", type=float, default=sd_data.MAX_PIXELS,
                        help="skip images with more pixels than this (decompression bombs)")
    parser.add_argument("--max_aspect_ratio", type=float, default=3.0, help="skip images more elongated than this")
    parser.add_argument("--disallowed_header_directives", nargs="*",
                        default=["noai", "noimageai", "noindex", "noimageindex"],
                        help="X-Robots-Tag directives that make img2dataset drop an image")
    parser.add_argument("--user_agent_token", default=None, help="token added to the user agent (X-Robots-Tag scoping)")
    parser.add_argument("--top_errors", type=int, default=8, help="most common failure reasons listed in the summary")
    sd_data.add_preview_args(parser)
    run_main(main, parser.parse_args())
