"""01b (DiffusionDB), 01c (JourneyDB) and 03_build_hf_dataset on small archives in each dataset's own layout,
served over 127.0.0.1; exact counts, image content, and a second run that converts nothing."""
import io
import json
import tarfile
import zipfile

import numpy as np
import pytest

import sd_data
from data_fixtures import (LoopbackServer, bad_image_bytes, natural_image, run_script, summary_value, to_bytes,
                           write_tar)

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
    args = ["--parts", "1-3", "--download_dir", tmp_path / "raw", "--out", tmp_path / "tars", "--resolution", RES,
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
    args = ["--archives", "0-2", "--download_dir", tmp_path / "raw", "--out", tmp_path / "tars", "--resolution", RES,
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
    args = ["--tars", ddb, jdb, "--out", tmp_path / "hf", "--val_fraction", 0.3]
    out = run_script("03_build_hf_dataset.py", *args).stdout
    import datasets
    dd = datasets.load_from_disk(str(tmp_path / "hf"))
    assert len(dd["train"]) + len(dd["validation"]) == 8
    assert summary_value(out, "skipped: no caption") == 1
    assert all(sd_data.is_validation_key(k, 0.3) for k in dd["validation"]["image_key"])
    row = dd["train"][0]
    assert row["image"].size == (RES, RES) and row["caption"] and row["source"] in ("diffusiondb", "journeydb")
    assert {"diffusiondb", "journeydb"} == set(dd["train"]["source"]) | set(dd["validation"]["source"])
    out = run_script("03_build_hf_dataset.py", *args).stdout
    assert "nothing rebuilt" in out
