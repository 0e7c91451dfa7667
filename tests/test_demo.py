"""The demo's world (demo/shapes.py): the classifier behind the score reads the generated ground truth
exactly, the captions and vocabulary agree, generation is a pure function of the seed, and the metadata
passes 02_filter_metadata.py with the flags the demo runs it with."""
import argparse
import itertools
import subprocess
import sys

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from data_fixtures import summary_value
from demo import run, shapes
from sd_common import UserError
from tiny_models import save_tiny_tokenizer

SIZE = 64


@pytest.fixture(scope="module")
def scenes():
    return shapes.random_scenes(600, seed=0, size=SIZE)


def test_classifier_reads_clean_images_exactly(scenes):
    images = [shapes.render(s, SIZE) for s in scenes]
    assert [shapes.classify(im) for im in images] == [(s.color, s.shape) for s in scenes]
    assert shapes.score(images, [s.caption for s in scenes]) == (1.0, 1.0)


def test_classifier_survives_blur_and_jpeg(scenes):
    """What a VAE round trip does to an image, roughly: soft edges and compression noise."""
    hits = np.zeros(2)
    for s in scenes:
        img = cv2.GaussianBlur(shapes.render(s, SIZE), (5, 5), 1.0)
        img = cv2.imdecode(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 75])[1], cv2.IMREAD_UNCHANGED)
        hits += np.equal(shapes.classify(img), (s.color, s.shape))
    assert (hits / len(scenes) >= 0.98).all(), hits / len(scenes)


def test_classifier_on_blank_and_wrong_images():
    blank = np.full((SIZE, SIZE, 3), 128, np.uint8)
    assert shapes.classify(blank) == (None, None)
    red_square = shapes.render(shapes.Scene("red", "square", "white", (10, 10, 40, 40)), SIZE)
    assert shapes.score([blank, red_square, red_square], ["a red square on a gray background",
                                                          "a red square on a white background",
                                                          "a blue circle on a white background"]) == (1 / 3, 1 / 3)


def test_palette_is_separable():
    colors = {k: np.array(v, float) for k, v in shapes.COLORS.items()}
    backgrounds = [np.array(v, float) for v in shapes.BACKGROUNDS.values()]
    assert len(colors) >= 8 and len(shapes.SHAPES) == 3
    assert min(np.linalg.norm(c - b) for c in colors.values() for b in backgrounds) >= 100
    assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(colors.values(), 2)) >= 80


def color_word_cosines(clip_dir):
    """Mean cosine between the 8 colors' CLIP outputs at the color word's position, over shape x background."""
    import torch
    from SD_Model import FrozenTextEncoder
    text = FrozenTextEncoder(clip_dir)
    cosines = []
    for shape, background in itertools.product(shapes.SHAPES, shapes.BACKGROUNDS):
        context = text.encode([shapes.caption(c, shape, background) for c in shapes.COLORS])[:, 2]   # BOS, "a", color
        v = torch.nn.functional.normalize(context, dim=-1)
        cosines.append((v @ v.T)[~torch.eye(len(v), dtype=torch.bool)].mean().item())
    return float(np.mean(cosines))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_demo_clip_tells_the_colors_apart(tmp_path, seed):
    from tiny_models import save_tiny_clip
    assert color_word_cosines(run.save_demo_clip(tmp_path / "demo", seed)) < 0.5
    # CLIP's own init (token embeddings std 0.02) leaves them nearly alike: what the demo's word_std is for
    plain = save_tiny_clip(tmp_path / "plain", hidden=64, layers=2, heads=2, words=shapes.WORDS, seed=seed)
    assert color_word_cosines(plain) > 0.75


def test_captions_and_vocabulary(scenes, tmp_path):
    for s in scenes:
        assert shapes.parse_caption(s.caption) == (s.color, s.shape, s.background)
    assert {(s.color, s.shape, s.background) for s in scenes} == \
        set(itertools.product(shapes.COLORS, shapes.SHAPES, shapes.BACKGROUNDS))   # 600 draws cover all 72
    grid = shapes.prompt_grid()
    assert len(grid) == len(set(grid)) == 24
    assert {shapes.parse_caption(p)[:2] for p in grid} == set(itertools.product(shapes.COLORS, shapes.SHAPES))
    assert {shapes.parse_caption(p)[1:] for p in grid} == set(itertools.product(shapes.SHAPES, shapes.BACKGROUNDS))
    # every caption word is one token of the demo's tokenizer: BOS + 7 words + EOS
    tok = save_tiny_tokenizer(tmp_path / "tok", shapes.WORDS)
    for p in grid:
        ids = tok(p).input_ids
        assert len(ids) == 9 and tok.unk_token_id not in ids[1:-1]
    with pytest.raises(ValueError):
        shapes.parse_caption("a red hexagon on a gray background")


def test_generation_is_a_function_of_the_seed():
    a, b, c = (shapes.random_scenes(50, seed, SIZE) for seed in (3, 3, 4))
    assert a == b and a != c
    assert all(np.array_equal(shapes.render(x, SIZE), shapes.render(y, SIZE)) for x, y in zip(a, b))
    for s in a:                                         # inside the image, as drawn
        x0, y0, x1, y1 = s.box
        assert 2 <= x0 < x1 <= SIZE - 2 and 2 <= y0 < y1 <= SIZE - 2 and x1 - x0 == pytest.approx(y1 - y0)


def test_non_square_scenes_fit_their_images_and_classify_exactly():
    """The bucketed demo's world: 96x64 and 64x96 images in turn, each shape inside its own image and read back
    exactly by the same classifier; square scenes are the draws they always were."""
    sizes = [(96, 64), (64, 96)]
    scenes = shapes.random_scenes(300, seed=0, size=sizes)
    for (w, h), s in zip(shapes.image_sizes(300, sizes), scenes):
        x0, y0, x1, y1 = s.box
        assert 2 <= x0 < x1 <= w - 2 and 2 <= y0 < y1 <= h - 2 and shapes.MIN_SIDE * 64 <= x1 - x0 <= shapes.MAX_SIDE * 64
    images = [shapes.render(s, w, h) for (w, h), s in zip(shapes.image_sizes(300, sizes), scenes)]
    assert images[0].shape == (64, 96, 3) and images[1].shape == (96, 64, 3)
    assert shapes.score(images, [s.caption for s in scenes]) == (1.0, 1.0)
    rng = np.random.default_rng(3)                       # the square generator before it took (width, height)
    side = rng.uniform(shapes.MIN_SIDE, shapes.MAX_SIDE) * SIZE
    x0, y0 = rng.uniform(2, SIZE - 2 - side, size=2)
    assert shapes.random_scenes(1, 3, SIZE)[0].box == (x0, y0, x0 + side, y0 + side)


def test_bucketed_demo_commands_and_phase_agree():
    """--bucketed: the base whose only buckets are 96x64 and 64x96 is the demo_bucketed phase's resolution; 03 and
    encode_latents bucket, the run trains that phase, and the grid and the score are drawn at both aspects."""
    import SD_Train
    assert run.bucketed_sizes(64) == ([(96, 64), (64, 96)], 80)
    phase = SD_Train.load_phase("demo_bucketed")
    assert phase["buckets"] is True and phase["resolution"] == 80
    args = argparse.Namespace(resolution=SIZE, vae_steps=1, nproc=1, n=1, steps=1, guidance_scale=1.0, seed=0,
                              prediction_type="epsilon", loss_weighting=None, score_steps=None, bucketed=True,
                              max_steps=0, sampler=None)
    steps = {t: [str(a) for a in argv] for t, argv in run.script_steps(args, run.folders("data/demo_bucketed"))}
    assert "--buckets" in steps["03 download images (img2dataset)"] and "--buckets" in steps["encode latents"]
    train = steps["train the UNet (torchrun, gloo)"]
    assert train[train.index("--phase") + 1] == "demo_bucketed" and train[train.index("--resolution") + 1] == "80"
    assert [t for t in steps if t.startswith(("sample", "evaluate"))] == [
        "sample the prompt grid 96x64", "sample the prompt grid 64x96",
        "evaluate.py: prompt-following score 96x64, 1 steps", "evaluate.py: prompt-following score 64x96, 1 steps"]
    score = steps["evaluate.py: prompt-following score 64x96, 1 steps"]
    assert score[score.index("--width") + 1:score.index("--width") + 4] == ["64", "--height", "96"]
    assert score[score.index("--out") + 1] == "data/demo_bucketed/eval/64x96/steps_1"
    assert score[score.index("--sampler") + 1] == "dpmpp_2m"
    phase_data = phase["datasets"][0]
    assert [phase_data["latents"], phase_data["captions"], phase["text_encoder"]] == \
        [train[train.index("--datasets") + 1].split(":")[0], train[train.index("--datasets") + 1].split(":")[1],
         train[train.index("--text_encoder") + 1]]


def test_metadata_passes_02_as_the_demo_runs_it(tmp_path):
    d = run.folders(tmp_path)
    scenes = shapes.write_dataset(d.www, d.meta / "part-00000.parquet", 40, 0, SIZE, "http://127.0.0.1:9")
    assert sorted(p.name for p in d.www.iterdir()) == [f"{i:06d}.png" for i in range(40)]
    args = argparse.Namespace(resolution=SIZE, vae_steps=1, nproc=1, n=1, steps=1, guidance_scale=1.0, seed=0,
                              prediction_type="flow", loss_weighting="none", score_steps=[2, 8], bucketed=False,
                              max_steps=0, sampler=None)
    steps = dict(run.script_steps(args, d))
    argv = [str(a) for a in steps["02 filter metadata"]]
    out = subprocess.run(argv, cwd=run.REPO, capture_output=True, text=True, check=True).stdout
    assert summary_value(out, "rows in") == summary_value(out, "kept") == 40
    kept = pq.read_table(d.filtered / "part-00000.parquet").to_pydict()
    assert kept["caption"] == [s.caption for s in scenes]
    assert kept["url"] == [f"http://127.0.0.1:9/{i:06d}.png" for i in range(40)]
    # another objective: its own run folder on the same data, one score per step count
    flow = run.folders(tmp_path, "flow")
    assert flow.latents == d.latents and flow.run == tmp_path / "run_flow" and d.run == tmp_path / "run"
    train = " ".join(map(str, steps["train the UNet (torchrun, gloo)"]))
    assert train.endswith(f"--out_dir {d.run} --prediction_type flow --loss_weighting none")
    assert [t for t in steps if t.startswith("evaluate.py")][-1] == "evaluate.py: prompt-following score, 8 steps"
    score = steps["evaluate.py: prompt-following score, 8 steps"]
    assert score[score.index("--sampler") + 1] == "flow_euler"                 # dpmpp_2m cannot sample a flow model


@pytest.mark.slow
def test_demo_vae_trains_and_loads_like_sd_vae(tmp_path):
    """demo/train_vae.py on a tar of shapes: a save_pretrained folder that FrozenVAE loads as it loads
    sd-vae-ft-mse, 4x downsampling, its scaling factor making the encoded latents unit-std (as 0.18215 does
    for SD's), and a re-run that keeps the finished VAE."""
    import io
    from PIL import Image
    import sd_data
    import SD_Model
    (tmp_path / "tars").mkdir()
    writer = sd_data.TarShardWriter(tmp_path / "tars" / "00000.tar")
    scenes = shapes.random_scenes(64, seed=1, size=SIZE)
    for i, s in enumerate(scenes):
        buf = io.BytesIO()
        Image.fromarray(shapes.render(s, SIZE)).save(buf, format="JPEG", quality=95)
        writer.write(f"{i:05d}", buf.getvalue(), s.caption)
    writer.close()
    argv = [sys.executable, "-m", "demo.train_vae", "--tars", tmp_path / "tars", "--out", tmp_path / "vae",
            "--steps", 20, "--batch_size", 8, "--stat_images", 64]
    out = subprocess.run([str(a) for a in argv], cwd=run.REPO, capture_output=True, text=True, check=True).stdout
    assert summary_value(out, "images") == 64 and summary_value(out, "steps") == 20
    vae = SD_Model.FrozenVAE(tmp_path / "vae")
    assert vae.factor == 4
    from demo.train_vae import load_images
    images, skipped = load_images([tmp_path / "tars" / "00000.tar"], SIZE, 32)   # what the VAE measured on
    assert skipped == 0
    x = sd_data.images_to_tensor(images)
    latents = vae.encode(x)
    assert latents.shape == (64, 4, SIZE // 4, SIZE // 4)
    assert latents.std().item() == pytest.approx(1.0, rel=1e-3)
    assert vae.decode(latents).shape == x.shape
    again = subprocess.run([str(a) for a in argv], cwd=run.REPO, capture_output=True, text=True, check=True).stdout
    assert "already trained" in again


@pytest.mark.parametrize("flag,value,message", [("steps", -1, "--steps must be at least 1, got -1"),
                                                ("batch_size", 0, "--batch_size must be at least 1, got 0"),
                                                ("warmup_steps", -2, "--warmup_steps must be 0 or more, got -2"),
                                                ("out", "/proc/no_such/vae", "--out '/proc/no_such' is not writable")])
def test_demo_vae_refuses_a_nonsense_count_before_reading_anything(tmp_path, flag, value, message):
    from demo import train_vae
    args = argparse.Namespace(steps=600, batch_size=8, warmup_steps=50, stat_images=512, log_every=25, resolution=64,
                              out=str(tmp_path / "vae"), tars=str(tmp_path / "no_such_tars"))
    setattr(args, flag, value)
    with pytest.raises(UserError, match=message):
        train_vae.main(args)


def test_demo_vae_names_a_file_passed_as_the_tar_folder(tmp_path):
    from demo import train_vae
    (tmp_path / "00000.tar").write_bytes(b"")
    args = argparse.Namespace(steps=600, batch_size=8, warmup_steps=50, stat_images=512, log_every=25, resolution=64,
                              seed=0, out=str(tmp_path / "vae"), tars=str(tmp_path / "00000.tar"))
    with pytest.raises(UserError, match="tar folder '.*00000.tar' is a file; pass the folder that holds it"):
        train_vae.main(args)


@pytest.mark.parametrize("flag,value,message", [("images", 0, "--images must be at least 1, got 0"),
                                                ("nproc", -1, "--nproc must be at least 1, got -1"),
                                                ("score_steps", [10, 0], r"--score_steps must be at least 1, got \[10, 0\]"),
                                                ("seed", -1, "--seed and --max_steps must be 0 or more"),
                                                ("sampler", "flow_euler", "--sampler flow_euler cannot sample a model "
                                                                          "trained with --prediction_type epsilon")])
def test_demo_refuses_a_nonsense_count_before_any_work(tmp_path, flag, value, message):
    args = argparse.Namespace(images=3000, resolution=64, vae_steps=750, nproc=2, n=4, steps=15, score_steps=None,
                              seed=0, max_steps=0, sampler=None, prediction_type="epsilon",
                              root=str(tmp_path / "demo"))
    setattr(args, flag, value)
    with pytest.raises(UserError, match=message):
        run.main(args)
    assert not (tmp_path / "demo").exists()
