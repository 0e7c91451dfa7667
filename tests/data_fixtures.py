"""Test helpers for the data pipeline: generated images of every good and bad kind, LAION-schema
metadata, sd_data's loopback HTTP server with slow and X-Robots-Tag routes added, webdataset
tars, and the scripts run as subprocesses (tiny models: tests/tiny_models.py). Nothing here touches the outside network."""
import io
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import sd_data

REPO = Path(__file__).resolve().parents[1]

#################################################################################
#                                    Images                                     #
#################################################################################


def natural_image(w, h, seed):
    """A smooth colourful RGB image (gradients + blobs) that survives JPEG well, (h, w, 3) uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        fx, fy, ph = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 6.28)
        img[..., c] = 127 + 100 * np.sin(fx * 6.28 * x / w + ph) * np.cos(fy * 6.28 * y / h)
    return np.clip(img, 0, 255).astype(np.uint8)


def to_bytes(arr_or_img, fmt, **kw):
    im = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def good_jpeg(seed, w=96, h=80):
    return to_bytes(natural_image(w, h, seed), "JPEG", quality=95)


def bad_image_bytes(kind, seed=0):
    """Encoded bytes of each awkward or broken kind the pipeline meets in the wild."""
    rgb = natural_image(96, 80, seed)
    if kind == "html":
        return b"<!DOCTYPE html><html><body>404 not found, here is an ad</body></html>"
    if kind == "empty":
        return b""
    if kind == "truncated_jpeg":
        data = good_jpeg(seed)
        return data[: len(data) * 2 // 3]
    if kind == "cmyk_jpeg":
        return to_bytes(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    if kind == "png16":
        import cv2  # PIL cannot write 16-bit RGB; cv2 writes a 48-bit PNG from uint16 BGR
        return cv2.imencode(".png", rgb[..., ::-1].astype(np.uint16) * 257)[1].tobytes()
    if kind == "alpha_png":
        rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
        rgba[: rgb.shape[0] // 2, :, 3] = 0  # top half transparent -> white after compositing
        return to_bytes(rgba, "PNG")
    if kind == "tiny":
        return to_bytes(rgb[:1, :1], "PNG")
    if kind == "huge":
        return to_bytes(np.full((3000, 3000, 3), 128, np.uint8), "JPEG", quality=50)
    raise ValueError(kind)


#################################################################################
#                               Loopback Server                                 #
#################################################################################


class _Handler(sd_data.QuietFileHandler):
    """/slow/... sleeps past the client's timeout, /robots/... answers with an X-Robots-Tag: noai header
    (img2dataset must drop it); other missing files are 404s."""

    def do_GET(self):
        if self.path.startswith("/slow/"):
            time.sleep(self.server.slow_seconds)
            self.path = self.path[len("/slow"):]
        if self.path.startswith("/robots/"):
            self.path = self.path[len("/robots"):]
            self._robots = True
        return super().do_GET()

    def end_headers(self):
        if getattr(self, "_robots", False):
            self.send_header("X-Robots-Tag", "noai, noimageai")
        if self.path.endswith(".jpg"):  # HTML saved as .jpg is still announced as an image, as in the wild
            self.send_header("Cache-Control", "no-store")
        super().end_headers()


class LoopbackServer(sd_data.LoopbackServer):
    """sd_data's loopback server with the slow and robots routes (clients that time out on /slow/ hang up
    mid-reply; that is the point of the route)."""

    def __init__(self, folder, slow_seconds=4.0):
        super().__init__(folder, handler=_Handler)
        self.httpd.slow_seconds = slow_seconds


#################################################################################
#                           Metadata, Tars, Scripts                             #
#################################################################################


def laion_rows(n, seed=0, **overrides):
    """n LAION-like rows (canonical names) that pass the phase-1 preset; override columns by list."""
    rows = {
        "url": [f"http://example.invalid/{seed}/{i}.jpg" for i in range(n)],
        "caption": [f"a photo of a red house number {i}" for i in range(n)],
        "width": [1024] * n, "height": [768] * n,
        "similarity": [0.33] * n, "punsafe": [0.01] * n, "pwatermark": [0.05] * n,
        "aesthetic": [7.0] * n, "hash": [f"h{seed}_{i}" for i in range(n)],
    }
    rows.update(overrides)
    return rows


def write_parquet(path, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def write_tar(path, members):
    """A plain tar of {name: bytes} in the given order."""
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tf.addfile(info, io.BytesIO(data))


def run_script(script, *args, check=True, timeout=300, env=None, cwd=REPO):
    """Run a repo script as a user would (`python SCRIPT ...`, from `cwd`) and return the CompletedProcess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    proc = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def summary_value(output, label):
    """The value of row `label` in a script's printed summary table."""
    for line in output.splitlines():
        if "|" in line and line.split("|")[0].strip() == label:
            return int(line.split("|")[1].strip().replace(",", ""))
    raise AssertionError(f"no summary row '{label}' in:\n{output}")


def readme_commands(section="### Every phase's data"):
    """[(phase comment, script, [args])] of the first bash block after `section` in the README: `python SCRIPT ...`
    and `torchrun ... SCRIPT ...` lines, comments dropped; each belongs to the `# name: ...` comment above it."""
    import shlex
    text = (REPO / "README.md").read_text()
    block = text.split(section, 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands, phase = [], None
    for line in block.splitlines():
        if line.startswith("#"):
            phase = line[1:].split(":")[0].strip()
            continue
        words = shlex.split(line.split(" #")[0])
        if not words:
            continue
        at = next(i for i, w in enumerate(words) if w.endswith(".py"))
        commands.append((phase, words[at], words[at + 1:]))
    return commands


def preview_contents(path, tile_w, tile_h=sd_data.PREVIEW_TILE):
    """(keys, captions, tiles) of a preview.png: its text chunks, and each tile cut out of the grid where
    sd_data.preview_grid puts it. Checks the grid holds exactly that many cells, each with a caption drawn under
    its tile, and nothing in the slots after the last one."""
    import json
    im = Image.open(path)
    keys, captions = json.loads(im.text["keys"]), json.loads(im.text["captions"])
    grid = np.asarray(im.convert("RGB"))
    pad, strip = sd_data.PREVIEW_PAD, sd_data.PREVIEW_LINES * (sd_data.PREVIEW_FONT + 3)
    cell_w, cell_h = tile_w + 2 * pad, tile_h + 2 * pad + strip
    cols = grid.shape[1] // cell_w
    assert grid.shape == (-(-len(keys) // cols) * cell_h, cols * cell_w, 3) and len(captions) == len(keys)
    tiles = []
    for i in range(-(-len(keys) // cols) * cols):
        r, c = divmod(i, cols)
        cell = grid[r * cell_h:(r + 1) * cell_h, c * cell_w:(c + 1) * cell_w]
        if i >= len(keys):
            assert not cell.any(), f"slot {i} after the last tile is not empty"
            continue
        assert (cell[pad + tile_h:].min(-1) > 150).sum() > 20, f"no caption drawn under tile {i}"
        tiles.append(cell[pad:pad + tile_h, pad:pad + tile_w])
    return keys, captions, tiles
