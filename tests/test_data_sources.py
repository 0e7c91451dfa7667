"""01b (DiffusionDB), 01c (JourneyDB) and 03_build_hf_dataset on small archives in each dataset's own layout,
served over 127.0.0.1; exact counts, image content, and a second run that converts nothing."""
import io
import json
import tarfile
import zipfile

import numpy as np
import pytest

import sd_data
from data_fixtures import (LoopbackServer, bad_image_bytes, good_jpeg, natural_image, preview_contents, run_script,
                           summary_value, to_bytes, write_tar)

pytestmark = pytest.mark.slow                     # every test here runs the real scripts


RES = 64


def tgz(path, members):
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def tar_contents(path):
    return {k: s for k, s in sd_data.iter_tar_samples(path)}


def assert_same_image(jpeg, original):
    """The stored JPEG is the original, decoded, resized and centre-cropped (JPEG error only)."""
    got = sd_data.decode_image(jpeg, min_size=1).astype(np.float32)
    want = sd_data.load_image_square(original, RES, min_size=1).astype(np.float32)
    assert got.shape == (RES, RES, 3)
    assert np.abs(got - want).mean() < 3.0


@pytest.fixture(scope="module")
def diffusiondb(tmp_path_factory):
    """Parts 1 and 2 in DiffusionDB's layout; part 3 does not exist (404)."""
    root = tmp_path_factory.mktemp("ddb")
    (root / "images").mkdir()
    originals = {}
    for part, n in ((1, 4), (2, 2)):
        prompts, members = {}, {}
        for i in range(n):
            name = f"{part:02d}{i:02d}aaaa-bbbb-cccc.png"
            data = to_bytes(natural_image(96 + 8 * i, 80, 10 * part + i), "PNG")
            members[name] = data
            originals[name[:-4]] = data
            prompts[name] = {"p": f"a fantasy castle {part} {i}", "se": i, "c": 7.0, "st": 50, "sa": "k_lms"}
        members["0199broken.png"] = bad_image_bytes("html")
        prompts["0199broken.png"] = {"p": "broken"}
        members["0198noprompt.png"] = to_bytes(natural_image(96, 96, 99), "PNG")  # absent from the json
        with zipfile.ZipFile(root / "images" / f"part-{part:06d}.zip", "w") as zf:
            for name, data in members.items():
                zf.writestr(name, data)
            zf.writestr(f"part-{part:06d}.json", json.dumps(prompts))
    return root, originals


def test_diffusiondb_over_http(tmp_path, diffusiondb):
    src, originals = diffusiondb
    args = ["--parts", "1-3", "--raw_dir", tmp_path / "raw", "--out", tmp_path / "tars", "--resolution", RES,
            "--min_image_size", 32, "--workers", 2]
    with LoopbackServer(src) as server:
        out = run_script("01b_download_diffusiondb.py", "--source", server.url, *args).stdout
        assert summary_value(out, "parts converted") == 2
        assert summary_value(out, "parts missing at source") == 1
        assert summary_value(out, "images in") == 10
        assert summary_value(out, "kept") == 6
        assert summary_value(out, "skipped: not an image") == 2
        assert summary_value(out, "skipped: no caption") == 2
        samples = {**tar_contents(tmp_path / "tars" / "ddb-part-000001.tar"),
                   **tar_contents(tmp_path / "tars" / "ddb-part-000002.tar")}
        assert sorted(samples) == sorted(originals)
        for key, s in samples.items():
            part, i = int(key[:2]), int(key[2:4])
            assert sd_data.sample_caption(s) == f"a fantasy castle {part} {i}"
            assert json.loads(s["json"])["seed"] == i
            assert_same_image(s["jpg"], originals[key])
        mtime = (tmp_path / "tars" / "ddb-part-000001.tar").stat().st_mtime_ns
        out = run_script("01b_download_diffusiondb.py", "--source", server.url, *args).stdout
        assert summary_value(out, "parts already done") == 2 and summary_value(out, "kept") == 0
        assert (tmp_path / "tars" / "ddb-part-000001.tar").stat().st_mtime_ns == mtime


def test_diffusiondb_local_source_and_bad_path(tmp_path, diffusiondb):
    src, _ = diffusiondb
    out = run_script("01b_download_diffusiondb.py", "--source", src, "--parts", "2", "--out", tmp_path / "t",
                     "--resolution", RES, "--min_image_size", 32, "--workers", 1).stdout
    assert summary_value(out, "kept") == 2
    proc = run_script("01b_download_diffusiondb.py", "--source", tmp_path / "nope", check=False)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith("error: --source")


@pytest.fixture(scope="module")
def journeydb(tmp_path_factory):
    """Archives 000 (good, CMYK, truncated, no prompt) and 001 (a cut-off tgz) in JourneyDB's layout."""
    root = tmp_path_factory.mktemp("jdb")
    imgs = root / "data" / "train" / "imgs"
    imgs.mkdir(parents=True)
    originals = {"aa11": to_bytes(natural_image(120, 90, 1), "JPEG", quality=95),
                 "bb22": bad_image_bytes("cmyk_jpeg", seed=2)}
    members = {f"000/{k}.jpg": v for k, v in originals.items()}
    members["000/cc33.jpg"] = bad_image_bytes("truncated_jpeg")
    members["000/dd44.jpg"] = to_bytes(natural_image(90, 90, 4), "JPEG")
    tgz(imgs / "000.tgz", members)
    tgz(imgs / "001.tgz", {f"001/ee{i}.jpg": to_bytes(natural_image(100, 100, i), "JPEG") for i in range(4)})
    data = (imgs / "001.tgz").read_bytes()
    (imgs / "001.tgz").write_bytes(data[: len(data) // 2])
    anno = [{"img_path": f"./imgs/000/{k}.jpg", "prompt": f"midjourney prompt {k}", "Task2": {"Caption": f"cap {k}"}}
            for k in ("aa11", "bb22", "cc33")]
    anno.append({"img_path": "./imgs/000/dd44.jpg", "Task2": {"Caption": "no prompt here"}})
    anno += [{"img_path": f"./imgs/001/ee{i}.jpg", "prompt": f"p {i}"} for i in range(4)]
    anno.append({"img_path": "./imgs/005/zz.jpg", "prompt": "an archive not requested"})
    tgz(root / "data" / "train" / "train_anno_realease_repath.jsonl.tgz",
        {"train_anno_realease_repath.jsonl": "\n".join(json.dumps(a) for a in anno).encode() + b"\n{broken json\n"})
    return root, originals


def test_journeydb_over_http(tmp_path, journeydb):
    src, originals = journeydb
    args = ["--archives", "0-2", "--raw_dir", tmp_path / "raw", "--out", tmp_path / "tars", "--resolution", RES,
            "--min_image_size", 32, "--workers", 2]
    with LoopbackServer(src) as server:
        out = run_script("01c_download_journeydb_images.py", "--source", server.url, *args).stdout
        assert summary_value(out, "archives converted") == 1
        assert summary_value(out, "archives missing at source") == 1
        assert summary_value(out, "skipped: unreadable archive") == 1
        assert summary_value(out, "kept") == 2
        assert summary_value(out, "skipped: truncated image") == 1
        assert summary_value(out, "skipped: no caption") == 1
        samples = tar_contents(tmp_path / "tars" / "jdb-000.tar")
        assert sorted(samples) == ["aa11", "bb22"]
        for key, s in samples.items():
            assert sd_data.sample_caption(s) == f"midjourney prompt {key}"
            assert_same_image(s["jpg"], originals[key])
        assert not (tmp_path / "tars" / "jdb-001.tar").exists()
        assert not list((tmp_path / "tars").glob(".*"))  # no temp file left by the aborted archive
        out = run_script("01c_download_journeydb_images.py", "--source", server.url, *args).stdout
        assert summary_value(out, "archives already done") == 1

    # the Task2 caption instead of the prompt: dd44 now has one
    out = run_script("01c_download_journeydb_images.py", "--source", src, "--archives", "0", "--out",
                     tmp_path / "t2", "--caption_field", "Task2.Caption", "--resolution", RES, "--min_image_size", 32).stdout
    assert summary_value(out, "kept") == 3
    assert sd_data.sample_caption(tar_contents(tmp_path / "t2" / "jdb-000.tar")["dd44"]) == "no prompt here"


def test_build_image_dataset(tmp_path, diffusiondb, journeydb):
    ddb, jdb = tmp_path / "ddb", tmp_path / "jdb"
    run_script("01b_download_diffusiondb.py", "--source", diffusiondb[0], "--parts", "1-2", "--out", ddb,
               "--resolution", RES, "--min_image_size", 32, "--workers", 1)
    run_script("01c_download_journeydb_images.py", "--source", journeydb[0], "--archives", "0", "--out", jdb,
               "--resolution", RES, "--min_image_size", 32, "--workers", 1)
    write_tar(jdb / "zz-extra.tar", {"nocap.jpg": to_bytes(natural_image(80, 80, 3), "JPEG")})
    args = ["--tars", ddb, jdb, "--out", tmp_path / "hf", "--val_fraction", 0.3, "--preview", 4]
    out = run_script("03_build_hf_dataset.py", *args).stdout
    import datasets
    dd = datasets.load_from_disk(str(tmp_path / "hf"))
    assert len(dd["train"]) + len(dd["validation"]) == 8
    assert summary_value(out, "skipped: no caption") == 1
    assert all(sd_data.is_validation_key(k, 0.3) for k in dd["validation"]["image_key"])
    row = dd["train"][0]
    assert row["image"].size == (RES, RES) and row["caption"] and row["source"] in ("diffusiondb", "journeydb")
    assert {"diffusiondb", "journeydb"} == set(dd["train"]["source"]) | set(dd["validation"]["source"])
    # the preview: the 4 train rows whose keys rank first for seed 0, as the dataset stores them, captioned
    keys, captions, tiles = preview_contents(tmp_path / "hf" / "preview.png", sd_data.PREVIEW_TILE)
    stored = dd["train"].cast_column("image", datasets.Image(decode=False))
    rows = {r["image_key"]: r for r in stored}
    assert keys == sorted(rows, key=lambda k: sd_data.preview_rank(k, 0))[:4]
    assert captions == [rows[k]["caption"] for k in keys]
    for k, tile in zip(keys, tiles):
        want = sd_data.load_image_square(rows[k]["image"]["bytes"], sd_data.PREVIEW_TILE, min_size=1)
        assert np.array_equal(tile, want), k
    out = run_script("03_build_hf_dataset.py", *args).stdout
    assert "nothing rebuilt" in out


def flat_image(w, h, color=(128, 128, 128)):
    return np.full((h, w, 3), color, np.uint8)


def assert_cropped(jpeg, original, center, side):
    """The stored JPEG is `original`, decoded, cut to the side x side square around `center`, resized."""
    square = sd_data.crop_square(sd_data.decode_image(original, min_size=1), center, side)
    want = sd_data.resize_center_crop(square, RES)
    got = sd_data.decode_image(jpeg, min_size=1)
    assert got.shape == (RES, RES, 3)
    assert np.abs(got.astype(np.float32) - want).mean() < 3.0


@pytest.fixture(scope="module")
def vggface2(tmp_path_factory):
    """Three identities in VGGFace2's layout: n000001 (a man: 3 good images, a broken, a cut-off and a tiny one),
    n000002 (a woman: one image with a red face off centre), n000003 (not in identity_meta.csv, no face boxes)."""
    root = tmp_path_factory.mktemp("vgg")
    images = {"n000001/0001_01": to_bytes(natural_image(150, 200, 1), "JPEG", quality=95),   # shorter side 150
              "n000001/0002_01": to_bytes(natural_image(240, 130, 2), "JPEG", quality=95),   # 130: not picked
              "n000001/0003_01": to_bytes(natural_image(180, 190, 3), "JPEG", quality=95),   # 180: picked first
              "n000001/0004_01": bad_image_bytes("html"),
              "n000001/0005_01": to_bytes(natural_image(60, 60, 5), "JPEG"),
              "n000001/0006_01": good_jpeg(9, 300, 300)[:-4000],                          # largest, but cut off
              "n000003/0001_01": to_bytes(natural_image(120, 140, 6), "JPEG", quality=95),
              "n000003/0002_02": to_bytes(natural_image(140, 110, 7), "JPEG", quality=95)}
    face = flat_image(300, 180)
    face[60:120, 200:260] = (220, 20, 20)
    images["n000002/0001_01"] = to_bytes(face, "PNG")
    for name, data in images.items():
        (root / "train" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "train" / f"{name}.jpg").write_bytes(data)
    (root / "meta").mkdir()
    (root / "meta" / "identity_meta.csv").write_text(
        'Class_ID, Name, Sample_Num, Flag, Gender\nn000001, "Doe,_John", 5, 1, m\nn000002, "Roe,_Jane", 1, 1, f\n')
    (root / "bb_landmark").mkdir()
    (root / "bb_landmark" / "loose_bb_train.csv").write_text(
        "NAME_ID,X,Y,W,H\nn000001/0001_01,40,50,60,80\nn000001/0003_01,30,30,100,120\nn000002/0001_01,200,60,60,60\n")
    return root, images


def test_vggface2_picks_the_largest_per_identity_and_crops_around_the_face(tmp_path, vggface2):
    src, images = vggface2
    args = ["--source", src, "--out", tmp_path / "tars", "--per_identity", 2, "--identities_per_shard", 2,
            "--resolution", RES, "--min_image_size", 100, "--face_margin", 2.0, "--workers", 2]
    out = run_script("01d_prepare_vggface2.py", *args).stdout
    assert summary_value(out, "identities") == 3 and summary_value(out, "shards") == 2
    assert summary_value(out, "images in") == 9
    assert summary_value(out, "skipped: not an image") == 1 and summary_value(out, "skipped: image too small") == 1
    assert summary_value(out, "skipped: truncated image") == 1              # the next largest took its place
    assert summary_value(out, "not picked (over --per_identity)") == 1
    assert summary_value(out, "no face box: centre crop") == 2
    assert summary_value(out, "kept") == 5
    samples = {**tar_contents(tmp_path / "tars" / "vggface2-000000.tar"),
               **tar_contents(tmp_path / "tars" / "vggface2-000001.tar")}
    assert sorted(samples) == ["n000001_0001_01", "n000001_0003_01", "n000002_0001_01", "n000003_0001_01",
                               "n000003_0002_02"]
    gender = {"n000001": " man", "n000002": " woman", "n000003": " person"}
    for key, s in samples.items():
        caption = sd_data.sample_caption(s)
        assert gender[key[:7]] in caption and "Doe" not in caption and "Roe" not in caption
    assert_cropped(samples["n000001_0003_01"]["jpg"], images["n000001/0003_01"], (80, 90), 240)
    assert_cropped(samples["n000002_0001_01"]["jpg"], images["n000002/0001_01"], (230, 90), 120)
    red = sd_data.decode_image(samples["n000002_0001_01"]["jpg"], min_size=1)[RES // 2, RES // 2]
    assert red[0] > 180 and red[1] < 60                       # the face is in the middle of the crop
    assert_same_image(samples["n000003_0001_01"]["jpg"], images["n000003/0001_01"])   # no face box: centre crop

    out = run_script("01d_prepare_vggface2.py", *args).stdout
    assert summary_value(out, "shards already done") == 2 and summary_value(out, "kept") == 0
    proc = run_script("01d_prepare_vggface2.py", "--source", tmp_path / "nope", check=False)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith("error: ")


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """detection-datasets/coco parquet files: one written by `datasets` (objects as a struct of lists), one by
    pyarrow as a list of structs, one cut off, and a val file the train split must not read."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    root = tmp_path_factory.mktemp("coco")
    (root / "data").mkdir()
    person_img = flat_image(200, 160)
    person_img[20:150, 160:180] = (20, 20, 220)
    images = {1: to_bytes(person_img, "PNG"), 2: good_jpeg(2, 200, 160), 3: good_jpeg(3, 200, 160),
              4: bad_image_bytes("html"), 5: good_jpeg(5, 160, 200), 6: good_jpeg(6, 200, 160)}
    rows = [  # (image_id, [(category, xyxy box)]): 16 = dog, 47 = apple
        (1, [(0, (160, 20, 180, 150)), (16, (10, 100, 50, 150))]),      # person 130/160 = 81%: kept
        (2, [(0, (10, 10, 40, 50))]),                                     # 25%: not kept
        (3, []),                                                          # nobody
        (4, [(0, (0, 0, 50, 150))]),                                      # tall, but not an image
        (5, [(0, (10, 10, 60, 190)), (0, (80, 20, 150, 150)), (47, (0, 0, 5, 5))]),  # two people, portrait image
    ]
    size = {i: (160, 200) if i == 5 else (200, 160) for i in images}
    features = datasets.Features({
        "image_id": datasets.Value("int64"), "image": datasets.Image(), "width": datasets.Value("int64"),
        "height": datasets.Value("int64"),
        "objects": datasets.Sequence({"bbox_id": datasets.Value("int64"), "category": datasets.Value("int64"),
                                      "bbox": datasets.Sequence(datasets.Value("float32"), length=4),
                                      "area": datasets.Value("int64")})})
    columns = {"image_id": [], "image": [], "width": [], "height": [], "objects": []}
    for i, objs in rows:
        columns["image_id"].append(i)
        columns["image"].append({"bytes": images[i], "path": None})
        columns["width"].append(size[i][0])
        columns["height"].append(size[i][1])
        columns["objects"].append({"bbox_id": list(range(len(objs))), "category": [c for c, _ in objs],
                                   "bbox": [list(b) for _, b in objs], "area": [1] * len(objs)})
    ds = datasets.Dataset.from_dict(columns, features=features)
    ds.to_parquet(str(root / "data" / "train-00000-of-00003-a.parquet"))
    row6 = {"image_id": 6, "image": {"bytes": images[6], "path": None}, "width": 200, "height": 160,
            "objects": [{"bbox_id": 0, "category": 0, "bbox": [20.0, 40.0, 60.0, 160.0], "area": 1}]}
    pq.write_table(pa.Table.from_pylist([row6]), root / "data" / "train-00001-of-00003-b.parquet")
    data = (root / "data" / "train-00000-of-00003-a.parquet").read_bytes()
    (root / "data" / "train-00002-of-00003-c.parquet").write_bytes(data[: len(data) // 2])
    pq.write_table(pa.Table.from_pylist([dict(row6, image_id=7)]), root / "data" / "val-00000-of-00001-d.parquet")
    captions = {"annotations": [{"id": 9, "image_id": 1, "caption": "A man walks past a dog. "},
                                {"id": 3, "image_id": 5, "caption": "Two friends stand in a park."}]}
    (root / "captions_train2017.json").write_text(json.dumps(captions))
    return root, images


def test_coco_keeps_tall_people_and_crops_around_them(tmp_path, coco):
    src, images = coco
    args = ["--source", src, "--out", tmp_path / "tars", "--resolution", RES, "--min_image_size", 100, "--workers", 2]
    out = run_script("01e_download_coco_people.py", *args).stdout
    assert summary_value(out, "parquet files") == 3
    assert summary_value(out, "images in") == 6
    assert summary_value(out, "not kept: no person that tall") == 2
    assert summary_value(out, "skipped: not an image") == 1
    assert summary_value(out, "skipped: unreadable parquet") == 1
    assert summary_value(out, "kept") == 3
    samples = {**tar_contents(tmp_path / "tars" / "train-00000-of-00003-a.tar"),
               **tar_contents(tmp_path / "tars" / "train-00001-of-00003-b.tar")}
    assert sorted(samples) == ["001_000000000001", "005_000000000005", "006_000000000006"]
    caption = {k[-1]: sd_data.sample_caption(s) for k, s in samples.items()}
    assert "a person with a dog" in caption["1"] and "two people with an apple" in caption["5"]
    assert_cropped(samples["001_000000000001"]["jpg"], images[1], (170, 85), 160)     # x 40-200, not the centre
    blue = sd_data.decode_image(samples["001_000000000001"]["jpg"], min_size=1)[RES // 2, int(RES * 130 / 160)]
    assert blue[2] > 180 and blue[0] < 60                     # the person is in the crop
    assert_cropped(samples["005_000000000005"]["jpg"], images[5], (35, 100), 160)
    assert json.loads(samples["006_000000000006"]["json"])["person_box"] == [20.0, 40.0, 60.0, 160.0]
    out = run_script("01e_download_coco_people.py", *args).stdout
    assert summary_value(out, "files already done") == 2 and summary_value(out, "kept") == 0

    # COCO's own captions (one per image, fixed); image 6 has none
    out = run_script("01e_download_coco_people.py", "--source", src, "--out", tmp_path / "t2", "--captions",
                     src / "captions_train2017.json", "--resolution", RES, "--min_image_size", 100).stdout
    assert summary_value(out, "kept") == 2 and summary_value(out, "skipped: no caption") == 1
    got = tar_contents(tmp_path / "t2" / "train-00000-of-00003-a.tar")
    assert sd_data.sample_caption(got["001_000000000001"]) == "A man walks past a dog."
    proc = run_script("01e_download_coco_people.py", "--source", src, "--split", "test", check=False)
    assert proc.returncode != 0 and "no test-*.parquet files" in proc.stderr.strip().splitlines()[-1]


def test_readme_phase3_commands_make_one_dataset_of_two_tar_folders(tmp_path, diffusiondb, journeydb):
    """The README's phase-3 lines as written (run from a fresh folder, so their data/ paths land there), with only
    what tiny local data needs appended: sources, sizes, the tiny tokenizer and VAE, CPU instead of torchrun."""
    import sd_latents
    from data_fixtures import readme_commands
    from tiny_models import save_tiny_tokenizer, save_tiny_vae
    save_tiny_tokenizer(tmp_path / "tok", "a fantasy castle midjourney prompt".split())
    save_tiny_vae(tmp_path / "vae")
    small = ["--resolution", RES, "--min_image_size", 32, "--workers", 1]
    tiny = {"01b_download_diffusiondb.py": ["--source", diffusiondb[0], "--parts", "1-2", *small],
            "01c_download_journeydb_images.py": ["--source", journeydb[0], "--archives", "0", *small],
            "04_preprocess_to_cache.py": ["--text_encoder", tmp_path / "tok", "--workers", 1],
            "05_build_hf_dataset.py": ["--val_fraction", 0.3],
            "encode_latents.py": ["--vae", tmp_path / "vae", "--device", "cpu", "--resolution", RES, "--workers", 1]}
    lines = [(script, args) for phase, script, args in readme_commands() if phase.startswith("phase3")]
    assert [s for s, _ in lines] == list(tiny)
    for script, args in lines:
        run_script(script, *args, *tiny[script], cwd=tmp_path)
    data = tmp_path / "data"
    captions = [k for split in ("train", "validation") for k in sd_latents.open_captions(data / "dm_hf", split)["image_key"]]
    assert len(captions) == len(set(captions)) == 8                # DiffusionDB's 6 and JourneyDB's 2 kept images
    assert sd_latents.existing_latent_keys(data / "dm_latents") == set(captions)
