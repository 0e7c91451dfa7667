"""Read webdataset tar shards into parquet batches of (image_key, caption, 77 CLIP token ids)."""
import json
import os
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

import SD_Model
import sd_data
from sd_common import UserError, arg_parser, atomic_path, check_writable, run_main

_tokenizer = None
SOURCE_TAR = b"source_tar"   # parquet metadata: [size, mtime_ns] of the tar the batch was made from


def made_from(parquet):
    """The tar identity a finished batch records (None for a batch of an older version: redone)."""
    meta = pq.read_schema(parquet).metadata or {}
    return json.loads(meta[SOURCE_TAR]) if SOURCE_TAR in meta else None


def process_shard(tar, dst, text_encoder, min_size, batch):
    """One tar -> one parquet of its usable samples (via a temp file: a shard's parquet exists only when
    complete, which is what the resume check looks at), stamped with the tar's size and mtime as they were
    before reading it: a tar that was still being written is redone by the next run. Returns its counts."""
    import pyarrow as pa
    import torch
    global _tokenizer
    if _tokenizer is None:  # once per worker process
        _tokenizer = SD_Model.load_tokenizer(text_encoder, "--text_encoder")
    identity = sd_data.file_identity(tar)
    counts = Counter()
    keys, captions = [], []
    for key, sample in sd_data.iter_tar_samples(tar, counts):
        counts["samples in"] += 1
        try:
            _, caption = sd_data.usable_sample(sample, min_size)
        except sd_data.BadSample as e:
            counts[f"skipped: {e}"] += 1
            continue
        keys.append(key)
        captions.append(caption)
    ids = []
    for i in range(0, len(captions), batch):
        ids.extend(SD_Model.tokenize(_tokenizer, captions[i:i + batch]).to(torch.int32).tolist())
    table = pa.table({"image_key": pa.array(keys, pa.string()), "caption": pa.array(captions, pa.string()),
                      "input_ids": pa.array(ids, pa.list_(pa.int32()))})
    table = table.replace_schema_metadata({SOURCE_TAR: json.dumps(identity)})
    with atomic_path(dst) as tmp:
        pq.write_table(table, tmp)
    counts["kept"] += len(keys)
    return counts


def main(args):
    if args.tokenize_batch < 1:
        raise UserError(f"--tokenize_batch must be at least 1 (got {args.tokenize_batch})")
    tars = sd_data.list_tars(args.tars)
    out = Path(args.out)
    check_writable(out, "--out")
    SD_Model.load_tokenizer(args.text_encoder, "--text_encoder")  # fail fast, in one line, before starting workers

    # done = a batch made from the tar as it is now; one made from an earlier state of it is redone
    done = [(out / f"{t.stem}.parquet").exists() for t in tars]
    todo = [t for t, d in zip(tars, done) if not d or made_from(out / f"{t.stem}.parquet") != sd_data.file_identity(t)]
    total = Counter({"shards": len(tars), "shards already done": len(tars) - len(todo),
                     "shards changed since: redone": sum(done) - (len(tars) - len(todo))})
    jobs = [(str(t), str(out / f"{t.stem}.parquet"), args.text_encoder, args.min_image_size, args.tokenize_batch)
            for t in todo]
    sd_data.run_jobs(process_shard, jobs, args.workers, "tokenize", "shard", total)
    rows = sd_data.count_rows(total, ("shards", "shards already done", "shards changed since: redone", "truncated tar",
                                      "samples in", "kept"))
    sd_data.print_summary(f"04 captions + token ids -> {out}", rows, total["kept"] + total["shards already done"],
                          "no tar held a sample with an image and a caption")


if __name__ == "__main__":
    parser = arg_parser(__doc__)
    parser.add_argument("--tars", nargs="+", default=["data/laion_tars"],
                        help="input folder(s) of webdataset tar shards (phase 3: DiffusionDB's and JourneyDB's)")
    parser.add_argument("--out", default="data/laion_tokens", help="output folder of parquet batches (one per tar)")
    parser.add_argument("--text_encoder", default=SD_Model.DEFAULT_TEXT_ENCODER["sd1"],
                        help="the CLIP text encoder whose tokenizer is used: hub id, text encoder or tokenizer folder, "
                             "or diffusers pipeline folder; the phase's SD_Train.py --text_encoder (SD2 phases: "
                             f"{SD_Model.DEFAULT_TEXT_ENCODER['sd2']}, which pads differently; SD_Train.py refuses "
                             "ids from another tokenizer)")
    parser.add_argument("--min_image_size", type=int, default=64, help="skip images whose shorter side is smaller")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count()), help="shards tokenised in parallel")
    parser.add_argument("--tokenize_batch", type=int, default=1024, help="captions per tokenizer call")
    run_main(main, parser.parse_args())
