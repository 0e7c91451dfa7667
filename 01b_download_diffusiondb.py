"""Convert DiffusionDB part zips (images + per-part prompt json) into 512px JPEG webdataset tars."""
import json
import os
import zipfile
from collections import Counter
from pathlib import Path

import sd_data
from sd_common import arg_parser, run_main

SHARD_NAME = "ddb-part-{:06d}.tar"                  # one tar per DiffusionDB part

# DiffusionDB 2M layout (poloclub/diffusiondb): images/part-000001.zip holds ~1000 images and
# part-000001.json = {image file name: {"p": prompt, "se": seed, "c": cfg, "st": steps, "sa": sampler}}.
PART = "images/part-{:06d}.zip"


def convert_part(part, args):
    """Fetch (if remote) and convert one part into OUT/ddb-part-NNNNNN.tar; returns its counts."""
    counts = Counter()
    zip_path = sd_data.fetch(args.source, PART.format(part), args.raw_dir, timeout=args.timeout)
    if zip_path is None:
        return Counter({"parts missing at source": 1})
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = zf.namelist()
            meta_name = next((n for n in names if n.endswith(".json")), None)
            prompts = json.loads(zf.read(meta_name)) if meta_name else {}

            def samples():
                for name in names:
                    if name.endswith(".json") or name.endswith("/"):
                        continue
                    counts["images in"] += 1
                    info = prompts.get(Path(name).name, {})
                    meta = {"source": "diffusiondb", "part": part, "seed": info.get("se"), "cfg": info.get("c"),
                            "steps": info.get("st"), "sampler": info.get("sa")}
                    yield Path(name).stem, zf.read(name), info.get("p"), meta

            dst = Path(args.out) / SHARD_NAME.format(part)
            counts["kept"] += sd_data.write_square_shard(samples(), dst, args.resolution, args.jpeg_quality,
                                                         args.min_image_size, counts)
    except (zipfile.BadZipFile, json.JSONDecodeError, EOFError) as e:
        counts["skipped: unreadable part"] += 1
        print(f"part {part}: {type(e).__name__}: {e}")
        return counts
    counts["parts converted"] += 1
    return counts


def main(args):
    out = Path(args.out)
    parts, todo, total = sd_data.pending_parts(args.source, args.parts, "--parts", out, SHARD_NAME.format, "parts")
    sd_data.run_jobs(convert_part, [(p, args) for p in todo], args.workers, "diffusiondb", "part", total)
    rows = sd_data.count_rows(total, ("parts", "parts already done", "parts converted", "parts missing at source",
                                      "images in", "kept"))
    sd_data.print_summary(f"01b DiffusionDB -> {out}", rows, total["kept"] + total["parts already done"],
                          f"no image of parts {args.parts} from '{args.source}' was kept")


if __name__ == "__main__":
    parser = arg_parser(__doc__)
    parser.add_argument("--source", default="https://huggingface.co/datasets/poloclub/diffusiondb/resolve/main",
                        help="base URL or local folder holding images/part-NNNNNN.zip")
    parser.add_argument("--parts", default="1-500", help="part numbers to convert, e.g. '1-500' or '1,7,9-12'")
    parser.add_argument("--raw_dir", default="data/diffusiondb_raw", help="where zips from a URL source are kept")
    parser.add_argument("--out", default="data/diffusiondb_tars", help="output folder of webdataset tars")
    parser.add_argument("--resolution", type=int, default=512, help="square side of the stored JPEGs")
    parser.add_argument("--jpeg_quality", type=int, default=95, help="JPEG quality of the stored images")
    parser.add_argument("--min_image_size", type=int, default=256, help="skip images whose shorter side is smaller")
    parser.add_argument("--timeout", type=int, default=60, help="seconds before a stalled download is retried")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="parts converted in parallel")
    run_main(main, parser.parse_args())
