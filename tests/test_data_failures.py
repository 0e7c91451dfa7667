"""Each silent loss or crash found by running the pipeline as a new user would, reproduced: shards lost to a slow
server, a tar tokenized while 03 was still writing it, 16-bit and grey images stored wrong by img2dataset's resizer,
corrupt or foreign parquet files, nonsense flags, and runs that produce nothing but exit 0."""
import io
import json

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import sd_data
from data_fixtures import (LoopbackServer, good_jpeg, laion_rows, natural_image, run_script, summary_value, to_bytes,
                           write_parquet, write_tar)
from tiny_models import save_tiny_tokenizer

RES = 64
RGB = natural_image(96, 80, 0)


def odd_images():
    """Sources in every mode img2dataset's resizer meets, as {name: bytes}."""
    bgr = RGB[..., ::-1]
    grey = RGB[..., 1]
    rgba = np.dstack([bgr, np.full(grey.shape, 255, np.uint8)])
    rgba[:20, :, 3] = 0
    return {"grey16": cv2.imencode(".png", grey.astype(np.uint16) * 257)[1].tobytes(),
            "rgb16": cv2.imencode(".png", bgr.astype(np.uint16) * 257)[1].tobytes(),
            "rgba16": cv2.imencode(".png", rgba.astype(np.uint16) * 257)[1].tobytes(),
            "grey8": to_bytes(grey, "PNG"), "greyjpeg": to_bytes(grey, "JPEG", quality=95),
            "palette": to_bytes(Image.fromarray(RGB).quantize(256, dither=Image.Dither.NONE), "PNG"),
            "cmyk": to_bytes(Image.fromarray(RGB).convert("CMYK"), "JPEG", quality=95),
            "rgba8": to_bytes(rgba[..., [2, 1, 0, 3]], "PNG"), "tiff16": cv2.imencode(".tiff", bgr.astype(np.uint16) * 257)[1].tobytes()}


def assert_looks_like(jpeg, source):
    """A stored image is RGB (3 channels in the file itself) and the source as every later step decodes it."""
    stored = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_UNCHANGED)
    assert stored.ndim == 3 and stored.shape[2] == 3 and stored.dtype == np.uint8
    want = sd_data.load_image_square(source, RES, min_size=1).astype(np.float32)
    assert np.abs(stored[..., ::-1].astype(np.float32) - want).mean() < 4.0


#################################################################################
#                      16-bit and grey images (in-process)                      #
#################################################################################

def test_img2dataset_resizer_stores_16_bit_as_white_and_ours_as_the_source():
    import os
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset.resizer import Resizer
    plain = Resizer(RES, "center_crop", False, encode_format="jpg", min_image_size=32)
    ours = sd_data.RGB8Resizer(plain)
    for name, data in odd_images().items():
        stored = plain(io.BytesIO(data))[0]
        img = cv2.imdecode(np.frombuffer(stored, np.uint8), cv2.IMREAD_UNCHANGED)
        if "16" in name:      # where it goes wrong: cv2 decodes 16 bits, the JPEG encoder saturates them to 255
            assert img.mean() > 250, name
        elif "grey" in name:  # and a grey source is stored with one channel
            assert img.ndim == 2, name
        assert sd_data.needs_rgb8(data) == ("16" in name or "grey" in name)
        img_str, w, h, ow, oh, err = ours(io.BytesIO(data))
        assert err is None and (w, h, ow, oh) == (RES, RES, 96, 80), name
        assert_looks_like(img_str, data)
    # a 16-bit file cut off is counted with its reason, as the resizer's own failures are
    cut = odd_images()["rgb16"][:200]
    assert ours(io.BytesIO(cut))[-1] in ("truncated image", "not an image", "decode error")


#################################################################################
#        03 over a slow server, then 04 on a tar still being written            #
#################################################################################

@pytest.mark.slow
def test_shards_lost_to_a_slow_server_or_read_while_written_are_redone(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    names = []
    for name, data in odd_images().items():
        (www / f"{name}.img").write_bytes(data)
        names.append(f"{name}.img")
    for i in range(6):
        (www / f"good{i}.jpg").write_bytes(good_jpeg(i))
    with LoopbackServer(www, slow_seconds=6) as server:   # far past --timeout, so a loaded machine cannot blur the two
        # shard 0: the odd images; shard 1: six good images behind a server that is slow on the first run
        urls = [f"{server.url}/{n}" for n in names] + [f"{server.url}/slow/good{i}.jpg" for i in range(6)]
        n_odd = len(names)
        write_parquet(tmp_path / "meta" / "a.parquet",
                      laion_rows(len(urls), url=urls, caption=[f"a photo of red house number {i}" for i in range(len(urls))]))
        args = ["--meta", tmp_path / "meta", "--out", tmp_path / "tars", "--resolution", RES, "--processes", 1,
                "--threads", 8, "--shard_size", n_odd, "--timeout", 2, "--min_image_size", 32]
        out = run_script("03_download_images.py", *args).stdout
        assert summary_value(out, "kept (downloaded + resized)") == n_odd
        assert summary_value(out, "shards to fetch again (re-run)") == 1 and "run the same command again" in out
        server.httpd.slow_seconds = 0                # the server is healthy again
        out = run_script("03_download_images.py", *args).stdout
        assert summary_value(out, "shards fetched again") == 1 and summary_value(out, "shards already done") == 1
        assert summary_value(out, "kept (downloaded + resized)") == n_odd + 6
        assert summary_value(out, "shards to fetch again (re-run)") == 0
        out = run_script("03_download_images.py", *args).stdout
        assert summary_value(out, "shards already done") == 2 and summary_value(out, "shards fetched again") == 0
    tars = sorted((tmp_path / "tars").glob("*.tar"))
    stored = {k: s for k, s in sd_data.iter_tar_samples(tars[0])}
    by_url = {}
    for s in stored.values():
        by_url[json.loads(s["json"])["url"].rsplit("/", 1)[1]] = s["jpg"]
    assert sorted(by_url) == sorted(names)
    for name in names:                               # every odd mode reached the tar as RGB, looking like its source
        assert_looks_like(by_url[name], (www / name).read_bytes())

    # 04 while 03 still writes shard 1 (img2dataset writes a tar in place, 0 bytes at first), then after it finished
    tok = tmp_path / "tok"
    save_tiny_tokenizer(tok, "a photo of red house number".split())
    full = tars[1].read_bytes()
    tars[1].write_bytes(b"")
    args = ["--tars", tmp_path / "tars", "--out", tmp_path / "tokens", "--text_encoder", tok, "--workers", 1]
    out = run_script("04_preprocess_to_cache.py", *args).stdout
    assert summary_value(out, "kept") == n_odd and summary_value(out, "truncated tar") == 1
    tars[1].write_bytes(full)
    out = run_script("04_preprocess_to_cache.py", *args).stdout
    assert summary_value(out, "shards already done") == 1 and summary_value(out, "shards changed since: redone") == 1
    assert summary_value(out, "kept") == 6
    assert sum(pq.read_metadata(p).num_rows for p in (tmp_path / "tokens").glob("*.parquet")) == n_odd + 6
    out = run_script("04_preprocess_to_cache.py", *args).stdout
    assert summary_value(out, "shards already done") == 2 and summary_value(out, "shards changed since: redone") == 0


#################################################################################
#                    Bad inputs and flags: skipped or one line                  #
#################################################################################

@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    write_parquet(root / "meta" / "good.parquet", laion_rows(4))
    data = (root / "meta" / "good.parquet").read_bytes()
    (root / "meta" / "cut.parquet").write_bytes(data[: len(data) // 2])
    (root / "corrupt").mkdir()
    (root / "corrupt" / "cut.parquet").write_bytes(data[: len(data) // 2])
    (root / "corrupt" / "junk.parquet").write_bytes(b"PAR1 this is not a parquet file PAR1")
    write_parquet(root / "laion_as_coco" / "train-00000-of-00001.parquet", laion_rows(2))
    (root / "tars").mkdir()
    write_tar(root / "tars" / "a.tar", {"a.jpg": good_jpeg(0), "a.txt": b"a red house"})
    (root / "data").mkdir()                          # a relative 'data/myclip' typo is a path, not a hub id
    return root


ONE_LINE = [
    ("01b_download_diffusiondb.py", ["--source", "", "--out", "{root}/o"], "--source '' is neither"),
    ("01b_download_diffusiondb.py", ["--source", "{root}", "--parts", "5-1", "--out", "{root}/o"], "'5-1'"),
    ("01b_download_diffusiondb.py", ["--source", "{root}", "--parts", "abc", "--out", "{root}/o"], "'abc'"),
    ("01c_download_journeydb_images.py", ["--source", "{root}", "--archives", "x", "--out", "{root}/o"], "--archives"),
    ("01_download_metadata.py", ["--source", "{root}/corrupt", "--out", "{root}/o1"], "nothing usable"),
    ("01e_download_coco_people.py", ["--source", "{root}/laion_as_coco", "--out", "{root}/o"],
     "not a detection-datasets/coco parquet"),
    ("02_filter_metadata.py", ["--meta", "{root}/corrupt", "--out", "{root}/o2"], "nothing usable"),
    ("05_build_hf_dataset.py", ["--batches", "{root}/tok", "--out", "{root}/hf", "--val_fraction", "1.5"], "[0, 1)"),
    ("05_build_hf_dataset.py", ["--batches", "{root}/tok", "--out", "{root}/hf", "--val_fraction", "-0.1"], "[0, 1)"),
    ("04_preprocess_to_cache.py", ["--tars", "{root}/tars", "--out", "{root}/t", "--text_encoder", "data/myclip"],
     "'data/myclip' does not exist; pass an existing folder or a hub id with --text_encoder"),
]


@pytest.mark.slow
@pytest.mark.parametrize("script,args,says", ONE_LINE, ids=[f"{s.split('_')[0]}-{i}" for i, (s, _, _) in enumerate(ONE_LINE)])
def test_bad_input_is_one_line_and_exit_1(bad, script, args, says):
    proc = run_script(script, *[a.format(root=bad) for a in args], check=False, cwd=bad)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()               # after a progress bar, where the run got that far
    assert "Traceback" not in proc.stderr and [e for e in err if e.startswith("error: ")] == err[-1:], proc.stderr
    assert says in err[-1], err[-1]


@pytest.mark.slow
def test_02_skips_and_counts_a_corrupt_parquet(bad, tmp_path):
    out = run_script("02_filter_metadata.py", "--meta", bad / "meta", "--out", tmp_path / "f").stdout
    assert summary_value(out, "skipped: unreadable shard") == 1 and summary_value(out, "kept") == 4
    assert not (tmp_path / "f" / "cut.parquet").exists() and not (tmp_path / "f" / "cut.funnel.json").exists()
