"""End to end: generated images served on 127.0.0.1 -> 02 -> 03 (real img2dataset) -> 04 -> 05 ->
encode_latents with a tiny local VAE, exact counts at every step and the preview each writes, then a second run that
redoes nothing."""
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import SD_Model
import sd_data
import sd_latents
from data_fixtures import (LoopbackServer, bad_image_bytes, good_jpeg, laion_rows, natural_image, preview_contents,
                           run_script, summary_value, to_bytes, write_parquet, write_tar)
from tiny_models import save_tiny_tokenizer, save_tiny_vae

pytestmark = pytest.mark.slow                     # every test here runs the real scripts


RES = 64
N_GOOD_JPEG, N_GOOD_PNG = 20, 4
SERVED_OK = ["cmyk_jpeg", "png16", "alpha_png"]          # awkward but decodable: img2dataset keeps them
RESIZE_FAIL = ["html", "empty", "truncated_jpeg", "tiny", "huge"]  # img2dataset's decode/size checks drop them
DOWNLOAD_FAIL = ["missing", "slow", "robots"]             # 404, timeout, X-Robots-Tag: noai
WORDS = "a photo of red house number awkward broken image extra sample".split()


def build_inputs(root, base_url):
    """Images in root/www, LAION-schema metadata in root/meta (two shards, with variant column names)."""
    www = root / "www"
    www.mkdir()
    urls = []
    sizes = [(96, 80), (80, 112), (200, 120), (72, 72)]
    for i in range(N_GOOD_JPEG):
        w, h = sizes[i % len(sizes)]
        (www / f"good{i}.jpg").write_bytes(good_jpeg(i, w, h))
        urls.append(f"{base_url}/good{i}.jpg")
    for i in range(N_GOOD_PNG):
        (www / f"goodpng{i}.png").write_bytes(to_bytes(natural_image(90, 70, 100 + i), "PNG"))
        urls.append(f"{base_url}/goodpng{i}.png")
    for kind in SERVED_OK + RESIZE_FAIL:
        ext = "png" if "png" in kind or kind == "tiny" else "jpg"  # html and empty are served as .jpg
        (www / f"{kind}.{ext}").write_bytes(bad_image_bytes(kind))
        urls.append(f"{base_url}/{kind}.{ext}")
    urls += [f"{base_url}/missing.jpg", f"{base_url}/slow/good0.jpg", f"{base_url}/robots/good1.jpg"]
    n_served = len(urls)

    rows = laion_rows(n_served, caption=[f"a photo of red house number {i}" for i in range(n_served)], url=urls)
    # rows that 02 must drop, one per filter, in funnel order
    dropped = {"aesthetic": 6.0, "similarity": 0.2, "width": 300, "height": 200, "pwatermark": 0.9, "punsafe": 0.9}
    for col, bad in dropped.items():
        extra = laion_rows(1, seed=col)
        extra[col] = [bad]
        for k in rows:
            rows[k] += extra[k]
    for cap in [None, "  ", "IMG_0042.JPG", "ok"]:  # missing, blank, file name, too short
        extra = laion_rows(1, seed=f"cap{cap}", caption=[cap])
        for k in rows:
            rows[k] += extra[k]
    for k in rows:  # duplicates: same URL as row 0, and same LAION hash as row 1
        rows[k] += [rows[k][0]] + ([rows[k][1]] if k == "hash" else [f"{rows[k][1]}?dup" if k == "url" else rows[k][1]])
    n = len(rows["url"])
    # two shards; the second uses laion2B-en's upper-case spellings, which 01 normalises
    half = n // 2
    upper = {"url": "URL", "caption": "TEXT", "width": "WIDTH", "height": "HEIGHT", "similarity": "similarity",
             "punsafe": "punsafe", "pwatermark": "pwatermark", "aesthetic": "AESTHETIC_SCORE", "hash": "hash"}
    write_parquet(root / "raw" / "part-00000.parquet", {k: v[:half] for k, v in rows.items()})
    write_parquet(root / "raw" / "part-00001.parquet", {upper[k]: v[half:] for k, v in rows.items()})
    return n, n_served


def mtimes(folder, pattern):
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.rglob(pattern))}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    # scaling factor 0.5, not SD's 0.18215: proves the pipeline reads it from the VAE's config
    save_tiny_vae(d / "vae", scaling_factor=0.5)
    save_tiny_tokenizer(d / "tok", WORDS)
    return str(d / "vae"), str(d / "tok")


def test_pipeline_end_to_end(tmp_path, models):
    vae_dir, tok_dir = models
    d = {k: tmp_path / k for k in ("meta", "filtered", "tars", "tokens", "hf", "latents")}
    with LoopbackServer(tmp_path / "www", slow_seconds=4) as server:
        n_rows, n_served = build_inputs(tmp_path, server.url)

        # 01: normalise the two shards' column names
        out = run_script("01_download_metadata.py", "--source", tmp_path / "raw", "--out", d["meta"]).stdout
        assert summary_value(out, "rows") == n_rows
        for p in sorted(d["meta"].glob("*.parquet")):
            assert {"url", "caption", "aesthetic", "width"} <= set(pq.read_schema(p).names)

        # 02: phase-1 preset; the funnel drops exactly one row per filter, four captions, two duplicates
        out = run_script("02_filter_metadata.py", "--meta", d["meta"], "--out", d["filtered"], "--preset", "phase1").stdout
        assert summary_value(out, "rows in") == n_rows
        assert summary_value(out, "aesthetic >= 6.5") == n_rows - 1
        assert summary_value(out, "similarity >= 0.28") == n_rows - 2
        assert summary_value(out, "width >= 512") == n_rows - 3
        assert summary_value(out, "height >= 512") == n_rows - 4
        assert summary_value(out, "pwatermark < 0.5") == n_rows - 5
        assert summary_value(out, "punsafe < 0.5") == n_rows - 6
        assert summary_value(out, "caption ok") == n_rows - 10
        assert summary_value(out, "skipped: no caption") == 2
        assert summary_value(out, "skipped: caption is a file name") == 1
        assert summary_value(out, "skipped: caption too short") == 1
        assert summary_value(out, "kept") == n_served
        kept_urls = [u for p in sorted(d["filtered"].glob("*.parquet")) for u in pq.read_table(p)["url"].to_pylist()]
        assert len(kept_urls) == len(set(kept_urls)) == n_served

        # 03: real img2dataset over loopback
        out = run_script("03_download_images.py", "--meta", d["filtered"], "--out", d["tars"], "--resolution", RES,
                         "--processes", 1, "--threads", 8, "--shard_size", 12, "--timeout", 2,
                         "--min_image_size", 32, "--max_image_area", 4e6, "--preview", 8).stdout
        n_ok = N_GOOD_JPEG + N_GOOD_PNG + len(SERVED_OK)
        assert summary_value(out, "urls in") == n_served
        assert summary_value(out, "kept (downloaded + resized)") == n_ok
        assert summary_value(out, "skipped: download failed") == len(DOWNLOAD_FAIL)
        assert summary_value(out, "skipped: decode/resize failed") == len(RESIZE_FAIL)
        assert "Use of image disallowed by X-Robots-Tag directive" in out
        tars = sorted(d["tars"].glob("*.tar"))
        assert len(tars) == 3  # 35 urls / 12 per shard, across two input files
        tar_mtimes = mtimes(d["tars"], "*.tar")

        # its preview: the 8 samples whose keys rank first for seed 0 (3 shards: all read), as stored, captioned
        samples = {k: s for t in tars for k, s in sd_data.iter_tar_samples(t)}
        keys, captions, tiles = preview_contents(d["tars"] / "preview.png", sd_data.PREVIEW_TILE)
        assert keys == sorted(samples, key=lambda k: sd_data.preview_rank(k, 0))[:8]
        assert captions == [sd_data.sample_caption(samples[k]) for k in keys]
        for k, tile in zip(keys, tiles):
            want = sd_data.load_image_square(sd_data.sample_image(samples[k]), sd_data.PREVIEW_TILE, min_size=1)
            assert np.array_equal(tile, want), k
        preview_bytes = (d["tars"] / "preview.png").read_bytes()

        # a second 03 run downloads nothing (img2dataset's incremental mode)
        out = run_script("03_download_images.py", "--meta", d["filtered"], "--out", d["tars"], "--resolution", RES,
                         "--processes", 1, "--threads", 8, "--shard_size", 12, "--timeout", 2,
                         "--min_image_size", 32, "--max_image_area", 4e6, "--preview", 8).stdout
        assert summary_value(out, "shards downloaded now") == 0
        assert mtimes(d["tars"], "*.tar") == tar_mtimes
        assert (d["tars"] / "preview.png").read_bytes() == preview_bytes     # seeded: the same samples again

    # damage the data as the wild does: cut the last shard inside its last image, and add a hand-made shard
    # with a sample without caption and an HTML page saved as .jpg
    last = tars[-1]
    with tarfile.open(last) as tf:
        members = tf.getmembers()
    last_key = members[-1].name.split(".")[0]
    first_of_last = min(m.offset_data for m in members if m.name.startswith(last_key))
    last.write_bytes(last.read_bytes()[:first_of_last + 100])
    write_tar(d["tars"] / "99999.tar", {
        "extra0.jpg": to_bytes(natural_image(80, 80, 7), "JPEG"), "extra0.txt": b"an extra sample",
        "nocap1.jpg": to_bytes(natural_image(80, 80, 8), "JPEG"),
        "html2.jpg": bad_image_bytes("html"), "html2.txt": b"a broken image",
    })
    n_tar_samples = n_ok - 1 + 3

    # 04: captions + token ids
    out = run_script("04_preprocess_to_cache.py", "--tars", d["tars"], "--out", d["tokens"], "--text_encoder", tok_dir,
                     "--workers", 2).stdout
    assert summary_value(out, "truncated tar") == 1
    assert summary_value(out, "samples in") == n_tar_samples
    assert summary_value(out, "skipped: no caption") == 1
    assert summary_value(out, "skipped: not an image") == 1
    n_captioned = n_tar_samples - 2
    assert summary_value(out, "kept") == n_captioned
    tokens = [r for p in sorted(d["tokens"].glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert len(tokens) == n_captioned
    tok = SD_Model.load_tokenizer(tok_dir)
    expect_ids = SD_Model.tokenize(tok, [r["caption"] for r in tokens]).tolist()
    assert [r["input_ids"] for r in tokens] == expect_ids
    assert all(len(r["input_ids"]) == 77 for r in tokens)
    assert any(r["caption"] == "an extra sample" for r in tokens)

    # 05: DatasetDict with a deterministic split
    out = run_script("05_build_hf_dataset.py", "--batches", d["tokens"], "--out", d["hf"], "--val_fraction", 0.25,
                     "--tars", d["tars"], "--preview", 6, "--preview_seed", 1).stdout
    train, val = sd_latents.open_captions(d["hf"], "train"), sd_latents.open_captions(d["hf"], "validation")
    assert len(train) + len(val) == n_captioned
    assert summary_value(out, "validation") == len(val) > 0 and len(train) > 0
    assert all(sd_data.is_validation_key(k, 0.25) for k in val["image_key"])
    assert not any(sd_data.is_validation_key(k, 0.25) for k in train["image_key"])
    assert list(train["image_key"]) == sorted(train["image_key"])      # key order, whatever the download order
    assert len(train[0]["input_ids"]) == 77
    # its preview: rows of either split (seed 1), each with its image from the tars and the dataset's caption
    rows = dict(zip([*train["image_key"], *val["image_key"]], [*train["caption"], *val["caption"]]))
    samples = {k: s for t in sorted(d["tars"].glob("*.tar")) for k, s in sd_data.iter_tar_samples(t)}
    keys, captions, tiles = preview_contents(d["hf"] / "preview.png", sd_data.PREVIEW_TILE)
    assert keys == sorted(rows, key=lambda k: sd_data.preview_rank(k, 1))[:6]
    assert captions == [rows[k] for k in keys]
    for k, tile in zip(keys, tiles):
        want = sd_data.load_image_square(sd_data.sample_image(samples[k]), sd_data.PREVIEW_TILE, min_size=1)
        assert np.array_equal(tile, want), k

    # encode_latents: the tiny VAE on CPU
    enc_args = ["--tars", d["tars"], "--out", d["latents"], "--vae", vae_dir, "--resolution", RES, "--device", "cpu",
                "--workers", 2, "--batch_size", 4, "--chunk_size", 3, "--preview", 5]
    out = run_script("encode_latents.py", *enc_args).stdout
    n_latents = n_tar_samples - 2  # neither the HTML page nor the uncaptioned image (04 drops it too)
    assert summary_value(out, "samples in") == n_tar_samples
    assert summary_value(out, "truncated tar") == 1
    assert summary_value(out, "skipped: not an image") == 1
    assert summary_value(out, "skipped: no caption") == 1
    assert summary_value(out, "encoded now") == n_latents
    info = sd_latents.load_latent_info(d["latents"])
    vae = SD_Model.FrozenVAE(vae_dir)
    assert info == {"vae": vae_dir, "scaling_factor": 0.5, "resolution": RES, "latent_shape": [4, RES // 8, RES // 8],
                    "dtype": "float16", "count": n_latents}
    assert len(sd_latents.existing_latent_keys(d["latents"])) == n_latents
    # latents and captions hold the same keys: the same usable-sample check in 04 and encode_latents
    assert sd_latents.existing_latent_keys(d["latents"]) == set(train["image_key"]) | set(val["image_key"])

    # the stored latents are exactly what the VAE gives for the same preprocessed image (fp16 tolerance),
    # and decode to the same images
    samples = {k: s for t in sorted(d["tars"].glob("*.tar")) for k, s in sd_data.iter_tar_samples(t)}
    keys = sorted(k for k in samples if k != "html2")[:6]
    images = np.stack([sd_data.load_image_square(sd_data.sample_image(samples[k]), RES) for k in keys])
    direct = vae.encode(sd_data.images_to_tensor(torch.from_numpy(images)))
    stored = torch.from_numpy(np.stack([sd_latents.read_latent(d["latents"], k) for k in keys]))
    assert stored.dtype == torch.float16 and stored.shape == (6, 4, RES // 8, RES // 8)
    torch.testing.assert_close(stored.float(), direct, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(vae.decode(stored.float()), vae.decode(direct.half().float()), rtol=1e-4, atol=1e-4)

    # its preview: the 5 samples ranking first, each source image beside the VAE's decode of its stored latent
    keys, captions, tiles = preview_contents(d["latents"] / "preview.png", 2 * sd_data.PREVIEW_TILE)
    assert keys == sorted(sd_latents.existing_latent_keys(d["latents"]), key=lambda k: sd_data.preview_rank(k, 0))[:5]
    assert captions == [sd_data.sample_caption(samples[k]) for k in keys]
    decoded = vae.decode_images(torch.from_numpy(np.stack([sd_latents.read_latent(d["latents"], k) for k in keys])))
    for k, tile, dec in zip(keys, tiles, decoded):
        src = sd_data.load_image_square(sd_data.sample_image(samples[k]), RES)
        assert np.array_equal(tile[:, :sd_data.PREVIEW_TILE], sd_data.resize_center_crop(src, sd_data.PREVIEW_TILE))
        diff = np.abs(tile[:, sd_data.PREVIEW_TILE:].astype(int) - sd_data.resize_center_crop(dec, sd_data.PREVIEW_TILE))
        assert diff.max() <= 2, k                                    # the batch of the script vs this one

    # second run of every step: nothing redone, outputs untouched
    lat_mtimes = mtimes(d["latents"], "*.npy")
    tok_mtimes = mtimes(d["tokens"], "*.parquet")
    out = run_script("02_filter_metadata.py", "--meta", d["meta"], "--out", d["filtered"], "--preset", "phase1").stdout
    assert summary_value(out, "shards already done") == 2 and summary_value(out, "kept") == n_served
    out = run_script("04_preprocess_to_cache.py", "--tars", d["tars"], "--out", d["tokens"], "--text_encoder",
                     tok_dir).stdout
    assert summary_value(out, "shards already done") == len(tars) + 1 and mtimes(d["tokens"], "*.parquet") == tok_mtimes
    preview_mtime = (d["hf"] / "preview.png").stat().st_mtime_ns
    out = run_script("05_build_hf_dataset.py", "--batches", d["tokens"], "--out", d["hf"], "--val_fraction", 0.25,
                     "--preview", 0).stdout
    assert "nothing rebuilt" in out and (d["hf"] / "preview.png").stat().st_mtime_ns == preview_mtime   # 0: none
    out = run_script("encode_latents.py", *enc_args).stdout
    assert summary_value(out, "encoded now") == 0 and summary_value(out, "already encoded") == n_latents
    assert mtimes(d["latents"], "*.npy") == lat_mtimes

    # an interrupted encode (two latents missing) resumes with exactly those two, here as two torchrun-style
    # processes that split the shards between them
    for k in keys[:2]:
        sd_latents.latent_path(d["latents"], k).unlink()
    outs = [run_script("encode_latents.py", *enc_args, env={"RANK": str(r), "WORLD_SIZE": "2"}).stdout for r in (0, 1)]
    assert sum(summary_value(o, "encoded now") for o in outs) == 2
    assert sum(summary_value(o, "already encoded") for o in outs) == n_latents - 2
    assert summary_value(outs[1], "latents in folder") == n_latents
    assert json.loads((d["latents"] / "latent_info.json").read_text())["count"] == n_latents
    after = mtimes(d["latents"], "*.npy")
    assert {k: v for k, v in after.items() if k[:-4] not in keys[:2]} == \
        {k: v for k, v in lat_mtimes.items() if k[:-4] not in keys[:2]}


def test_download_on_spark_local(tmp_path):
    """03 --distributor pyspark: img2dataset's shards run as Spark tasks on local[2] (a real Spark, Java and its
    Python workers, which unpickle sd_data.RGB8Resizer from the files the script ships), over loopback. One run:
    resuming is img2dataset's shard bookkeeping, the same for every distributor (tested above)."""
    import cv2
    www = tmp_path / "www"
    www.mkdir()
    sources = {f"good{i}.jpg": good_jpeg(i) for i in range(7)}
    sources["rgb16.png"] = bad_image_bytes("png16")
    for name, data in sources.items():
        (www / name).write_bytes(data)
    with LoopbackServer(www) as server:
        urls = [f"{server.url}/{n}" for n in sources]
        write_parquet(tmp_path / "meta" / "a.parquet", laion_rows(len(urls), url=urls))
        args = ["--meta", tmp_path / "meta", "--out", tmp_path / "tars", "--resolution", RES, "--shard_size", 4,
                "--distributor", "pyspark", "--spark_master", "local[2]", "--threads", 4, "--min_image_size", 32]
        out = run_script("03_download_images.py", *args, timeout=240).stdout
        assert summary_value(out, "shards downloaded now") == 2
        assert summary_value(out, "kept (downloaded + resized)") == len(sources)
    stored = {json.loads(s["json"])["url"].rsplit("/", 1)[1]: s["jpg"]
              for t in sorted((tmp_path / "tars").glob("*.tar")) for _, s in sd_data.iter_tar_samples(t)}
    assert sorted(stored) == sorted(sources)
    for name, data in sources.items():                 # the 16-bit PNG too: RGB, looking like its source
        got = cv2.imdecode(np.frombuffer(stored[name], np.uint8), cv2.IMREAD_COLOR)[..., ::-1].astype(np.float32)
        assert np.abs(got - sd_data.load_image_square(data, RES, min_size=1)).mean() < 4.0


BUCKET_SOURCES = [(400, 300), (300, 600), (500, 500), (640, 360), (300, 400), (700, 300)]   # (w, h) served


def test_bucketed_download_and_encode(tmp_path, models):
    """03 --buckets keeps each image's aspect (shorter side to the base); encode_latents --buckets writes each latent
    at its nearest bucket's shape (the VAE of the cover-cropped image), records the bucket per key, resumes (a key
    written but not recorded, as a kill between the two leaves it, is encoded again); sd_latents.open_source reads
    what it wrote, and refuses it to a square run."""
    vae_dir, _ = models
    base, www = 256, tmp_path / "www"
    www.mkdir()
    for i, (w, h) in enumerate(BUCKET_SOURCES * 2):
        (www / f"{i}.jpg").write_bytes(good_jpeg(i, w, h))
    n = 2 * len(BUCKET_SOURCES)
    with LoopbackServer(www) as server:
        write_parquet(tmp_path / "meta" / "part-00000.parquet",
                      laion_rows(n, url=[f"{server.url}/{i}.jpg" for i in range(n)]))
        run_script("03_download_images.py", "--meta", tmp_path / "meta", "--out", tmp_path / "tars", "--buckets",
                   "--resolution", base, "--processes", 1, "--threads", 4, "--min_image_size", 64)
    samples = {k: s for t in sorted((tmp_path / "tars").glob("*.tar")) for k, s in sd_data.iter_tar_samples(t)}
    assert len(samples) == n
    for s in samples.values():                                                   # aspect kept, shorter side = base
        source = BUCKET_SOURCES[int(json.loads(s["json"])["url"].rsplit("/", 1)[1][:-4]) % len(BUCKET_SOURCES)]
        img = sd_data.decode_image(s["jpg"])
        assert min(img.shape[:2]) == base and abs(img.shape[1] / img.shape[0] - source[0] / source[1]) < 0.01
    proc = run_script("03_download_images.py", "--meta", tmp_path / "meta", "--out", tmp_path / "tars2", "--buckets",
                      "--resize_mode", "center_crop", check=False)
    assert proc.returncode == 1 and "--buckets keeps each image's aspect" in proc.stderr

    out = tmp_path / "latents"
    enc_args = ["--tars", tmp_path / "tars", "--out", out, "--vae", vae_dir, "--resolution", base, "--buckets",
                "--device", "cpu", "--workers", 1, "--batch_size", 3, "--min_image_size", 64]
    stdout = run_script("encode_latents.py", *enc_args).stdout
    buckets = sd_data.aspect_buckets(base, 64)                                     # the tiny VAE downsamples 8x
    info = sd_latents.load_latent_info(out)
    records = sd_latents.read_bucket_records(out)
    want = {k: sd_data.nearest_bucket(*sd_data.decode_image(s["jpg"]).shape[1::-1], buckets)
            for k, s in samples.items()}
    assert records == want and summary_value(stdout, "encoded now") == n
    assert info == {"vae": vae_dir, "scaling_factor": 0.5, "resolution": base, "dtype": "float16", "count": n,
                    "buckets": [list(b) for b in buckets], "latent_shapes": [[4, h // 8, w // 8] for w, h in buckets],
                    "bucket_counts": np.bincount(list(want.values()), minlength=len(buckets)).tolist()}
    assert sorted(set(want.values())) == list(range(len(buckets)))                 # every bucket is met
    vae = SD_Model.FrozenVAE(vae_dir)
    for key in sorted(samples)[:4]:
        b, img = sd_data.load_image_bucket(samples[key]["jpg"], buckets)
        direct = vae.encode(sd_data.images_to_tensor(torch.from_numpy(img[None])))[0]
        stored = sd_latents.read_latent(out, key, info["latent_shapes"][b])
        torch.testing.assert_close(torch.from_numpy(stored).float(), direct, rtol=2e-3, atol=2e-3)

    # resume: a key whose record was lost is encoded again, nothing else
    lost = sorted(records)[0]
    part = sd_latents.bucket_records_path(out, 0)
    part.write_text("".join(line + "\n" for line in part.read_text().splitlines() if not line.startswith(lost)))
    stdout = run_script("encode_latents.py", *enc_args).stdout
    assert summary_value(stdout, "encoded now") == 1 and summary_value(stdout, "already encoded") == n - 1
    assert sd_latents.read_bucket_records(out) == want

    # the training side: the same buckets, shapes and latents through open_source
    import datasets
    keys = sorted(samples)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image_key": keys, "input_ids": [[1] * 77] * n})}
                         ).save_to_disk(str(tmp_path / "captions"))
    spec = {"latents": str(out), "captions": str(tmp_path / "captions")}
    text = type("Text", (), {"max_length": 77})()
    source, dropped, orphans = sd_latents.open_source(spec, "train", base, 4, text, buckets=True)
    assert dropped == orphans == 0 and [want[k] for k in source.keys] == source.bucket.tolist()
    assert source.sizes == buckets and source.shapes == [(4, h // 8, w // 8) for w, h in buckets]
    with pytest.raises(sd_data.UserError, match="holds aspect-bucketed latents .* train on them with --buckets true"):
        sd_latents.open_source(spec, "train", base, 4, text)
