"""COCO (detection-datasets/coco parquet) -> 512px JPEG webdataset tars of people seen whole (phases 5-7).

The seed's full-body phase kept the COCO images in which a person's box is at least 55% of the image height
(59,494 images): people seen whole or nearly, not crowds in the distance. Each is cropped to the largest
square centred on the tallest such person. Captions are COCO's own (captions_<split>2017.json, one of an
image's five, fixed per image) when given, else a template naming the people and the most frequent object.
"""
import json
import os
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

import sd_data
from sd_common import UserError, arg_parser, check_writable, run_main

# detection-datasets/coco: data/{train,val}-000NN-of-000MM-<hash>.parquet, rows of image_id, image {bytes,
# path}, width, height, objects {bbox_id, category, bbox, area}; category is the index in COCO's 80 names.
CATEGORIES = ("person,bicycle,car,motorcycle,airplane,bus,train,truck,boat,traffic light,fire hydrant,stop sign,"
              "parking meter,bench,bird,cat,dog,horse,sheep,cow,elephant,bear,zebra,giraffe,backpack,umbrella,handbag,"
              "tie,suitcase,frisbee,skis,snowboard,sports ball,kite,baseball bat,baseball glove,skateboard,surfboard,"
              "tennis racket,bottle,wine glass,cup,fork,knife,spoon,bowl,banana,apple,sandwich,orange,broccoli,carrot,"
              "hot dog,pizza,donut,cake,chair,couch,potted plant,bed,dining table,toilet,tv,laptop,mouse,remote,"
              "keyboard,cell phone,microwave,oven,toaster,sink,refrigerator,book,clock,vase,scissors,teddy bear,"
              "hair drier,toothbrush").split(",")
PERSON = 0
COLUMNS = ["image_id", "image", "width", "height", "objects"]
PEOPLE = {1: "a person", 2: "two people", 3: "three people"}
TEMPLATES = ["a full-body photo of {}", "a photo of {} standing", "a candid photo of {}",
             "a photograph of {}, full body"]


def objects_of(row):
    """[(category, (x0, y0, x1, y1))] of a row; `objects` is a struct of lists (datasets' Sequence of a dict)
    or a list of structs, depending on the datasets version that wrote the parquet."""
    objs = row["objects"] or {}
    if isinstance(objs, dict):
        objs = [dict(zip(objs, v)) for v in zip(*objs.values())]
    return [(int(o["category"]), tuple(float(v) for v in o["bbox"])) for o in objs if o.get("bbox") is not None]


def to_xyxy(box, fmt):
    x, y, a, b = box
    return (x, y, x + a, y + b) if fmt == "xywh" else (x, y, a, b)


def template_caption(key, n_people, others):
    """'a full-body photo of two people with a dog': the people, and the most frequent other object."""
    subject = PEOPLE.get(n_people, "a group of people")
    if others:
        name = Counter(others).most_common(1)[0][0]
        subject += f" with {'an' if name[0] in 'aeiou' else 'a'} {name}"
    return TEMPLATES[int(sd_data.key_fraction(key) * len(TEMPLATES))].format(subject)


_captions = {}


def read_captions(path):
    """{image_id: [captions in annotation-id order]} from COCO's captions_<split>2017.json, read once per
    process (workers get the path, not 600k captions pickled per file)."""
    if path in _captions:
        return _captions[path]
    try:
        anns = json.loads(Path(path).read_text())["annotations"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--captions '{path}' is not a COCO captions json ({type(e).__name__}: {e})"
                                 ) from None
    out = {}
    for a in sorted(anns, key=lambda a: a.get("id", 0)):
        out.setdefault(int(a["image_id"]), []).append(str(a["caption"]).strip())
    _captions[path] = out
    return out


def convert_file(src, dst, args):
    """One parquet file -> one tar of its images with a tall enough person; returns its counts."""
    counts = Counter()
    captions = read_captions(args.captions) if args.captions else None
    try:
        pf = pq.ParquetFile(src)
        batches = pf.iter_batches(batch_size=64, columns=COLUMNS)
    except (OSError, ValueError) as e:                # pyarrow's errors for a corrupt or partial file
        print(f"{src}: {type(e).__name__}: {str(e)[:160]}")
        return Counter({"skipped: unreadable parquet": 1})

    def samples():
        try:
            for batch in batches:
                for row in batch.to_pylist():
                    counts["images in"] += 1
                    image_id = int(row["image_id"])
                    objects = [(c, to_xyxy(b, args.bbox_format)) for c, b in objects_of(row)]
                    height = float(row["height"] or 0)
                    tall = [b for c, b in objects
                            if c == PERSON and height and (b[3] - b[1]) / height >= args.min_person_height]
                    if not tall:
                        counts["not kept: no person that tall"] += 1
                        continue
                    try:
                        img = sd_data.decode_image((row["image"] or {}).get("bytes") or b"", args.min_image_size)
                    except sd_data.BadSample as e:
                        counts[f"skipped: {e}"] += 1
                        continue
                    x0, y0, x1, y1 = max(tall, key=lambda b: b[3] - b[1])
                    img = sd_data.crop_square(img, ((x0 + x1) / 2, (y0 + y1) / 2), min(img.shape[:2]))
                    key = f"{image_id % 1000:03d}_{image_id:012d}"  # key[:5] spreads the latents over 1000 folders
                    if captions is not None:
                        options = captions.get(image_id)
                        caption = options[int(sd_data.key_fraction(key) * len(options))] if options else None
                    else:
                        # people the caption names: a quarter of the height or more (not the crowd far behind)
                        people = sum(1 for c, b in objects if c == PERSON and (b[3] - b[1]) / height >= 0.25)
                        others = [CATEGORIES[c] for c, _ in objects if c != PERSON and 0 <= c < len(CATEGORIES)]
                        caption = template_caption(key, people, others)
                    meta = {"source": "coco", "image_id": image_id, "person_box": [x0, y0, x1, y1]}
                    yield key, img, caption, meta
        except (OSError, ValueError) as e:            # a file cut off mid-way: keep the rows read so far
            counts["skipped: unreadable parquet"] += 1
            print(f"{src}: {type(e).__name__}: {str(e)[:160]}")

    counts["kept"] += sd_data.write_square_shard(samples(), dst, args.resolution, args.jpeg_quality,
                                                 args.min_image_size, counts)
    counts["files converted"] += 1
    return counts


def main(args):
    if args.source:
        src_dir = Path(args.source)
        if not src_dir.is_dir():
            raise UserError(f"--source '{src_dir}' is not a folder")
    else:
        from huggingface_hub import snapshot_download
        from SD_Model import require_hub
        require_hub("dataset", args.repo_id, "fetch its data/*.parquet elsewhere and pass --source DIR")
        try:
            src_dir = Path(snapshot_download(repo_id=args.repo_id, repo_type="dataset", local_dir=args.raw_dir,
                                             allow_patterns=[f"data/{args.split}-*.parquet"], max_workers=args.workers))
        except Exception as e:
            raise UserError(
                f"could not download dataset '{args.repo_id}' ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                "offline? fetch its data/*.parquet elsewhere and pass --source DIR") from None
    files = sorted(src_dir.rglob(f"{args.split}-*.parquet"))
    if not files:
        raise UserError(f"no {args.split}-*.parquet files under '{src_dir}'")
    for f in files:                                  # another data set's parquet: one line here, not a worker's KeyError
        try:
            missing = sorted(set(COLUMNS) - set(pq.read_schema(f).names))
        except (OSError, ValueError):
            continue                                 # unreadable: skipped and counted by its worker
        if missing:
            raise UserError(f"'{f}' lacks columns {missing}: not a detection-datasets/coco parquet file "
                            f"(needs {COLUMNS})")
    if args.captions:
        read_captions(args.captions)                 # a bad file fails here, once, before any worker starts
    out = Path(args.out)
    check_writable(out, "--out")
    todo = [(str(f), str(out / f"{f.stem}.tar"), args) for f in files if not (out / f"{f.stem}.tar").exists()]
    total = Counter({"parquet files": len(files), "files already done": len(files) - len(todo)})
    sd_data.run_jobs(convert_file, todo, args.workers, "coco", "file", total)
    rows = sd_data.count_rows(total, ("parquet files", "files already done", "files converted", "images in",
                                      "not kept: no person that tall", "kept"))
    sd_data.print_summary(f"01e COCO people (person >= {args.min_person_height:.0%} of the height) -> {out}", rows,
                          total["kept"] + total["files already done"], f"no image under '{src_dir}' was kept")


if __name__ == "__main__":
    parser = arg_parser(__doc__)
    parser.add_argument("--repo_id", default="detection-datasets/coco", help="Hugging Face dataset repo to download")
    parser.add_argument("--raw_dir", default="data/coco_raw", help="where the downloaded parquet files go")
    parser.add_argument("--source", default=None, help="local folder of the parquet files instead of downloading")
    parser.add_argument("--split", default="train", help="train or val (the parquet file name prefix)")
    parser.add_argument("--captions", default=None, help="COCO captions_<split>2017.json for real captions "
                        "(else template captions)")
    parser.add_argument("--min_person_height", type=float, default=0.55, help="keep images with a person box at "
                        "least this fraction of the image height")
    parser.add_argument("--bbox_format", choices=["xyxy", "xywh"], default="xyxy",
                        help="box layout in the parquet: detection-datasets stores [xmin, ymin, xmax, ymax]; "
                             "COCO's own json stores [x, y, w, h]")
    parser.add_argument("--out", default="data/coco_tars", help="output folder of webdataset tars")
    parser.add_argument("--resolution", type=int, default=512, help="square side of the stored JPEGs")
    parser.add_argument("--jpeg_quality", type=int, default=95, help="JPEG quality of the stored images")
    parser.add_argument("--min_image_size", type=int, default=256, help="skip images whose shorter side is smaller")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="parquet files converted in parallel")
    run_main(main, parser.parse_args())
