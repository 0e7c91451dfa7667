"""The demo's world, in one place: colored circles, squares and triangles on plain backgrounds, their captions
("a red circle on a gray background"), a seeded generator of images + LAION-schema metadata, and the fixed-rule
classifier behind the prompt-following score.

Reads top to bottom: palette and vocabulary -> scenes and rendering -> the data set on disk -> classifier and score.
"""
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#################################################################################
#                            Palette and Vocabulary                             #
#################################################################################

# Saturated colors, each far (>= 100 in RGB) from every background and >= 80 from each other, so the
# nearest-palette rule still holds on a VAE's slightly blurred, shifted colors.
COLORS = {"red": (220, 40, 40), "orange": (245, 145, 30), "yellow": (240, 225, 40), "green": (40, 170, 60),
          "cyan": (40, 200, 220), "blue": (40, 70, 220), "purple": (140, 50, 190), "pink": (245, 125, 200)}
BACKGROUNDS = {"white": (240, 240, 240), "gray": (128, 128, 128), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
WORDS = ("a", "on", "background", *COLORS, *SHAPES, *BACKGROUNDS)   # every word of every caption

CAPTION = "a {color} {shape} on a {background} background"
_CAPTION_RE = re.compile(r"^a (\w+) (\w+) on a (\w+) background$")


def caption(color, shape, background):
    return CAPTION.format(color=color, shape=shape, background=background)


def parse_caption(text):
    """'a red circle on a gray background' -> ('red', 'circle', 'gray'); ValueError for anything else."""
    m = _CAPTION_RE.match(text.strip())
    if not m or m[1] not in COLORS or m[2] not in SHAPES or m[3] not in BACKGROUNDS:
        raise ValueError(f"not a demo caption: {text!r}")
    return m[1], m[2], m[3]


def prompt_grid():
    """Every color x shape once: the 24 prompts of the score. The background of color i, shape j is (i + j) mod 3,
    so every shape and nearly every color meets every background (never shape = background, a confound)."""
    bgs = list(BACKGROUNDS)
    return [caption(c, s, bgs[(i + j) % len(bgs)]) for i, c in enumerate(COLORS) for j, s in enumerate(SHAPES)]


#################################################################################
#                              Scenes and Rendering                             #
#################################################################################

@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    background: str
    box: tuple            # (x0, y0, x1, y1) of the shape in pixels, floats

    @property
    def caption(self):
        return caption(self.color, self.shape, self.background)


def image_sizes(n, size):
    """(width, height) of each of n images: `size` x `size`, or with a list of (width, height) image i takes entry
    i mod its length (the bucketed demo alternates 96x64 and 64x96)."""
    sizes = [(size, size)] if isinstance(size, int) else [tuple(s) for s in size]
    return [sizes[i % len(sizes)] for i in range(n)]


# A shape's side, as a fraction of the image's shorter side. Not smaller: through the demo VAE (4x) a triangle of
# 19 px (0.3 of 64) loses its apex, and the fixed rule read 20-25% of reconstructions of sides 0.30-0.35 wrong
# (mostly triangle -> circle), against 0-6% from 0.5 up.
MIN_SIDE, MAX_SIDE = 0.45, 0.7


def random_scenes(n, seed, size, min_side=MIN_SIDE, max_side=MAX_SIDE, margin=2):
    """n scenes with uniform colors, shapes and backgrounds, a side of min_side..max_side of the image's shorter
    side and a random position at least `margin` pixels inside, from one seeded generator (same seed, same
    scenes). `size`: as image_sizes takes it."""
    rng = np.random.default_rng(seed)
    scenes = []
    for w, h in image_sizes(n, size):
        side = rng.uniform(min_side, max_side) * min(w, h)
        x0, y0 = rng.uniform(margin, [w - margin - side, h - margin - side])   # square: the draws of size=2
        scenes.append(Scene(rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(BACKGROUNDS)),
                            (x0, y0, x0 + side, y0 + side)))
    return scenes


def render(scene, width, height=None, supersample=4):
    """(height, width, 3) uint8 (height defaults to width): drawn `supersample` times larger, then box-filtered
    down (anti-aliased edges)."""
    from PIL import Image, ImageDraw
    s, height = supersample, height or width
    img = Image.new("RGB", (width * s, height * s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = (v * s for v in scene.box)
    fill = COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:                 # upright isosceles: fills half of its bounding box
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    return np.asarray(img.resize((width, height), Image.BOX))


#################################################################################
#                             The Data Set on Disk                              #
#################################################################################

def write_dataset(image_dir, meta_file, n, seed, size, base_url):
    """n PNGs (`size`: as image_sizes takes it) in image_dir and one LAION-schema parquet (url, caption, width,
    height, similarity, aesthetic, punsafe, pwatermark, hash) whose URLs point at base_url/<file>; the scores are a
    clean data set's, so the quality filters of 02 keep every row. Returns the scenes."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    image_dir, meta_file = Path(image_dir), Path(meta_file)
    image_dir.mkdir(parents=True, exist_ok=True)
    meta_file.parent.mkdir(parents=True, exist_ok=True)
    scenes, sizes = random_scenes(n, seed, size), image_sizes(n, size)
    names = [f"{i:06d}.png" for i in range(n)]
    for name, scene, (w, h) in zip(names, scenes, sizes):
        Image.fromarray(render(scene, w, h)).save(image_dir / name)
    pq.write_table(pa.table({
        "url": [f"{base_url}/{name}" for name in names], "caption": [s.caption for s in scenes],
        "width": [w for w, _ in sizes], "height": [h for _, h in sizes], "similarity": [0.35] * n,
        "aesthetic": [7.0] * n, "punsafe": [0.0] * n, "pwatermark": [0.0] * n,
        "hash": [f"demo-{seed}-{i}" for i in range(n)]}), meta_file)
    return scenes


#################################################################################
#                             Classifier and Score                              #
#################################################################################

FOREGROUND_DISTANCE = 60.0    # RGB distance from the background estimate that marks a foreground pixel
MIN_AREA = 16                 # pixels; a smaller largest blob counts as no shape
# Fill of the blob's bounding box: square 1, circle pi/4 ~ 0.785, triangle 0.5; cut halfway between.
SQUARE_MIN_FILL = (1 + np.pi / 4) / 2
CIRCLE_MIN_FILL = (np.pi / 4 + 0.5) / 2


def classify(image):
    """(H, W, 3) uint8 -> (color, shape), or (None, None) when no shape stands out. The background is the
    median of a 2-pixel frame; the shape is the largest connected blob of pixels far from it; its color is
    the majority of its interior pixels' nearest palette colors, its shape read from its bounding-box fill."""
    import cv2
    img = image.astype(np.float32)
    frame = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
                            img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    mask = np.linalg.norm(img - np.median(frame, axis=0), axis=-1) > FOREGROUND_DISTANCE   # (H, W)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n < 2:
        return None, None
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    _, _, w, h, area = stats[k]
    if area < MIN_AREA:
        return None, None
    blob = labels == k
    fill = area / (w * h)
    shape = "square" if fill >= SQUARE_MIN_FILL else "circle" if fill >= CIRCLE_MIN_FILL else "triangle"
    # interior only: anti-aliased edges blend into the background (red on white passes through pink)
    core = cv2.erode(blob.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    pixels = img[core if core.any() else blob]                                          # (P, 3)
    palette = np.array(list(COLORS.values()), np.float32)                               # (8, 3)
    nearest = np.argmin(((pixels[:, None] - palette[None]) ** 2).sum(-1), axis=1)      # (P,)
    return list(COLORS)[np.bincount(nearest, minlength=len(COLORS)).argmax()], shape


def score(images, prompts):
    """(color accuracy, shape accuracy) of images against the demo prompts they were drawn from."""
    if len(images) != len(prompts) or not len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    hits = np.zeros(2)
    for image, prompt in zip(images, prompts):
        color, shape, _ = parse_caption(prompt)
        got = classify(np.asarray(image))
        hits += (got[0] == color, got[1] == shape)
    return tuple(float(h) / len(prompts) for h in hits)
