"""Unit tests of sd_data's pure pieces against independent references (PIL, tarfile, formulas), and the
scripts' one-line errors and filter presets."""
import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import sd_data
import sd_latents
from data_fixtures import (bad_image_bytes, good_jpeg, laion_rows, natural_image, run_script, summary_value,
                           to_bytes, write_parquet, write_tar)


#################################################################################
#                                    Images                                     #
#################################################################################

@pytest.mark.parametrize("kind,reason", [("html", "not an image"), ("empty", "empty file"),
                                         ("truncated_jpeg", "truncated image"), ("tiny", "image too small")])
def test_broken_images_are_rejected_with_reason(kind, reason):
    with pytest.raises(sd_data.BadSample, match=reason):
        sd_data.decode_image(bad_image_bytes(kind))


def test_huge_image_rejected_from_header_alone():
    with pytest.raises(sd_data.BadSample, match="image too large"):
        sd_data.decode_image(bad_image_bytes("huge"), max_pixels=3000 * 3000 - 1)
    assert sd_data.decode_image(bad_image_bytes("huge"), max_pixels=3000 * 3000).shape == (3000, 3000, 3)


def test_awkward_formats_decode_to_the_right_colours():
    rgb = natural_image(96, 80, 0).astype(np.float32)
    # 16-bit PNG: the top byte is the 8-bit image exactly
    np.testing.assert_array_equal(sd_data.decode_image(bad_image_bytes("png16")), rgb.astype(np.uint8))
    # alpha PNG: transparent top half becomes white, opaque bottom half is the image
    alpha = sd_data.decode_image(bad_image_bytes("alpha_png")).astype(np.float32)
    assert (alpha[:40] == 255).all()
    np.testing.assert_array_equal(alpha[40:], rgb[40:])
    # CMYK JPEG: same colours as PIL's own CMYK->RGB conversion (within JPEG error), not inverted
    cmyk = bad_image_bytes("cmyk_jpeg")
    ref = np.asarray(Image.open(io.BytesIO(cmyk)).convert("RGB"), np.float32)
    assert np.abs(sd_data.decode_image(cmyk).astype(np.float32) - ref).mean() < 2.0
    assert np.abs(ref - rgb).mean() < 4.0
    # greyscale JPEG comes back as 3 equal channels
    grey = sd_data.decode_image(to_bytes(Image.fromarray(rgb[..., 0].astype(np.uint8)), "JPEG"))
    assert grey.shape == (80, 96, 3) and (grey[..., 0] == grey[..., 2]).all()


@pytest.mark.parametrize("w,h", [(200, 100), (100, 300), (64, 64), (40, 50)])
def test_resize_center_crop_matches_pil(w, h):
    """Shorter side to 64 then the centre square, against PIL with the same geometry."""
    img = natural_image(w, h, 3)
    out = sd_data.resize_center_crop(img, 64)
    s = 64 / min(w, h)
    nw, nh = max(64, round(w * s)), max(64, round(h * s))
    ref = Image.fromarray(img).resize((nw, nh), Image.BOX if s < 1 else Image.BICUBIC)
    left, top = (nw - 64) // 2, (nh - 64) // 2
    ref = np.asarray(ref.crop((left, top, left + 64, top + 64)), np.float32)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(np.float32) - ref).mean() < 2.0


def test_resize_cover_crop_to_a_non_square_bucket_matches_pil():
    """A 4:3 image into 576x384 (3:2): scaled to cover (width 576, height 432), then the centre 384 rows."""
    img = natural_image(400, 300, 5)
    out = sd_data.resize_cover_crop(img, 576, 384)
    ref = np.asarray(Image.fromarray(img).resize((576, 432), Image.BICUBIC).crop((0, 24, 576, 408)), np.float32)
    assert out.shape == (384, 576, 3) and np.abs(out.astype(np.float32) - ref).mean() < 2.0


#################################################################################
#                             Aspect-Ratio Buckets                              #
#################################################################################

def test_aspect_buckets_at_512_the_demo_and_too_small_a_base():
    buckets = sd_data.aspect_buckets(512, 64)
    assert buckets == [(320, 640), (384, 640), (384, 576), (384, 512), (448, 576), (448, 512), (512, 512),
                       (512, 448), (576, 448), (512, 384), (576, 384), (640, 384), (640, 320)]
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios) and len(set(ratios)) == len(ratios)              # one size per aspect
    assert all(w % 64 == h % 64 == 0 and 0.75 * 512 ** 2 <= w * h <= 512 ** 2 and 0.5 <= w / h <= 2
               for w, h in buckets)
    assert sd_data.aspect_buckets(80, 32) == [(64, 96), (96, 64)]                   # the bucketed demo's (VAE 4x)
    assert sd_data.aspect_buckets(64, 64) == [(64, 64)]
    with pytest.raises(sd_data.UserError, match="no 64-px multiple sizes fit a base of 40 px"):
        sd_data.aspect_buckets(40, 64)


# (width, height) of an image -> its bucket at 512 and the share of its area the crop keeps
@pytest.mark.parametrize("w,h,bucket,kept", [
    (512, 512, (512, 512), 1.0), (1024, 768, (512, 384), 1.0), (600, 400, (576, 384), 1.0),
    (768, 1024, (384, 512), 1.0), (400, 600, (384, 576), 1.0), (1920, 1080, (640, 384), 0.9375),
    (1080, 1920, (384, 640), 0.9375), (1250, 1000, (576, 448), 0.9722), (2000, 1000, (640, 320), 1.0),
    (3000, 1000, (640, 320), 0.6667), (1000, 3000, (320, 640), 0.6667), (1060, 1000, (512, 512), 0.9434)])
def test_nearest_bucket_and_the_area_its_crop_keeps(w, h, bucket, kept):
    buckets = sd_data.aspect_buckets(512, 64)
    b = buckets[sd_data.nearest_bucket(w, h, buckets)]
    assert b == bucket and sd_data.area_kept(w, h, *b) == pytest.approx(kept, abs=1e-4)
    assert sd_data.area_kept(w, h, 512, 512) == pytest.approx(min(w, h) / max(w, h))  # the centre crop's share
    img = sd_data.load_image_bucket(good_jpeg(0, w // 8, h // 8), buckets, min_size=1)
    assert buckets[img[0]] == bucket and img[1].shape == (bucket[1], bucket[0], 3)


def test_nearest_bucket_ties_go_to_the_larger_then_the_first():
    assert sd_data.nearest_bucket(64, 64, [(64, 96), (96, 64)]) == 0                 # 1:1 between 2:3 and 3:2
    assert sd_data.nearest_bucket(64, 64, [(32, 32), (64, 64)]) == 1


def test_bucket_records_survive_a_cut_line(tmp_path):
    sd_latents.append_bucket_records(tmp_path, 0, ["a", "b"], [3, 0])
    with open(sd_latents.bucket_records_path(tmp_path, 0), "a") as f:
        f.write("c\t")                                       # a kill in the middle of the next append
    sd_latents.append_bucket_records(tmp_path, 0, ["d"], [1])
    sd_latents.append_bucket_records(tmp_path, 1, ["e"], [2])
    assert sd_latents.read_bucket_records(tmp_path) == {"a": 3, "b": 0, "d": 1, "e": 2}


def test_images_to_tensor_range():
    import torch
    batch = torch.tensor([[[[0, 255, 128]]]], dtype=torch.uint8)  # (1, 1, 1, 3)
    t = sd_data.images_to_tensor(batch)
    assert t.shape == (1, 3, 1, 1)
    torch.testing.assert_close(t.flatten(), torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]))


#################################################################################
#                                  Tar Shards                                   #
#################################################################################

def test_tar_reader_at_every_truncation_point(tmp_path):
    """Cut a 3-sample tar at every 97th byte: only complete samples come out, with their exact bytes,
    at most the last complete one is lost (a cut header cannot say whose it was), and every cut counts
    as one truncated tar (tarfile alone would take a cut at a header boundary for a clean end)."""
    members = {}
    for k in ("s0", "s1", "s2"):
        members[f"{k}.jpg"] = good_jpeg(int(k[1]))
        members[f"{k}.txt"] = f"caption {k}".encode()
    full = tmp_path / "full.tar"
    write_tar(full, members)
    with tarfile.open(full) as tf:
        ends = {}
        for m in tf.getmembers():
            key = m.name.split(".")[0]
            ends[key] = max(ends.get(key, 0), m.offset_data + m.size)
    data = full.read_bytes()
    end_marker = -(-max(ends.values()) // 512) * 512 + 512  # through the first zero block
    assert [k for k, _ in sd_data.iter_tar_samples(full)] == ["s0", "s1", "s2"]
    for cut in [*range(0, len(data), 97), end_marker - 1, end_marker, len(data)]:
        counts = {}
        got = dict(sd_data.iter_tar_samples(data[:cut], counts))
        complete = [k for k, end in ends.items() if end <= cut]
        assert set(got) <= set(complete)
        assert set(complete) - set(got) <= set(complete[-1:])
        for k, s in got.items():
            assert s == {"jpg": members[f"{k}.jpg"], "txt": members[f"{k}.txt"]}
        assert counts == ({"truncated tar": 1} if cut < end_marker else {})


def test_tar_reader_garbage_file(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"this is not a tar at all" * 50)
    counts = {}
    assert list(sd_data.iter_tar_samples(tmp_path / "x.tar", counts)) == []
    assert counts == {"truncated tar": 1}


def test_shard_writer_is_atomic(tmp_path):
    w = sd_data.TarShardWriter(tmp_path / "a.tar")
    w.write("k1", b"\xff\xd8jpeg", "hello", {"x": 1})
    assert not (tmp_path / "a.tar").exists()  # nothing at the final name until closed
    w.close()
    (key, sample), = sd_data.iter_tar_samples(tmp_path / "a.tar")
    assert key == "k1" and sample["txt"] == b"hello" and sample["json"] == b'{"x": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["a.tar"]


#################################################################################
#                                   Previews                                    #
#################################################################################

def test_preview_takes_the_first_ranked_usable_samples_of_seeded_shards(tmp_path):
    """6 shards of 3 samples: a preview reads PREVIEW_SHARDS of them (a seeded pick), skips the unusable samples
    (an HTML page, no caption, a PNG whose body is broken behind a good header) and those outside `keys`, and keeps
    the lowest-ranked keys."""
    broken = bytearray(to_bytes(natural_image(96, 80, 3), "PNG"))
    broken[len(broken) // 2:len(broken) // 2 + 60] = bytes(60)
    bad = {(5, 1): bad_image_bytes("html"), (2, 0): bytes(broken), (4, 0): bytes(broken)}
    tars = []
    for t in range(6):
        members = {}
        for i in range(3):
            members[f"s{t}{i}.jpg"] = bad.get((t, i), good_jpeg(10 * t + i))
            if (t, i) != (3, 2):                                          # one sample without a caption
                members[f"s{t}{i}.txt"] = f"sample {t} {i}".encode()
        tars.append(tmp_path / f"{t:05d}.tar")
        write_tar(tars[-1], members)
    picked = sorted(np.random.default_rng(7).choice(6, sd_data.PREVIEW_SHARDS, replace=False))
    assert {2, 3, 4, 5} == set(picked)                                            # every bad sample is read
    usable = [f"s{t}{i}" for t in picked for i in range(3) if (t, i) not in {*bad, (3, 2)}]
    got = sd_data.preview_samples(tars, 5, 7)
    assert [k for k, _, _ in got] == sorted(usable, key=lambda k: sd_data.preview_rank(k, 7))[:5]
    assert all(c == f"sample {k[1]} {k[2]}" and image == good_jpeg(10 * int(k[1]) + int(k[2])) for k, image, c in got)
    assert sd_data.preview_samples(tars, 5, 7) == got                            # seeded: the same again
    assert sorted(k for k, _, _ in sd_data.preview_samples(tars, 50, 7)) == sorted(usable)   # bad ones never shown
    wanted = set(usable[::2])
    assert [k for k, _, _ in sd_data.preview_samples(tars, 50, 7, keys=wanted)] == \
        sorted(wanted, key=lambda k: sd_data.preview_rank(k, 7))


def test_preview_grid_has_a_captioned_cell_per_tile(tmp_path):
    from data_fixtures import preview_contents
    tiles = [natural_image(2 * sd_data.PREVIEW_TILE, sd_data.PREVIEW_TILE, i) for i in range(7)]
    captions = [f"caption {i}" for i in range(6)] + ["a caption far too long for three lines " * 12]
    path = sd_data.write_preview(tmp_path / "preview.png", tiles, captions, [f"k{i}" for i in range(7)])
    keys, got_captions, got_tiles = preview_contents(path, 2 * sd_data.PREVIEW_TILE)
    assert keys == [f"k{i}" for i in range(7)] and got_captions == captions
    assert all(np.array_equal(a, b) for a, b in zip(got_tiles, tiles)) and len(got_tiles) == 7
    assert sd_data.write_preview(tmp_path / "none.png", [], [], []) is None and not (tmp_path / "none.png").exists()


#################################################################################
#                           Metadata, Captions, Splits                          #
#################################################################################

def test_normalize_laion_columns_variants():
    t = pa.table({"URL": ["u"], "TEXT": ["t"], "WIDTH": [1], "HEIGHT": [2], "similarity": [0.3], "punsafe": [0.1],
                  "pwatermark": [0.2], "AESTHETIC_SCORE": [6.0], "hash": pa.array([123], pa.int64()), "other": [1]})
    n = sd_data.normalize_laion_columns(t)
    assert n.column_names == ["url", "caption", "width", "height", "similarity", "punsafe", "pwatermark",
                              "aesthetic", "hash", "other"]
    assert n.column("hash").to_pylist() == ["123"] and n.schema.field("width").type == pa.int64()
    assert sd_data.normalize_laion_columns(pa.table({"url": ["u"], "prediction": [5.5]})).column_names == \
        ["url", "aesthetic"]
    with pytest.raises(Exception, match="no URL column"):
        sd_data.normalize_laion_columns(pa.table({"caption": ["x"]}))


@pytest.mark.parametrize("caption,problem", [(None, "no caption"), ("   ", "no caption"), ("hey", "caption too short"),
                                             ("1234 5678", "caption has no letters"),
                                             ("DSC_0042.JPG", "caption is a file name"), ("x" * 1001, "caption too long"),
                                             ("a red house at night", None)])
def test_caption_problem(caption, problem):
    assert sd_data.caption_problem(caption) == problem


def test_validation_split_is_stable_and_sized():
    keys = [f"{i:09d}" for i in range(20000)]
    val = [k for k in keys if sd_data.is_validation_key(k, 0.1)]
    assert abs(len(val) / len(keys) - 0.1) < 0.01
    assert val == [k for k in keys if sd_data.is_validation_key(k, 0.1)]
    # md5-based, so it is the same on every machine and Python (a salted hash() would not be)
    import hashlib
    assert sd_data.key_fraction("abc") == int(hashlib.md5(b"abc").hexdigest()[:12], 16) / 16 ** 12


#################################################################################
#                                Latent Contract                                #
#################################################################################

def test_latent_roundtrip_and_layout(tmp_path):
    lat = np.random.default_rng(0).standard_normal((4, 8, 8)).astype(np.float32)
    sd_latents.write_latent(tmp_path, "000123456", lat)
    path = tmp_path / "latents" / "00012" / "000123456.npy"
    assert sd_latents.latent_path(tmp_path, "000123456") == path and path.exists()
    back = sd_latents.read_latent(tmp_path, "000123456")
    assert back.dtype == np.float16
    np.testing.assert_array_equal(back, lat.astype(np.float16))
    assert sd_latents.existing_latent_keys(tmp_path) == {"000123456"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["000123456.npy"]  # no temp file left
    with pytest.raises(Exception, match="is not a latent folder"):
        sd_latents.load_latent_info(tmp_path)
    sd_latents.write_latent_info(tmp_path, {"count": 1})
    assert sd_latents.load_latent_info(tmp_path) == {"count": 1}


#################################################################################
#                              Scripts: errors, 02                              #
#################################################################################

@pytest.mark.parametrize("script,args", [
    ("02_filter_metadata.py", ["--meta", "/nonexistent/meta"]),
    ("04_preprocess_to_cache.py", ["--tars", "/nonexistent/tars"]),
    ("05_build_hf_dataset.py", ["--batches", "/nonexistent/batches"]),
    ("encode_latents.py", ["--tars", "/nonexistent/tars"]),
    ("01_download_metadata.py", ["--source", "/nonexistent/src"]),
])
@pytest.mark.slow
def test_wrong_paths_give_one_line_errors(script, args):
    proc = run_script(script, *args, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "/nonexistent/" in proc.stderr


@pytest.mark.parametrize("script", ["03_download_images.py", "03_build_hf_dataset.py", "05_build_hf_dataset.py",
                                    "encode_latents.py"])
@pytest.mark.slow
def test_a_negative_preview_is_one_line_before_any_work(script, tmp_path):
    proc = run_script(script, "--preview", -1, "--out", tmp_path / "out", check=False)
    assert proc.returncode == 1 and proc.stderr.strip() == "error: --preview must be 0 (no preview) or a number of " \
                                                           "samples, got -1"
    assert not (tmp_path / "out").exists()


def test_filter_phase2_preset_and_overrides(tmp_path):
    rows = laion_rows(6, aesthetic=[7.6, 7.4, 8.0, 8.0, 8.0, 8.0], pwatermark=[0.1, 0.1, 0.2, 0.1, 0.1, 0.1],
                      similarity=[0.31, 0.31, 0.31, 0.29, 0.31, 0.31], height=[768, 768, 768, 768, 500, 768])
    write_parquet(tmp_path / "meta" / "a.parquet", rows)
    out = run_script("02_filter_metadata.py", "--meta", tmp_path / "meta", "--out", tmp_path / "f2",
                     "--preset", "phase2").stdout
    assert summary_value(out, "aesthetic >= 7.5") == 5
    assert summary_value(out, "similarity >= 0.3") == 4
    assert summary_value(out, "height >= 512") == 3
    assert summary_value(out, "pwatermark < 0.15") == 2
    assert pq.read_table(tmp_path / "f2" / "a.parquet")["url"].to_pylist() == [rows["url"][0], rows["url"][5]]
    # a flag given on the command line beats the preset
    out = run_script("02_filter_metadata.py", "--meta", tmp_path / "meta", "--out", tmp_path / "f3",
                     "--preset", "phase2", "--max_watermark", "0.5").stdout
    assert summary_value(out, "kept") == 3
    # re-filtering into the same folder with other settings is refused, not silently mixed
    proc = run_script("02_filter_metadata.py", "--meta", tmp_path / "meta", "--out", tmp_path / "f3",
                      "--preset", "phase1", check=False)
    assert proc.returncode == 1 and "other settings" in proc.stderr


def test_filter_needs_its_columns(tmp_path):
    write_parquet(tmp_path / "meta" / "a.parquet", {"url": ["http://x/1.jpg"], "caption": ["a red house"]})
    proc = run_script("02_filter_metadata.py", "--meta", tmp_path / "meta", "--out", tmp_path / "f",
                      "--min_aesthetic", "5", check=False)
    assert proc.returncode == 1 and "needs column 'aesthetic'" in proc.stderr
    out = run_script("02_filter_metadata.py", "--meta", tmp_path / "meta", "--out", tmp_path / "g").stdout
    assert summary_value(out, "kept") == 1


def test_build_dataset_without_validation_rows(tmp_path):
    """A split with no rows is left out (datasets.load_from_disk cannot open an empty one); the trainer
    then reports 'no split' and trains without a validation loss."""
    write_parquet(tmp_path / "tok" / "a.parquet", {"image_key": ["k0", "k1", "k0"], "caption": ["a b", "c d", "a b"],
                                                   "input_ids": [[1] * 77, [2] * 77, [1] * 77]})
    out = run_script("05_build_hf_dataset.py", "--batches", tmp_path / "tok", "--out", tmp_path / "hf",
                     "--val_fraction", "0", "--preview", 0).stdout
    assert summary_value(out, "train") == 2 and summary_value(out, "validation") == 0
    assert summary_value(out, "skipped: duplicate key") == 1
    assert len(sd_latents.open_captions(tmp_path / "hf", "train")) == 2
    from SD_Model import UserError
    with pytest.raises(UserError, match="no split 'validation'"):
        sd_latents.open_captions(tmp_path / "hf", "validation")
