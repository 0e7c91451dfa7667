"""Build an Arrow Hugging Face image dataset (image, caption, key, source) from DiffusionDB/JourneyDB tars (and
OUT/preview.png: random rows of it with their captions)."""
import json
import tempfile
from collections import Counter
from pathlib import Path

from tqdm import tqdm

import sd_data
from sd_common import UserError, arg_parser, atomic_folder, check_writable, run_main

BUILD_INFO = "build_info.json"


def main(args):
    import datasets
    sd_data.check_val_fraction(args.val_fraction)
    sd_data.check_preview(args.preview)
    tars = sd_data.list_tars(args.tars)
    out = Path(args.out)
    check_writable(out.parent, "--out")                 # the output is built beside it, then swapped in
    inputs = {"tars": [[str(t), *sd_data.file_identity(t)] for t in tars],
              "val_fraction": args.val_fraction, "min_image_size": args.min_image_size}
    info_path = out / BUILD_INFO
    if info_path.exists() and json.loads(info_path.read_text()).get("inputs") == inputs:
        sd_data.print_summary(f"03 image dataset -> {out} (up to date, nothing rebuilt)",
                              list(json.loads(info_path.read_text())["counts"].items()))
        write_dataset_preview(args, out)
        return
    if out.exists() and any(out.iterdir()) and not info_path.exists():
        raise UserError(f"'{out}' exists and was not built by this script; pick another --out")

    counts = Counter()
    seen = set()

    def rows(split):
        """Samples of one split; the image bytes are stored as they are in the tar (already 512px JPEG)."""
        for tar in tars:
            for key, sample in sd_data.iter_tar_samples(tar, counts if split == "train" else None):
                if key in seen or sd_data.is_validation_key(key, args.val_fraction) != (split == "validation"):
                    continue
                try:
                    image, caption = sd_data.usable_sample(sample, args.min_image_size)
                except sd_data.BadSample as e:
                    counts[f"skipped: {e}"] += 1
                    continue
                seen.add(key)
                meta = json.loads(sample["json"]) if "json" in sample else {}
                counts[split] += 1
                yield {"image_key": key, "caption": caption, "source": str(meta.get("source", tar.stem)),
                       "image": {"bytes": image, "path": None}}

    features = datasets.Features({"image_key": datasets.Value("string"), "caption": datasets.Value("string"),
                                  "source": datasets.Value("string"), "image": datasets.Image()})
    out.parent.mkdir(parents=True, exist_ok=True)
    # only reached when out is new or holds our build_info.json (checked above): atomic_folder may replace it.
    # from_generator streams to Arrow files on disk (images never all in RAM), its cache beside the output.
    with atomic_folder(out) as tmp, tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.cache") as cache:
        splits = {}
        for split in ("train", "validation"):
            gen = lambda split=split: tqdm(rows(split), desc=split, unit="img")  # noqa: E731
            splits[split] = datasets.Dataset.from_generator(gen, features=features, cache_dir=cache)
        # an empty split is left out: datasets.load_from_disk cannot open one
        dd = datasets.DatasetDict({k: v for k, v in splits.items() if len(v)})
        dd.save_to_disk(str(tmp))
        del dd, splits
        (tmp / BUILD_INFO).write_text(json.dumps({"inputs": inputs, "counts": dict(counts)}, indent=2) + "\n")
    rows_ = [("tars", len(tars))] + sd_data.count_rows(counts, ("truncated tar", "train", "validation"))
    sd_data.print_summary(f"03 image dataset -> {out}", rows_, counts["train"], "no usable sample in the tars")
    write_dataset_preview(args, out)


def write_dataset_preview(args, out):
    """The stored rows (train split) whose keys rank first for the preview seed, as the dataset holds them."""
    import datasets
    if not args.preview:
        return
    dd = datasets.load_from_disk(str(out))
    ds = dd["train" if "train" in dd else "validation"].cast_column("image", datasets.Image(decode=False))
    keys, tiles, captions, shown = ds["image_key"], [], [], []
    for i in sorted(range(len(keys)), key=lambda i: sd_data.preview_rank(keys[i], args.preview_seed)):
        if len(tiles) == args.preview:
            break
        row = ds[i]
        try:
            tiles.append(sd_data.load_image_square(row["image"]["bytes"], sd_data.PREVIEW_TILE, min_size=1))
        except Exception:                            # noqa: BLE001 - a body broken behind a good header: not shown
            continue
        captions.append(row["caption"])
        shown.append(row["image_key"])
    sd_data.write_preview(out / sd_data.PREVIEW_NAME, tiles, captions, shown)


if __name__ == "__main__":
    parser = arg_parser(__doc__)
    parser.add_argument("--tars", nargs="+", default=["data/diffusiondb_tars", "data/journeydb_tars"],
                        help="input folders of webdataset tars (from 01b/01c)")
    parser.add_argument("--out", default="data/dm_image_dataset", help="output folder of the saved DatasetDict")
    parser.add_argument("--val_fraction", type=float, default=0.01, help="share of keys in the validation split")
    parser.add_argument("--min_image_size", type=int, default=64, help="skip images whose shorter side is smaller")
    sd_data.add_preview_args(parser)
    run_main(main, parser.parse_args())
