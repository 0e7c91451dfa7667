"""Convert JourneyDB image archives (tgz) + annotation jsonl into 512px JPEG webdataset tars."""
import json
import os
import tarfile
from collections import Counter
from pathlib import Path, PurePosixPath

import sd_data
from sd_common import UserError, arg_parser, run_main

SHARD_NAME = "jdb-{:03d}.tar"                        # one tar per JourneyDB archive

# JourneyDB layout (JourneyDB/JourneyDB): data/train/imgs/000.tgz ... each unpacking to 000/<hash>.jpg, and
# data/train/train_anno_realease_repath.jsonl.tgz (sic) with one json per line:
# {"img_path": "./imgs/000/<hash>.jpg", "prompt": "...", "Task2": {"Caption": "..."}, ...}
ARCHIVE = "data/train/imgs/{:03d}.tgz"


def caption_of(record, field):
    """record['prompt'], or a dotted path such as 'Task2.Caption'."""
    value = record
    for part in field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def load_annotations(path, field, archives):
    """{archive number: {image stem: caption}} for the requested archives only (the full train set has
    4M lines; keeping only what this run converts bounds memory). Reads .jsonl or a .tgz holding one."""
    wanted = {f"{a:03d}" for a in archives}
    out = {a: {} for a in archives}

    def lines():
        if str(path).endswith((".tgz", ".tar.gz")):
            with tarfile.open(path) as tf:
                for m in tf:
                    if m.isreg() and m.name.endswith(".jsonl"):
                        yield from tf.extractfile(m)
        else:
            with open(path, "rb") as f:
                yield from f

    for line in lines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        p = PurePosixPath(str(rec.get("img_path", "")))
        if len(p.parts) >= 2 and p.parent.name in wanted:
            out[int(p.parent.name)][p.stem] = caption_of(rec, field)
    return out


def convert_archive(num, captions, args):
    """Fetch (if remote) and convert one archive into OUT/jdb-NNN.tar; returns its counts."""
    counts = Counter()
    path = sd_data.fetch(args.source, ARCHIVE.format(num), args.raw_dir, timeout=args.timeout)
    if path is None:
        return Counter({"archives missing at source": 1})
    try:
        with tarfile.open(path, mode="r|*") as tf:  # stream: a 20 GB archive is never listed in memory

            def samples():
                for m in tf:
                    if not m.isreg():
                        continue
                    counts["images in"] += 1
                    stem = PurePosixPath(m.name).stem
                    meta = {"source": "journeydb", "archive": num}
                    yield stem, tf.extractfile(m).read(), captions.get(stem), meta

            dst = Path(args.out) / SHARD_NAME.format(num)
            counts["kept"] += sd_data.write_square_shard(samples(), dst, args.resolution, args.jpeg_quality,
                                                         args.min_image_size, counts)
    except (tarfile.TarError, EOFError, OSError) as e:
        counts["skipped: unreadable archive"] += 1
        print(f"archive {num}: {type(e).__name__}: {e}")
        return counts
    counts["archives converted"] += 1
    return counts


def main(args):
    out = Path(args.out)
    archives, todo, total = sd_data.pending_parts(args.source, args.archives, "--archives", out, SHARD_NAME.format,
                                                  "archives")
    if todo:
        anno = sd_data.fetch(args.source, args.annotations, args.raw_dir, timeout=args.timeout)
        if anno is None:
            raise UserError(f"annotations '{args.annotations}' not found under '{args.source}'")
        captions = load_annotations(anno, args.caption_field, todo)
        sd_data.run_jobs(convert_archive, [(a, captions[a], args) for a in todo], args.workers, "journeydb",
                         "archive", total)
    rows = sd_data.count_rows(total, ("archives", "archives already done", "archives converted",
                                      "archives missing at source", "images in", "kept"))
    sd_data.print_summary(f"01c JourneyDB -> {out}", rows, total["kept"] + total["archives already done"],
                          f"no image of archives {args.archives} from '{args.source}' was kept")


if __name__ == "__main__":
    parser = arg_parser(__doc__)
    parser.add_argument("--source", default="https://huggingface.co/datasets/JourneyDB/JourneyDB/resolve/main",
                        help="base URL or local folder in JourneyDB's layout (the hub repo is gated: pass a "
                             "local copy or a mirror)")
    parser.add_argument("--archives", default="0-9", help="archive numbers to convert, e.g. '0-9'")
    parser.add_argument("--annotations", default="data/train/train_anno_realease_repath.jsonl.tgz",
                        help="annotation file under --source (.jsonl or a .tgz holding one)")
    parser.add_argument("--caption_field", default="prompt", help="annotation field used as caption (dotted path)")
    parser.add_argument("--raw_dir", default="data/journeydb_raw", help="where files from a URL source are kept")
    parser.add_argument("--out", default="data/journeydb_tars", help="output folder of webdataset tars")
    parser.add_argument("--resolution", type=int, default=512, help="square side of the stored JPEGs")
    parser.add_argument("--jpeg_quality", type=int, default=95, help="JPEG quality of the stored images")
    parser.add_argument("--min_image_size", type=int, default=256, help="skip images whose shorter side is smaller")
    parser.add_argument("--timeout", type=int, default=60, help="seconds before a stalled download is retried")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="archives converted in parallel")
    run_main(main, parser.parse_args())
