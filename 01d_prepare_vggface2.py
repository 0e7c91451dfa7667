"""VGGFace2 (a local copy) -> 512px face-centred JPEG webdataset tars with template captions (phases 4, 6, 7).

The seed's face phase used 51,786 VGGFace2 images: 6 per identity over the 8,631 train identities. Here the 6
kept are each identity's largest images (shorter side, from the header alone), so the 512 px crops are the
least upsampled; each is cropped to a square around the loose face box, widened by --face_margin, so the
whole head and some shoulders are in frame. Captions come from templates with the identity's gender; names
are never written into captions.
"""
import csv
import os
from collections import Counter
from pathlib import Path

from PIL import Image

import sd_data
from sd_common import UserError, arg_parser, check_writable, run_main

# VGGFace2 layout (the release, after unpacking vggface2_train.tar.gz and the meta files):
#   train/n000002/0001_01.jpg ...
#   meta/identity_meta.csv        Class_ID, Name, Sample_Num, Flag, Gender   (gender: m / f)
#   bb_landmark/loose_bb_train.csv  NAME_ID,X,Y,W,H   (NAME_ID: n000002/0001_01)
IDENTITY_META = "meta/identity_meta.csv"
LOOSE_BB = "bb_landmark/loose_bb_{split}.csv"
SHARD = "vggface2-{:06d}.tar"
PERSON = {"m": "man", "f": "woman"}
TEMPLATES = ["a close-up portrait photo of a {}", "a photo of a {}'s face", "a headshot of a {}",
             "a portrait of a {}, looking at the camera", "a close-up photo of the face of a {}",
             "a professional portrait photograph of a {}"]


def read_genders(path):
    """{identity: 'man' | 'woman'} from identity_meta.csv (its fields carry a leading space)."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        rows = csv.reader(f, skipinitialspace=True)
        next(rows, None)
        return {r[0].strip(): PERSON.get(r[-1].strip().lower(), "person") for r in rows if len(r) >= 5}


def read_boxes(path, identities):
    """{'n000002/0001_01': (x, y, w, h)} for the given identities only (the train file has 3.1M lines)."""
    boxes = {}
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if len(row) == 5 and row[0].split("/")[0] in identities:
                try:
                    boxes[row[0]] = tuple(float(v) for v in row[1:])
                except ValueError:
                    continue                         # the header line
    return boxes


def caption_for(key, person):
    return TEMPLATES[int(sd_data.key_fraction(key) * len(TEMPLATES))].format(person)


def convert_shard(index, identities, genders, args):
    """Pick, crop and caption the images of `identities` into OUT/vggface2-NNNNNN.tar; returns its counts."""
    counts = Counter()
    root = Path(args.source) / args.split
    bb_path = Path(args.source) / LOOSE_BB.format(split=args.split)
    boxes = read_boxes(bb_path, set(identities)) if bb_path.exists() else {}

    def samples():
        for ident in identities:
            sized = []                               # (shorter side, name, path) from the header alone: an
            for path in sorted(p for p in (root / ident).iterdir() if p.is_file()):   # identity has ~360 images
                counts["images in"] += 1
                try:
                    with Image.open(path) as im:
                        side = min(im.size)
                except Exception:
                    counts["skipped: not an image"] += 1
                    continue
                if side < args.min_image_size:
                    counts["skipped: image too small"] += 1
                    continue
                sized.append((side, path.stem, path))
            sized.sort(key=lambda s: (-s[0], s[1]))
            picked = 0
            for i, (_, stem, path) in enumerate(sized):
                if picked == args.per_identity:
                    counts["not picked (over --per_identity)"] += len(sized) - i
                    break
                try:                                 # the full check (truncation, decode) on the picked only
                    img = sd_data.decode_image(path.read_bytes(), min_size=args.min_image_size)
                except sd_data.BadSample as e:
                    counts[f"skipped: {e}"] += 1     # the next largest takes its place
                    continue
                picked += 1
                box = boxes.get(f"{ident}/{stem}")
                if box is None:
                    counts["no face box: centre crop"] += 1
                else:
                    x, y, w, h = box
                    img = sd_data.crop_square(img, (x + w / 2, y + h / 2), max(w, h) * args.face_margin)
                key = f"{ident}_{stem}"              # key[:5] = 'n0000': ~100 identities per latent folder
                meta = {"source": "vggface2", "identity": ident, "file": f"{ident}/{stem}", "face_box": box}
                yield key, img, caption_for(key, genders.get(ident, "person")), meta

    counts["kept"] += sd_data.write_square_shard(samples(), Path(args.out) / SHARD.format(index), args.resolution,
                                                 args.jpeg_quality, args.min_image_size, counts)
    return counts


def main(args):
    root = Path(args.source) / args.split
    if not root.is_dir():
        raise UserError(f"'{root}' does not exist; --source is the unpacked VGGFace2 folder holding "
                                 f"{args.split}/<identity>/<image>.jpg")
    identities = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not identities:
        raise UserError(f"no identity folders in '{root}'")
    meta_path = Path(args.source) / IDENTITY_META
    genders = read_genders(meta_path) if meta_path.exists() else {}
    out = Path(args.out)
    check_writable(out, "--out")
    n = args.identities_per_shard
    shards = [(i, identities[s:s + n]) for i, s in enumerate(range(0, len(identities), n))]
    todo = [(i, ids, {k: genders[k] for k in ids if k in genders}, args) for i, ids in shards
            if not (out / SHARD.format(i)).exists()]
    total = Counter({"identities": len(identities), "shards": len(shards),
                     "shards already done": len(shards) - len(todo)})
    sd_data.run_jobs(convert_shard, todo, args.workers, "vggface2", "shard", total)
    rows = sd_data.count_rows(total, ("identities", "shards", "shards already done", "images in",
                                      "not picked (over --per_identity)", "no face box: centre crop", "kept"))
    if not genders:
        rows.append((f"no {IDENTITY_META}: captions say 'person'", "yes"))
    sd_data.print_summary(f"01d VGGFace2 -> {out}", rows, total["kept"] + total["shards already done"],
                          f"no image under '{root}' was kept")


if __name__ == "__main__":
    parser = arg_parser(__doc__)
    parser.add_argument("--source", default="data/vggface2", help="unpacked VGGFace2 (registration needed to "
                        "download it): <split>/<identity>/*.jpg, meta/identity_meta.csv, bb_landmark/loose_bb_*.csv")
    parser.add_argument("--split", default="train", help="train (8,631 identities) or test (500)")
    parser.add_argument("--per_identity", type=int, default=6, help="images kept per identity (6 x 8,631 = the "
                        "seed's 51,786)")
    parser.add_argument("--face_margin", type=float, default=2.0, help="crop side / longer side of the face box")
    parser.add_argument("--identities_per_shard", type=int, default=200, help="identities per output tar")
    parser.add_argument("--out", default="data/vggface_tars", help="output folder of webdataset tars")
    parser.add_argument("--resolution", type=int, default=512, help="square side of the stored JPEGs")
    parser.add_argument("--jpeg_quality", type=int, default=95, help="JPEG quality of the stored images")
    parser.add_argument("--min_image_size", type=int, default=128, help="skip images whose shorter side is smaller")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="shards converted in parallel")
    run_main(main, parser.parse_args())
