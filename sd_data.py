"""Data helpers shared by the pipeline scripts (01-05, encode_latents) and their tests: LAION column
normalisation, image probe/decode/resize, the webdataset tar reader and writer, the summary table every script
prints at the end, and the loopback HTTP server through which the demo and the tests hand local images to
img2dataset. (The latent format that encode_latents writes and SD_Train reads is sd_latents.py.)

Reads top to bottom: summary table -> LAION metadata -> captions and keys -> images -> tar shards -> previews
(the preview.png grid 03, 03b, 05 and encode_latents write) -> fetching sources and the loopback server.
"""
import functools
import hashlib
import http.server
import io
import json
import math
import re
import tarfile
import threading
import urllib.request
from pathlib import Path

import numpy as np

from sd_common import UserError, atomic_path, check_writable, commit, temp_name


class BadSample(Exception):
    """A sample that cannot be used; str(e) is the reason counted in a script's summary table."""


#################################################################################
#                                Summary Table                                  #
#################################################################################

def print_summary(title, rows, usable=None, why=""):
    """Print `rows` [(label, value), ...] as a two-column table; every script ends with one. `usable`: what the
    run leaves for the next step (kept now + done before); when it is 0 the run then exits non-zero with one line
    saying `why`, so a `&&`-chained pipeline stops at the step where nothing came through."""
    rows = [(str(k), f"{v:,}" if isinstance(v, int) else str(v)) for k, v in rows]
    width = max([len(k) for k, _ in rows] + [len(title)])
    vwidth = max([len(v) for _, v in rows] + [5])
    line = "-" * (width + vwidth + 3)
    print(f"\n{title}\n{line}")
    for k, v in rows:
        print(f"{k:<{width}} | {v:>{vwidth}}")
    print(line, flush=True)
    if usable is not None and not usable:
        raise UserError(f"nothing usable came out of {title.split(' -> ')[0]}: {why} (counts above)")


def count_rows(counts, labels):
    """Summary rows: counts[label] for each label in order, then every 'skipped: <reason>' count, sorted."""
    return [(k, counts[k]) for k in labels] + [(k, v) for k, v in sorted(counts.items()) if k.startswith("skipped:")]


def run_jobs(fn, jobs, workers, desc, unit, totals):
    """fn(*job) for each job in `workers` processes, adding the Counter each returns into `totals`, with a
    progress bar that shows the running 'kept' count. A shard, part or archive is one job."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from tqdm import tqdm
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        bar = tqdm(as_completed(futures), total=len(futures), desc=desc, unit=unit)
        for fut in bar:
            totals.update(fut.result())
            bar.set_postfix(kept=totals["kept"])
    return totals


#################################################################################
#                                LAION Metadata                                 #
#################################################################################

# Canonical column -> spellings seen across LAION releases (laion2B-en, laion2B-en-aesthetic,
# laion-high-resolution, LAION-Aesthetics v2 "improved_aesthetics_*"), matched case-insensitively.
LAION_COLUMNS = {
    "url": ["url", "image_url"],
    "caption": ["text", "caption", "top_caption"],
    "width": ["width", "original_width"],
    "height": ["height", "original_height"],
    "similarity": ["similarity", "clip_similarity", "clip_sim"],
    "punsafe": ["punsafe", "prob_unsafe"],
    "pwatermark": ["pwatermark", "watermark"],
    "aesthetic": ["aesthetic", "aesthetic_score", "prediction"],
    "hash": ["hash", "sample_id"],
}
LAION_TYPES = {"url": "string", "caption": "string", "width": "int64", "height": "int64",
               "similarity": "float64", "punsafe": "float64", "pwatermark": "float64",
               "aesthetic": "float64", "hash": "string"}


def normalize_laion_columns(table):
    """Rename a LAION pyarrow table's columns to the canonical names above and cast them to one type
    (hash is int64 in some releases, string in others; string keeps both). Other columns pass through."""
    import pyarrow as pa
    names = list(table.column_names)
    lower = {n.lower(): n for n in names}
    renames = {}
    for canon, variants in LAION_COLUMNS.items():
        for v in variants:
            if v in lower and lower[v] not in renames and canon not in renames.values():
                renames[lower[v]] = canon
                break
    table = table.rename_columns([renames.get(n, n) for n in names])
    for canon, typ in LAION_TYPES.items():
        if canon in table.column_names:
            i = table.column_names.index(canon)
            table = table.set_column(i, canon, table.column(canon).cast(pa.type_for_alias(typ), safe=False))
    if "url" not in table.column_names:
        raise UserError(f"no URL column among {names}; expected one of {LAION_COLUMNS['url']}")
    return table


def file_identity(path):
    """[size, mtime_ns] of a file: what a step records about each input it finished, so that an input which
    changed since (a tar 03 was still writing, a shard downloaded again) is redone instead of taken as done."""
    st = Path(path).stat()
    return [st.st_size, st.st_mtime_ns]


def list_tars(folders):
    """The .tar files of one or several folders (phase 3 reads DiffusionDB's and JourneyDB's together); two with
    the same name would share one output name downstream, so that is an error."""
    tars = [t for d in ([folders] if isinstance(folders, (str, Path)) else folders)
            for t in list_files(d, [".tar"], "tar")]
    names = {}
    for t in tars:
        if t.name in names:
            raise UserError(f"'{names[t.name]}' and '{t}' have the same name; run them as separate --tars/--out pairs")
        names[t.name] = t
    return tars


def list_files(folder, suffixes, what):
    """Sorted files in `folder` ending with one of `suffixes`; a clear error when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{what} folder '{folder}' " + ("is a file; pass the folder that holds it" if folder.exists()
                                                        else "does not exist"))
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(tuple(suffixes)))
    if not files:
        raise UserError(f"no {'/'.join(suffixes)} files in {what} folder '{folder}'")
    return files


#################################################################################
#                               Captions and Keys                               #
#################################################################################

_FILENAME_CAPTION = re.compile(r"^\S+\.(jpe?g|png|gif|webp|bmp|tiff?)$", re.IGNORECASE)


def caption_problem(caption, min_chars=5, max_chars=1000):
    """Why a caption is unusable (None if it is fine): missing, too short/long, no letters, or a bare
    file name ("IMG_0042.JPG") as LAION alt-texts often are."""
    if caption is None:
        return "no caption"
    text = caption.strip()
    if not text:
        return "no caption"
    if len(text) < min_chars:
        return "caption too short"
    if len(text) > max_chars:
        return "caption too long"
    if not any(c.isalpha() for c in text):
        return "caption has no letters"
    if _FILENAME_CAPTION.match(text):
        return "caption is a file name"
    return None


def key_fraction(key):
    """A stable number in [0, 1) from a sample key (md5, not Python's salted hash), for splits."""
    return int(hashlib.md5(key.encode()).hexdigest()[:12], 16) / 16 ** 12


def is_validation_key(key, val_fraction):
    """Deterministic train/validation assignment: the same key lands in the same split on every machine."""
    return key_fraction(key) < val_fraction


def check_val_fraction(value):
    """--val_fraction in [0, 1): 1 or more would leave no training rows, a negative one is a typo."""
    if not 0 <= value < 1:
        raise UserError(f"--val_fraction {value} is outside [0, 1): it is the share of keys held out for validation")
    return value


#################################################################################
#                                    Images                                     #
#################################################################################

# PIL's own decompression-bomb limit (89.5 MP); larger images are skipped, not decoded.
MAX_PIXELS = 89_478_485
JPEG_EOI = b"\xff\xd9"


def probe_image(data, min_size=64, max_pixels=MAX_PIXELS):
    """Check an encoded image from its header alone (no pixel decode): returns (format, width, height) or
    raises BadSample. Catches empty files, HTML saved as .jpg, truncated JPEGs, tiny and huge images."""
    from PIL import Image
    if not data:
        raise BadSample("empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, (w, h) = im.format, im.size
    except Exception:
        raise BadSample("not an image") from None
    if fmt == "JPEG" and data.rfind(JPEG_EOI, max(0, len(data) - 4096)) < 0:
        # A JPEG ends with an EOI marker; 0xFFD9 cannot occur inside entropy-coded data (0xFF is
        # byte-stuffed), so its absence at the tail means the file was cut off. cv2 would otherwise fill
        # the missing rows with grey and return an image silently.
        raise BadSample("truncated image")
    if min(w, h) < min_size:
        raise BadSample("image too small")
    if w * h > max_pixels:
        raise BadSample("image too large")
    return fmt, w, h


def decode_image(data, min_size=64, max_pixels=MAX_PIXELS):
    """Encoded bytes -> (H, W, 3) uint8 RGB with cv2 (~3x PIL on JPEG). Grey, 16-bit, CMYK and palette
    images are converted; alpha is composited on white (as img2dataset does). Raises BadSample."""
    import cv2
    probe_image(data, min_size, max_pixels)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:  # formats cv2 lacks (GIF, palette quirks): PIL decodes them
        img = _decode_pil(data)
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise BadSample("unsupported pixel type")
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    elif img.shape[2] == 4:
        alpha = img[:, :, 3:4].astype(np.float32) / 255.0
        img = np.rint(img[:, :, :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    else:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img


def _decode_pil(data):
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = np.asarray(im.convert("RGB"))
    except Exception:
        raise BadSample("decode error") from None
    return np.ascontiguousarray(rgb[:, :, ::-1])  # BGR, like cv2, for the shared conversion below


def resize_cover_crop(img, width, height):
    """(H, W, 3) uint8 -> (height, width, 3): scaled to just cover width x height (INTER_AREA when shrinking,
    which avoids aliasing; bicubic when enlarging), then its centre."""
    import cv2
    h, w = img.shape[:2]
    scale = max(width / w, height / h)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    if (nh, nw) != (h, w):
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        img = cv2.resize(img, (nw, nh), interpolation=interp)
    top, left = (nh - height) // 2, (nw - width) // 2
    return np.ascontiguousarray(img[top:top + height, left:left + width])


def resize_center_crop(img, size):
    """(H, W, 3) uint8 -> (size, size, 3): shorter side to `size`, then the centre square."""
    return resize_cover_crop(img, size, size)


def crop_square(img, center, side):
    """The side x side square of (H, W, 3) `img` centred on (cx, cy) as nearly as the image's edges allow:
    how 01d keeps a face and 01e a person in frame where a centre crop would cut them."""
    h, w = img.shape[:2]
    side = int(max(1, min(side, h, w)))
    left = int(min(max(round(center[0] - side / 2), 0), w - side))
    top = int(min(max(round(center[1] - side / 2), 0), h - side))
    return np.ascontiguousarray(img[top:top + side, left:left + side])


def load_image_square(data, size, min_size=64, max_pixels=MAX_PIXELS):
    """Encoded bytes -> (size, size, 3) uint8 RGB, the one preprocessing used before the VAE."""
    return resize_center_crop(decode_image(data, min_size, max_pixels), size)


def load_image_bucket(data, buckets, min_size=64, max_pixels=MAX_PIXELS):
    """Encoded bytes -> (index of its aspect bucket, (h, w, 3) uint8 RGB at that bucket's size): the
    preprocessing before the VAE when aspect-ratio bucketing is on."""
    img = decode_image(data, min_size, max_pixels)
    b = nearest_bucket(img.shape[1], img.shape[0], buckets)
    return b, resize_cover_crop(img, *buckets[b])


def encode_jpeg(img, quality=95):
    """(H, W, 3) uint8 RGB -> JPEG bytes."""
    import cv2
    ok, buf = cv2.imencode(".jpg", img[:, :, ::-1], [int(cv2.IMWRITE_JPEG_QUALITY), quality])
    if not ok:
        raise BadSample("encode error")
    return buf.tobytes()


def write_square_shard(samples, dst, size, quality=95, min_size=64, counts=None):
    """[(key, image, caption, meta)] -> one webdataset tar of size x size JPEGs with .txt captions (01b-01e).
    `image` is encoded bytes (centre-cropped here) or an (H, W, 3) RGB array the caller already cropped.
    Unusable samples are counted by reason in `counts`, never raised. Returns samples written."""
    counts = counts if counts is not None else {}
    writer = TarShardWriter(dst)
    try:
        for key, data, caption, meta in samples:
            try:
                caption = clean_caption(caption)
                img = data if isinstance(data, np.ndarray) else decode_image(data, min_size)
                jpeg = encode_jpeg(resize_center_crop(img, size), quality)
            except BadSample as e:
                counts[f"skipped: {e}"] = counts.get(f"skipped: {e}", 0) + 1
                continue
            writer.write(key, jpeg, caption, meta)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return writer.count


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def needs_rgb8(data):
    """True when cv2.imdecode(IMREAD_UNCHANGED) of these bytes gives anything but 8-bit colour channels: 16-bit
    samples (PNG bit depth 16, 16-bit TIFF) or one grey channel. Read from the header alone; bytes no decoder can
    open are False (the resizer reports them). Formats cv2 decodes oddly and LAION rarely serves (TIFF, BMP,
    JPEG 2000) are always True: converting them costs little and never guesses."""
    from PIL import Image
    if data[:8] == PNG_SIGNATURE and len(data) >= 26:
        return data[24] == 16 or data[25] == 0                # IHDR: bit depth, colour type (0 = grey)
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.format not in ("JPEG", "WEBP", "GIF", "PNG") or im.mode not in ("RGB", "RGBA", "P", "CMYK")
    except Exception:
        return False


class RGB8Resizer:
    """img2dataset's Resizer behind a check of each source image, handed to its Downloader in the Resizer's place.

    img2dataset decodes with cv2.IMREAD_UNCHANGED and JPEG-encodes what it resized: a 16-bit PNG's samples are
    saturated to 255 on the way (a 16-bit grey PNG of mean 156 was stored as a white JPEG of mean 255) and a grey
    image is stored with one channel. Sources that `needs_rgb8` flags are first decoded here as every later step
    decodes (decode_image: 16 -> 8 bits, alpha on white, grey -> RGB) and handed on as an 8-bit RGB BMP (no
    compression to spend time on); the others pass untouched. What cannot be decoded is reported, with its reason,
    as the Resizer reports its own failures, so it is counted and skipped."""

    def __init__(self, resizer):
        self.resizer = resizer

    def __call__(self, img_stream, blurring_bbox_list=None):
        import cv2
        img_stream.seek(0)
        data = img_stream.read()
        img_stream.seek(0)
        if needs_rgb8(data):
            try:
                img = decode_image(data, min_size=1, max_pixels=self.resizer.max_image_area)
            except BadSample as e:
                return None, None, None, None, None, str(e)
            img_stream = io.BytesIO(cv2.imencode(".bmp", np.ascontiguousarray(img[:, :, ::-1]))[1].tobytes())
        return self.resizer(img_stream, blurring_bbox_list)


def images_to_tensor(batch):
    """(N, H, W, 3) uint8 tensor -> (N, 3, H, W) float in [-1, 1], the VAE's input range."""
    return batch.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


#################################################################################
#                             Aspect-Ratio Buckets                              #
#################################################################################

# Aspect-ratio bucketing (NovelAI 2022; SDXL, Podell et al. 2023): instead of centre-cropping every image to a
# square, train each batch on one of a few fixed sizes of about the same area, the one nearest the image's shape.
# Sides are a multiple of 8 latent pixels (64 px with SD's 8x VAE), as SD's UNet wants for its 3 halvings.
BUCKET_LATENT_MULTIPLE = 8
MAX_BUCKET_ASPECT = 2.0       # 1:2 to 2:1; a longer image is cropped to 2:1
MIN_BUCKET_AREA = 0.75        # of base^2: below it a bucket trains at visibly lower resolution than the square


def aspect_buckets(base, multiple, max_aspect=MAX_BUCKET_ASPECT, min_area=MIN_BUCKET_AREA):
    """The (width, height) buckets of a base resolution, sorted by aspect (portrait first): sides multiples of
    `multiple`, area from min_area x base^2 up to base^2, aspect within 1/max_aspect..max_aspect, and for each
    aspect only the largest such size. At base 512, multiple 64: 13 buckets from 320x640 to 640x320."""
    if base < 1 or multiple < 1:
        raise UserError(f"bucket base {base} and multiple {multiple} must be positive")
    sides = range(multiple, int(base * max_aspect ** 0.5) + multiple, multiple)
    best = {}
    for w in sides:
        for h in sides:
            if min_area * base * base <= w * h <= base * base and 1 / max_aspect <= w / h <= max_aspect:
                aspect = w / h                              # equal ratios give equal floats (exact rounding)
                if w * h > best.get(aspect, (0, 0))[0] * best.get(aspect, (0, 0))[1]:
                    best[aspect] = (w, h)
    if not best:
        raise UserError(f"no {multiple}-px multiple sizes fit a base of {base} px (area {min_area:g}-1 x "
                        f"{base}^2, aspect 1:{max_aspect:g} to {max_aspect:g}:1); raise the base resolution")
    return [best[a] for a in sorted(best)]


def nearest_bucket(width, height, buckets):
    """Index of the bucket whose aspect is nearest width / height (in log ratio, so 2:1 and 1:2 are equally far
    from 1:1); a tie goes to the larger bucket, then to the first."""
    r = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: (round(abs(math.log(buckets[i][0] / buckets[i][1]) - r), 12),
                                                   -buckets[i][0] * buckets[i][1], i))   # round: log(2/3) != -log(3/2)


def area_kept(width, height, bucket_width, bucket_height):
    """Share of an image's area that survives resize-to-cover and centre crop into a bucket (1 = no crop)."""
    r, b = width / height, bucket_width / bucket_height
    return min(r / b, b / r)


#################################################################################
#                                  Tar Shards                                   #
#################################################################################

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def iter_tar_samples(source, counts=None):
    """Yield (key, {ext: bytes}) samples from a webdataset tar (path or bytes), grouped by webdataset.
    A truncated or corrupt tar yields the complete samples before the damage and adds 1 to
    counts['truncated tar'] instead of raising."""
    from webdataset.tariterators import group_by_keys
    fileobj = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
    damage = {}
    try:
        pending = None
        for sample in group_by_keys(_tar_members(fileobj, damage)):
            if pending is not None:
                yield pending
            pending = (sample["__key__"].split("/")[-1], {k: v for k, v in sample.items() if not k.startswith("__")})
        # group_by_keys yields a sample once the next one starts, so only the last one can be incomplete:
        # it is when the damaged member was its own, or when a header broke (whose member is unknown)
        if pending is not None and not (damage and damage["key"] in (None, pending[0])):
            yield pending
    finally:
        fileobj.close()
    if damage and counts is not None:
        counts["truncated tar"] = counts.get("truncated tar", 0) + 1


def _tar_members(fileobj, damage):
    """{fname, data} dicts of the regular files of a tar stream, as webdataset's group_by_keys takes them;
    stops at the first unreadable header or member, noting its sample key (None for a header) in `damage`."""
    from webdataset.tariterators import base_plus_ext
    url = getattr(fileobj, "name", "<bytes>")
    compressed = fileobj.read(4).startswith((b"\x1f\x8b", b"BZh", b"\xfd7zX"))
    fileobj.seek(0)
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as stream:
            for info in stream:
                if not info.isreg():
                    continue
                try:
                    data = stream.extractfile(info).read()
                except (tarfile.TarError, EOFError, OSError):
                    damage["key"] = base_plus_ext(info.name)[0]
                    return
                yield {"fname": info.name, "data": data, "__url__": url}
            # tarfile ends quietly at a missing or cut header; an intact tar ends in a zero block there
            if not compressed:
                fileobj.seek(stream.offset)
                if fileobj.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
                    damage.setdefault("key", None)
    except (tarfile.TarError, EOFError, OSError):
        damage.setdefault("key", None)


def sample_image(sample):
    """The image bytes of a grouped sample (first of jpg/jpeg/png/webp), or raise BadSample."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise BadSample("no image in sample")


def sample_caption(sample):
    """The caption of a grouped sample (.txt), or None."""
    data = sample.get("txt")
    return data.decode("utf-8", errors="replace") if data is not None else None


def clean_caption(caption):
    """The caption stripped, or BadSample when there is none: an image without words teaches nothing."""
    if caption is None or not str(caption).strip():
        raise BadSample("no caption")
    return str(caption).strip()


def usable_sample(sample, min_size=64):
    """(image bytes, caption) of a tar sample every later step can use, else BadSample with the reason: the
    header-only probe (no pixel decode) that encode_latents runs before decoding, and a caption, so 03b, 04 and
    encode_latents drop the same samples."""
    image = sample_image(sample)
    probe_image(image, min_size=min_size)
    return image, clean_caption(sample_caption(sample))


class TarShardWriter:
    """Write samples into a webdataset tar under a temporary name; `close()` renames it into place, so
    a shard either exists complete or not at all (the resume test of 01b/01c relies on it)."""

    def __init__(self, path):
        import webdataset as wds
        self.path = Path(path)
        self.tmp = temp_name(self.path)
        self.writer = wds.TarWriter(str(self.tmp))
        self.count = 0

    def write(self, key, jpeg, caption, meta=None):
        sample = {"__key__": key, "jpg": jpeg, "txt": caption}
        if meta is not None:
            sample["json"] = json.dumps(meta).encode()
        self.writer.write(sample)
        self.count += 1

    def close(self):
        self.writer.close()
        commit(self.tmp, self.path)

    def abort(self):
        self.writer.close()
        self.tmp.unlink(missing_ok=True)


#################################################################################
#                                   Previews                                    #
#################################################################################
# A look at the data before GPU-days go into it: 03, 03b, 05 and encode_latents each write OUT/preview.png, a grid
# of a few dozen samples with their captions under them. The samples are those whose keys rank first under a
# seeded hash, so a re-run shows the same ones, whatever order the shards are read in.

PREVIEW_NAME = "preview.png"
PREVIEW_TILE = 256          # px: every image is shown as this square (the centre crop the VAE sees, resized)
PREVIEW_SHARDS = 4          # a tar preview reads at most this many shards (a seeded pick), not the whole data set
PREVIEW_LINES = 3           # caption lines under a tile; a longer caption ends in "..."
PREVIEW_PAD, PREVIEW_FONT = 4, 14                  # px around each cell; caption font size (a line is 3 px more)


def add_preview_args(parser):
    parser.add_argument("--preview", type=int, default=36,
                        help=f"write {PREVIEW_NAME} into the output folder: a grid of N random samples with their "
                             "captions (0: no preview)")
    parser.add_argument("--preview_seed", type=int, default=0,
                        help="which samples the preview shows (a re-run with the same seed shows the same ones)")


def check_preview(n):
    """--preview is checked before any work, not after hours of it."""
    if n < 0:
        raise UserError(f"--preview must be 0 (no preview) or a number of samples, got {n}")


def preview_rank(key, seed):
    """The order in which a preview takes samples: a seeded hash of the key (stable across machines and runs)."""
    return key_fraction(f"{seed}/{key}")


def preview_samples(tars, n, seed, keys=None, min_size=1):
    """The n (key, image bytes, caption) tar samples a preview shows: in up to PREVIEW_SHARDS shards picked by
    `seed`, the usable ones (and in `keys`, when given) whose keys rank first."""
    import heapq
    picked = np.random.default_rng(seed).choice(len(tars), min(len(tars), PREVIEW_SHARDS), replace=False)
    best = []                                        # a max-heap on rank of the n best so far: (-rank, key, ...)
    for i in sorted(picked):
        for key, sample in iter_tar_samples(tars[i]):
            rank = preview_rank(key, seed)
            if (keys is not None and key not in keys) or (len(best) == n and rank >= -best[0][0]):
                continue
            try:
                image, caption = usable_sample(sample, min_size)
                decode_image(image, min_size)        # a broken body can hide behind a good header
            except Exception:                        # noqa: BLE001 - BadSample, or a codec crash on one odd file
                continue
            (heapq.heappush if len(best) < n else heapq.heapreplace)(best, (-rank, key, image, caption))
    return [(key, image, caption) for _, key, image, caption in sorted(best, reverse=True)]


def _wrap(draw, text, font, width, lines):
    """`text` greedily wrapped into at most `lines` lines of `width` px; what does not fit ends in '...'."""
    out, words = [], text.split()
    while words and len(out) < lines:
        line = words.pop(0)
        while words and draw.textlength(f"{line} {words[0]}", font=font) <= width:
            line += " " + words.pop(0)
        out.append(line)
    for i, line in enumerate(out):                   # a word wider than the tile, or words left over at the end
        if draw.textlength(line, font=font) > width or (words and i == len(out) - 1):
            while line and draw.textlength(line + "...", font=font) > width:
                line = line[:-1]
            out[i] = line + "..."
    return out


def preview_grid(tiles, captions, pad=PREVIEW_PAD, font_size=PREVIEW_FONT):
    """Tiles (equal (h, w, 3) uint8 arrays) each with its caption under it, laid out as a near-square sheet by
    SD_Model.make_grid: (H, W, 3) uint8."""
    from PIL import Image, ImageDraw, ImageFont
    from SD_Model import make_grid
    font = ImageFont.load_default(size=font_size)
    line_h = font_size + 3
    h, w = tiles[0].shape[:2]
    cells = []
    for tile, caption in zip(tiles, captions):
        cell = Image.new("RGB", (w + 2 * pad, h + 2 * pad + PREVIEW_LINES * line_h), (24, 24, 24))
        cell.paste(Image.fromarray(tile), (pad, pad))
        draw = ImageDraw.Draw(cell)
        for i, line in enumerate(_wrap(draw, " ".join(str(caption).split()), font, w, PREVIEW_LINES)):
            draw.text((pad, pad + h + 2 + i * line_h), line, fill=(235, 235, 235), font=font)
        cells.append(np.asarray(cell))
    # columns for a near-square sheet: of the counts around the square one, the fewest empty cells, then squarest
    n, (cell_h, cell_w) = len(cells), cells[0].shape[:2]
    square = math.sqrt(n * cell_h / cell_w)
    cols = min(range(max(1, math.floor(square)), math.ceil(square) + 2),
               key=lambda c: (-n % c, abs(math.log(c * cell_w / (math.ceil(n / c) * cell_h)))))
    return make_grid(np.stack(cells), cols=cols)


def write_preview(path, tiles, captions, keys):
    """preview_grid as a PNG, atomically, with the keys and captions in its text chunks (for tools and tests).
    Returns the path, or None when there was nothing to show."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo
    if not tiles:
        print(f"preview: no usable sample to show; {path} not written", flush=True)
        return None
    info = PngInfo()
    info.add_text("keys", json.dumps(list(keys)))
    info.add_text("captions", json.dumps(list(captions)))
    with atomic_path(path) as tmp:
        Image.fromarray(preview_grid(tiles, captions)).save(tmp, format="PNG", pnginfo=info)
    print(f"preview: {path} ({len(tiles)} samples)", flush=True)
    return Path(path)


def write_tar_preview(out, tars, n, seed, keys=None, min_size=1):
    """OUT/preview.png of n samples of `tars` (03: what was downloaded; 05: the rows of the dataset)."""
    samples = preview_samples(tars, n, seed, keys, min_size)
    tiles = [load_image_square(image, PREVIEW_TILE, min_size=1) for _, image, _ in samples]
    return write_preview(Path(out) / PREVIEW_NAME, tiles, [c for _, _, c in samples], [k for k, _, _ in samples])


#################################################################################
#                                Fetching Sources                               #
#################################################################################

def is_url(source):
    return str(source).startswith(("http://", "https://"))


def fetch(source, rel, cache_dir, timeout=60, retries=3):
    """Path of `rel` under `source`, a local folder or a base URL. URLs are downloaded once into
    `cache_dir` (through a temp name renamed when complete, so a re-run skips finished files and redoes
    interrupted ones). Returns None for a 404 (a part that does not exist)."""
    if not is_url(source):
        path = Path(source) / rel
        return path if path.exists() else None
    dest = Path(cache_dir) / rel
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    url = f"{str(source).rstrip('/')}/{rel}"
    for attempt in range(retries + 1):
        try:
            with atomic_path(dest, fsync=False) as part, urllib.request.urlopen(url, timeout=timeout) as r, \
                    open(part, "wb") as f:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
            return dest
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            if attempt == retries:
                raise UserError(f"download of {url} failed: HTTP {e.code}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            if attempt == retries:
                raise UserError(f"download of {url} failed: {e}") from None
    return None


class QuietFileHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder without a log line per request."""

    def log_message(self, *args):
        pass


class LoopbackServer:
    """A threaded HTTP server on 127.0.0.1 serving `folder` (port 0: any free one; `.url` says which), used as a
    context manager: how the demo hands its generated images to img2dataset, and the tests their awkward ones
    (`handler`: a QuietFileHandler subclass with extra routes). Clients that hang up mid-reply are not errors."""

    def __init__(self, folder, port=0, handler=QuietFileHandler):
        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass

        self.httpd = Server(("127.0.0.1", port), functools.partial(handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def parse_ranges(spec, flag="--parts"):
    """'0-3,7' -> [0, 1, 2, 3, 7]; anything else (letters, a range that runs backwards, nothing) is one line."""
    out = []
    for part in str(spec).split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                if b < a:
                    raise ValueError
                out.extend(range(a, b + 1))
            elif part:
                out.append(int(part))
        except ValueError:
            raise UserError(f"{flag} '{spec}': '{part}' is not a number or a range like 1-500") from None
    if not out:
        raise UserError(f"{flag} '{spec}' names nothing to do; pass numbers or ranges like 1-500,7")
    return out


def pending_parts(source, spec, flag, out, shard_name, what):
    """The numbered parts of a source (DiffusionDB part zips, JourneyDB archives) still to convert: checks the
    source and `spec`, makes `out`, and returns (parts, parts whose shard `out / shard_name(n)` is not there
    yet, the summary's first two counts). A re-run converts only what is missing."""
    from collections import Counter
    if not str(source).strip() or not is_url(source) and not Path(source).is_dir():
        raise UserError(f"--source '{source}' is neither a URL nor an existing folder")
    parts = parse_ranges(spec, flag)
    check_writable(out, "--out")
    todo = [n for n in parts if not (Path(out) / shard_name(n)).exists()]
    return parts, todo, Counter({what: len(parts), f"{what} already done": len(parts) - len(todo)})
