"""Download LAION parquet metadata (huggingface_hub.snapshot_download) and normalise its column names."""
from pathlib import Path

import pyarrow.parquet as pq
from tqdm import tqdm

import sd_data
from sd_common import UserError, arg_parser, atomic_path, check_writable, run_main


def download(args):
    """snapshot_download the dataset repo's parquet shards into args.raw_dir; finished files are kept,
    so a re-run only fetches what is missing (huggingface_hub resumes interrupted files itself)."""
    from huggingface_hub import snapshot_download
    from SD_Model import require_hub
    require_hub("dataset", args.repo_id, "fetch the parquet elsewhere and pass --source DIR")
    try:
        snapshot_download(repo_id=args.repo_id, repo_type="dataset", revision=args.revision,
                          allow_patterns=args.patterns, local_dir=args.raw_dir, max_workers=args.workers)
    except Exception as e:
        raise UserError(
            f"could not download dataset '{args.repo_id}' ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
            f"offline? fetch the parquet elsewhere and pass --source DIR") from None
    return args.raw_dir


def normalise_shard(src, dst):
    """Rewrite one parquet shard with canonical LAION column names, row group by row group (a 2B-row
    release never sits in memory), through a temp file so an interrupted shard is redone on resume."""
    import pyarrow as pa
    pf = pq.ParquetFile(src)
    writer, rows = None, 0
    with atomic_path(dst) as tmp:
        try:
            for i in range(pf.num_row_groups):
                table = sd_data.normalize_laion_columns(pf.read_row_group(i))
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
                rows += table.num_rows
            if writer is None:  # a shard with no row groups: keep its (normalised) schema
                table = sd_data.normalize_laion_columns(pa.Table.from_batches([], pf.schema_arrow))
                writer = pq.ParquetWriter(tmp, table.schema)
        finally:
            if writer is not None:
                writer.close()
    return rows


def main(args):
    src_dir = Path(args.source) if args.source else Path(download(args))
    shards = sorted(Path(src_dir).rglob("*.parquet"))
    if not shards:
        raise UserError(f"no .parquet files under '{src_dir}'")
    out = Path(args.out)
    check_writable(out, "--out")

    counts = {"shards": len(shards), "already done": 0, "normalised": 0, "unreadable": 0, "rows": 0}
    for src in tqdm(shards, desc="normalise", unit="shard"):
        # flatten sub-folders into the file name so shards with the same name cannot collide
        dst = out / "_".join(src.relative_to(src_dir).parts)
        if dst.exists():
            counts["already done"] += 1
            counts["rows"] += pq.ParquetFile(dst).metadata.num_rows
            continue
        try:
            counts["rows"] += normalise_shard(src, dst)
            counts["normalised"] += 1
        except (OSError, ValueError) as e:  # pyarrow raises these for a corrupt or partial file
            counts["unreadable"] += 1
            tqdm.write(f"skipping unreadable shard {src}: {str(e)[:160]}")
    sd_data.print_summary(f"01 metadata -> {out}", list(counts.items()), counts["normalised"] + counts["already done"],
                          f"none of the {len(shards)} parquet shards under '{src_dir}' could be read")


if __name__ == "__main__":
    parser = arg_parser(__doc__)
    parser.add_argument("--repo_id", default="laion/laion2B-en-aesthetic", help="Hugging Face dataset repo to snapshot")
    parser.add_argument("--revision", default=None, help="branch, tag or commit of the dataset repo")
    parser.add_argument("--patterns", nargs="+", default=["*.parquet"], help="allow_patterns of the files to fetch")
    parser.add_argument("--raw_dir", default="data/laion_meta_raw", help="where the downloaded parquet shards go")
    parser.add_argument("--source", default=None, help="local folder of parquet shards to use instead of downloading")
    parser.add_argument("--out", default="data/laion_meta", help="output folder of normalised parquet shards")
    parser.add_argument("--workers", type=int, default=8, help="parallel downloads")
    run_main(main, parser.parse_args())
