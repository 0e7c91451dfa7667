"""Filter LAION metadata by quality (aesthetic, CLIP similarity, size, watermark, NSFW, caption) and dedup."""
import hashlib
import json
from contextlib import ExitStack, closing
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

import sd_data
from sd_common import UserError, arg_parser, atomic_path, check_writable, run_main, write_atomic

# One preset per phase of configs/phases.yaml whose data is LAION-style metadata.
# The seed's phases (003 summary, "Training Phases"). Phase 1 says "no watermark/NSFW" without a number:
# we read it as LAION's predicted probabilities < 0.5. Phase 2 is a stricter cut of phase 1's pool, so it
# keeps phase 1's size and NSFW limits; its watermark < 0.15 is the seed script's default (0.25 in its blog).
# Phases 6 and 7 draw their LAION share from phase 2's set (data/laion_hq_*), so their preset is phase 2's.
SEED_PHASE1 = dict(min_aesthetic=6.5, min_similarity=0.28, min_width=512, min_height=512, max_watermark=0.5,
                   max_punsafe=0.5)
SEED_PHASE2 = dict(min_aesthetic=7.5, min_similarity=0.30, min_width=512, min_height=512, max_watermark=0.15,
                   max_punsafe=0.5)
# NeMo's stages (summary 000) filter by resolution alone: the 256 px pretraining stages take every pair, SD 1.1
# the >= 1024x1024 subset, SD 1.2 / 1.5 / 2.0-base the >= 512x512 subset (captions and dedup as for every preset).
HIRES_1024, HIRES_512 = dict(min_width=1024, min_height=1024), dict(min_width=512, min_height=512)
PRESETS = {"phase1": SEED_PHASE1, "phase2": SEED_PHASE2, "phase6": SEED_PHASE2, "phase7": SEED_PHASE2,
           "nemo_pretrain_256": {}, "sd11": HIRES_1024, "sd12": HIRES_512, "sd15": HIRES_512,
           "sd2_pretrain_256": {}, "sd2_base_512": HIRES_512}
# Phases whose data is not LAION metadata: --preset names the script that makes it instead of filtering nothing.
NOT_LAION = {"phase3": "DiffusionDB + JourneyDB: 01b_download_diffusiondb.py and 01c_download_journeydb_images.py",
             "phase4": "VGGFace2 faces: 01d_prepare_vggface2.py", "phase5": "COCO people: 01e_download_coco_people.py"}
THRESHOLDS = ["min_aesthetic", "min_similarity", "min_width", "min_height", "max_watermark", "max_punsafe"]
# funnel order: (threshold, column, keep-if)
NUMERIC_FILTERS = [
    ("min_aesthetic", "aesthetic", pc.greater_equal),
    ("min_similarity", "similarity", pc.greater_equal),
    ("min_width", "width", pc.greater_equal),
    ("min_height", "height", pc.greater_equal),
    ("max_watermark", "pwatermark", pc.less),
    ("max_punsafe", "punsafe", pc.less),
]


def resolve_thresholds(args):
    """A flag given on the command line wins over the preset; a threshold in neither is off (None)."""
    if args.preset in NOT_LAION:
        raise UserError(f"{args.preset}'s data is not LAION metadata, so 02 has no filter for it; it comes from "
                        f"{NOT_LAION[args.preset]} (README: 'Every phase's data')")
    preset = PRESETS.get(args.preset, {})
    return {k: getattr(args, k) if getattr(args, k) is not None else preset.get(k) for k in THRESHOLDS}


def digest(value):
    """64-bit digest for dedup: 8 bytes per kept row instead of the whole URL string."""
    return int.from_bytes(hashlib.blake2b(str(value).encode(), digest_size=8).digest(), "little")


def filter_batch(table, thr, args, seen, new, funnel):
    """Apply the filters in funnel order to one record batch, counting rows left after each. Dedup looks in
    `seen` (finished shards) and `new` (this shard so far), and adds to `new`."""
    for name, column, keep_if in NUMERIC_FILTERS:
        if thr[name] is None:
            continue
        if column not in table.column_names:
            raise UserError(f"--{name} needs column '{column}', which the metadata lacks "
                                     f"(has {table.column_names}); pass --{name} with no preset or run 01 first")
        mask = pc.fill_null(keep_if(table.column(column), thr[name]), False)  # missing score -> drop
        table = table.filter(mask)
        funnel[f"{column} {'>=' if keep_if is pc.greater_equal else '<'} {thr[name]}"] += table.num_rows

    captions = table.column("caption").to_pylist() if "caption" in table.column_names else [None] * table.num_rows
    keep = []
    for i, cap in enumerate(captions):
        problem = sd_data.caption_problem(cap, args.min_caption_chars, args.max_caption_chars)
        if problem:
            funnel[f"skipped: {problem}"] += 1
        keep.append(problem is None)
    table = table.filter(pa.array(keep, pa.bool_()))
    funnel["caption ok"] += table.num_rows

    # exact dedup on URL and, where present, LAION's content hash; runs last so `seen` only holds rows
    # that passed every quality filter (a few million, not the 2B input)
    urls = table.column("url").to_pylist()
    hashes = table.column("hash").to_pylist() if "hash" in table.column_names else [None] * len(urls)
    keep = []
    for url, h in zip(urls, hashes):
        keys = [("u", digest(url))] + ([("h", digest(h))] if h else [])
        dup = url is None or any(k in seen or k in new for k in keys)
        if not dup:
            new.update(keys)
        keep.append(not dup)
    table = table.filter(pa.array(keep, pa.bool_()))
    funnel["not a duplicate"] += table.num_rows
    return table


def filter_shard(src, dst, thr, args, seen):
    """Stream one shard batch by batch into dst (via a temp file); returns the shard's funnel, or None when the
    shard cannot be read to its end (a corrupt or cut-off file: its rows are not kept, nor added to `seen`)."""
    from collections import Counter
    funnel, new = Counter(), set()
    writer = None
    try:
        with ExitStack() as stack:                   # unwinds writer first, then the atomic rename (or cleanup)
            for batch in pq.ParquetFile(src).iter_batches(batch_size=args.batch_rows):
                table = sd_data.normalize_laion_columns(pa.Table.from_batches([batch]))
                funnel["rows in"] += table.num_rows
                kept = filter_batch(table, thr, args, seen, new, funnel)
                if writer is None:                   # an empty shard writes nothing
                    tmp = stack.enter_context(atomic_path(dst))
                    writer = stack.enter_context(closing(pq.ParquetWriter(tmp, kept.schema)))
                writer.write_table(kept)
    except (OSError, ValueError) as e:               # pyarrow's errors for a corrupt or partial file (as in 01)
        tqdm.write(f"skipping unreadable shard {src}: {str(e)[:160]}")
        return None
    seen |= new
    return funnel


def main(args):
    if args.batch_rows < 1:
        raise UserError(f"--batch_rows must be at least 1 (got {args.batch_rows})")
    shards = sd_data.list_files(args.meta, [".parquet"], "metadata")
    out = Path(args.out)
    check_writable(out, "--out")
    thr = resolve_thresholds(args)
    config = dict(thr, min_caption_chars=args.min_caption_chars, max_caption_chars=args.max_caption_chars)
    config_path = out / "filter_config.json"
    if config_path.exists() and json.loads(config_path.read_text()) != config:
        raise UserError(f"'{out}' was filtered with other settings ({config_path}); pick a new --out")
    write_atomic(config_path, json.dumps(config, indent=2) + "\n")
    print("filters:", {k: v for k, v in config.items() if v is not None})

    # resume: shards already written count in the funnel from their sidecar and seed the dedup set
    seen, done, unreadable, funnels = set(), 0, 0, []
    for src in shards:
        dst, side = out / src.name, out / f"{src.stem}.funnel.json"
        if side.exists():
            done += 1
            funnels.append(json.loads(side.read_text()))
            if dst.exists():
                t = pq.read_table(dst, columns=[c for c in ("url", "hash") if c in pq.read_schema(dst).names])
                hashes = t.column("hash").to_pylist() if "hash" in t.column_names else [None] * t.num_rows
                for url, h in zip(t.column("url").to_pylist(), hashes):
                    seen.add(("u", digest(url)))
                    if h:
                        seen.add(("h", digest(h)))

    for src in tqdm(shards, desc="filter", unit="shard"):
        dst, side = out / src.name, out / f"{src.stem}.funnel.json"
        if side.exists():
            continue
        funnel = filter_shard(src, dst, thr, args, seen)
        if funnel is None:                      # not marked done: a re-run (after a re-download) tries it again
            unreadable += 1
            continue
        write_atomic(side, json.dumps(funnel))  # written last: marks the shard done
        funnels.append(funnel)

    total = {}
    for f in funnels:
        for k, v in f.items():
            total[k] = total.get(k, 0) + v
    stages = [k for k in total if not k.startswith("skipped:")]  # insertion order = funnel order
    rows = [("shards", len(shards)), ("shards already done", done), ("skipped: unreadable shard", unreadable)]
    rows += [(k, total[k]) for k in stages] + [(k, total[k]) for k in sorted(total) if k.startswith("skipped:")]
    rows.append(("kept", total.get("not a duplicate", 0)))
    sd_data.print_summary(f"02 filter funnel -> {out}", rows, total.get("not a duplicate", 0),
                          "no row passed the filters (or no shard was readable)")


if __name__ == "__main__":
    parser = arg_parser(__doc__)
    parser.add_argument("--meta", default="data/laion_meta", help="input folder of normalised parquet (from 01)")
    parser.add_argument("--out", default="data/laion_filtered", help="output folder of filtered parquet")
    parser.add_argument("--preset", choices=sorted({*PRESETS, *NOT_LAION}), default=None,
                        help="the thresholds of a phase or NeMo stage of configs/phases.yaml")
    parser.add_argument("--min_aesthetic", type=float, default=None, help="keep aesthetic >= this (overrides preset)")
    parser.add_argument("--min_similarity", type=float, default=None, help="keep CLIP similarity >= this")
    parser.add_argument("--min_width", type=int, default=None, help="keep original width >= this")
    parser.add_argument("--min_height", type=int, default=None, help="keep original height >= this")
    parser.add_argument("--max_watermark", type=float, default=None, help="keep pwatermark < this")
    parser.add_argument("--max_punsafe", type=float, default=None, help="keep punsafe (NSFW probability) < this")
    parser.add_argument("--min_caption_chars", type=int, default=5, help="shortest usable caption")
    parser.add_argument("--max_caption_chars", type=int, default=1000, help="longest usable caption")
    parser.add_argument("--batch_rows", type=int, default=262144, help="rows per streamed batch (memory bound)")
    run_main(main, parser.parse_args())
