"""Merge 04's parquet batches into a Hugging Face DatasetDict with a deterministic train/validation split (and
OUT/preview.png: random rows of it, each image from the tars 04 read, with its caption)."""
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

import sd_data
from sd_common import UserError, arg_parser, atomic_folder, check_writable, run_main

BUILD_INFO = "build_info.json"


def main(args):
    import datasets
    sd_data.check_val_fraction(args.val_fraction)
    sd_data.check_preview(args.preview)
    batches = sd_data.list_files(args.batches, [".parquet"], "parquet batches")
    tars = preview_tars(args) if args.preview else []
    out = Path(args.out)
    check_writable(out.parent, "--out")                 # the output is built beside it, then swapped in
    # resume: the same inputs and split give the same dataset, so there is nothing to redo
    inputs = {"batches": [[p.name, *sd_data.file_identity(p)] for p in batches],
              "val_fraction": args.val_fraction}
    info_path = out / BUILD_INFO
    if info_path.exists() and json.loads(info_path.read_text()).get("inputs") == inputs:
        info = json.loads(info_path.read_text())
        sd_data.print_summary(f"05 dataset -> {out} (up to date, nothing rebuilt)",
                              [("batches", len(batches))] + list(info["counts"].items()))
        write_dataset_preview(args, out, tars)
        return
    if out.exists() and any(out.iterdir()) and not info_path.exists():
        raise UserError(f"'{out}' exists and was not built by this script; pick another --out")

    tables = []
    for p in tqdm(batches, desc="read", unit="batch"):
        try:
            tables.append(pq.read_table(p, columns=["image_key", "caption", "input_ids"]))
        except (OSError, ValueError, KeyError, pa.ArrowInvalid) as e:
            tqdm.write(f"skipping unreadable batch {p}: {str(e)[:160]}")
    if not tables:
        raise UserError(f"no readable batches in '{args.batches}'")
    table = pa.concat_tables(tables)
    rows_in = table.num_rows

    # the same key twice (tar folders merged from several sources) keeps its first occurrence; rows go in key
    # order, so a re-download (img2dataset writes in completion order) gives the same dataset, row for row
    keys = table.column("image_key").to_pylist()
    _, first = np.unique(np.array(keys, dtype=object), return_index=True)
    table = table.take(pa.array(first))
    keys = table.column("image_key").to_pylist()
    is_val = np.array([sd_data.is_validation_key(k, args.val_fraction) for k in keys], dtype=bool)

    ds = datasets.Dataset(table)
    splits = {"train": ds.select(np.flatnonzero(~is_val)), "validation": ds.select(np.flatnonzero(is_val))}
    counts = {"rows in": rows_in, "skipped: duplicate key": rows_in - len(keys),
              "train": len(splits["train"]), "validation": len(splits["validation"])}
    # an empty split is left out: datasets.load_from_disk cannot open one (SD_Train then skips validation)
    dd = datasets.DatasetDict({k: v for k, v in splits.items() if len(v)})

    # write beside, then swap in: an interrupted build leaves the previous dataset intact (out is new or ours:
    # its build_info.json was checked above)
    with atomic_folder(out) as tmp:
        dd.save_to_disk(str(tmp), num_proc=None)
        (tmp / BUILD_INFO).write_text(json.dumps({"inputs": inputs, "counts": counts}, indent=2) + "\n")
    sd_data.print_summary(f"05 dataset -> {out}", [("batches", len(batches))] + list(counts.items()), counts["train"],
                          "no training row")
    write_dataset_preview(args, out, tars)


def preview_tars(args):
    try:
        return sd_data.list_tars(args.tars)
    except UserError as e:
        raise UserError(f"{e}: the preview shows each row's image from --tars (the folder 04 read), or pass "
                        "--preview 0") from None


def write_dataset_preview(args, out, tars):
    """Rows of the dataset (either split) shown with their images, looked up in the tars 04 tokenized."""
    if args.preview:
        import datasets
        dd = datasets.load_from_disk(str(out))
        keys = {k for split in dd.values() for k in split["image_key"]}
        sd_data.write_tar_preview(out, tars, args.preview, args.preview_seed, keys)


if __name__ == "__main__":
    parser = arg_parser(__doc__)
    parser.add_argument("--batches", default="data/laion_tokens", help="input folder of parquet batches (from 04)")
    parser.add_argument("--out", default="data/laion_hf", help="output folder of the saved DatasetDict")
    parser.add_argument("--val_fraction", type=float, default=0.01,
                        help="share of keys in the validation split (by a hash of image_key, so stable)")
    parser.add_argument("--tars", nargs="+", default=["data/laion_tars"],
                        help="the tar folder(s) 04 read (the preview's images)")
    sd_data.add_preview_args(parser)
    run_main(main, parser.parse_args())
