"""evaluate.py: the FID Inception network against the pt_inception-2015-12-05 file layout, the Frechet distance
against closed forms and pytorch-fid's sqrtm formula, CLIP score against CLIPModel's own cosine, prompt
files, and the CLI end to end on a tiny checkpoint (two guidance scales, resume, reference stats, --shapes)."""
import contextlib
import io
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import SD_Model as M
import evaluate as E
from conftest import ROOT
from sd_common import run_main
from tiny_models import save_tiny_clip, save_tiny_tokenizer, save_tiny_vae


def random_inception(seed=0):
    """Random FID Inception whose activations keep their scale through ~40 conv layers (He init), so
    features of different images really differ."""
    torch.manual_seed(seed)
    model = E.FIDInceptionV3().eval()
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return model


def random_images(n, size, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fid") / E.INCEPTION_FILE
    torch.save(random_inception().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def tiny_clip_model(tmp_path_factory):
    """A random CLIPModel (text + vision) with its tokenizer and the hub's legacy preprocessor_config.json."""
    from transformers import CLIPConfig, CLIPModel
    root = tmp_path_factory.mktemp("clip")
    tok = save_tiny_tokenizer(root)
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
                     vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2),
                     projection_dim=16)
    CLIPModel(cfg).eval().save_pretrained(root)
    (root / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 32, "do_center_crop": True, "do_normalize": True, "do_resize": True, "resample": 3,
        "feature_extractor_type": "CLIPFeatureExtractor", "size": 32,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    return root


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """Our slim checkpoint as SD_Train writes it: a random 'small' UNet at 32 px naming a tiny VAE and CLIP."""
    root = tmp_path_factory.mktemp("ckpt")
    clip, vae = save_tiny_clip(root / "clip"), save_tiny_vae(root / "vae")
    torch.manual_seed(0)
    unet = M.UNet(M.unet_config("small"))
    for name, p in unet.named_parameters():   # strong cross-attention so that prompts visibly matter
        torch.nn.init.normal_(p, std=1.0 if "attn2" in name else 0.1)
    meta = M.checkpoint_meta("small", M.NoiseSchedule(), vae, M.FrozenVAE(vae).scaling_factor, clip, "last", 32)
    M.save_unet(unet.state_dict(), "small", root / "tiny.safetensors", "ours", meta)
    return root / "tiny.safetensors"


# --------------------------------------------------------------------------- FID Inception network

def test_inception_has_the_pt_inception_layout_and_loads_strictly(inception_file, tmp_path):
    sd = E.FIDInceptionV3().state_dict()
    # Names and shapes of pytorch-fid's pt_inception-2015-12-05-6726825d.pth (torchvision's Inception3 with
    # the FID blocks, 1008 TF classes, no aux head).
    known = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_1a_3x3.bn.running_var": (32,),
             "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3), "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
             "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
             "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
             "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
             "Mixed_7b.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
             "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1), "fc.weight": (1008, 2048), "fc.bias": (1008,)}
    assert {k: tuple(sd[k].shape) for k in known} == known
    assert not any(k.startswith("AuxLogits") for k in sd)
    # torchvision's inception_v3 count (27,161,264) less the aux head (3,326,696) plus 8 more classes (16,392)
    assert sum(p.numel() for p in E.FIDInceptionV3().parameters()) == 23_850_960

    model = E.load_inception(str(inception_file))
    saved = torch.load(inception_file, weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    feats = E.inception_features(model, random_images(2, 40, 0))
    assert feats.shape == (2, 2048) and feats.dtype == np.float64 and np.isfinite(feats).all()

    saved["Mixed_7c.pool.weight"] = saved.pop("Mixed_7c.branch_pool.conv.weight")
    torch.save(saved, tmp_path / "renamed.pth")
    with pytest.raises(M.UserError, match="not the pt_inception-2015-12-05 FID network.*Mixed_7c"):
        E.load_inception(str(tmp_path / "renamed.pth"))
    for missing in (str(tmp_path / "missing.pth"), "weights/pt_inception.pth"):   # a file, not a hub repo
        with pytest.raises(M.UserError, match="do not exist; download https://github.com/mseitzer"):
            E.load_inception(missing)


def test_fid_quirks_tf_pooling():
    """The FID blocks' pooling differs from torchvision's exactly at the border: TF's average ignores padding,
    and Mixed_7c max-pools."""
    x = torch.ones(1, 4, 5, 5)
    assert torch.equal(E.tf_avg_pool(x), x)                 # count_include_pad=True would give 4/9 in the corners
    torch.manual_seed(0)
    block = E.InceptionE(4, pool="max").eval()
    y = torch.randn(1, 4, 6, 6)
    by_hand = block.branch_pool(torch.nn.functional.max_pool2d(y, 3, stride=1, padding=1))
    assert torch.equal(block(y)[:, -192:], by_hand)


# --------------------------------------------------------------------------- Frechet distance

def test_frechet_distance_matches_closed_form_and_pytorch_fid_sqrtm():
    from scipy import linalg
    rng = np.random.default_rng(0)
    d = 12
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # Covariances with one eigenbasis: Tr (S1 S2)^1/2 = sum sqrt(a b), so FID = |dmu|^2 + sum (sqrt a - sqrt b)^2.
    closed = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = E.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert got == pytest.approx(closed, rel=1e-10)

    # General (non-commuting) covariances: pytorch-fid's formula with scipy's sqrtm.
    x, y = rng.normal(size=(200, 64)), rng.normal(size=(200, 64)) @ rng.normal(size=(64, 64)) * 0.3 + 0.5
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    m1, m2 = x.mean(0), y.mean(0)
    ref = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert E.frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-8)


def test_fid_of_a_set_with_itself_is_zero_and_a_shift_adds_its_square():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32))
    mu, sigma = E.feature_stats(feats)
    assert abs(E.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)
    shift = rng.normal(size=32)
    assert E.frechet_distance(mu, sigma, *E.feature_stats(feats + shift)) == pytest.approx(shift @ shift, rel=1e-9)
    assert E.fid(feats + shift, mu, sigma) == pytest.approx(shift @ shift, rel=1e-9)
    # Fewer images than dimensions (every small run): fid's N x N route equals the D x D one, and a set
    # against its own rank-deficient statistics is still 0.
    few = feats[:6]
    assert E.fid(few, mu, sigma) == pytest.approx(E.frechet_distance(mu, sigma, *E.feature_stats(few)), rel=1e-9)
    assert abs(E.fid(few, *E.feature_stats(few))) < 1e-9 * np.trace(sigma)
    assert E.fid(few + shift, *E.feature_stats(few)) == pytest.approx(shift @ shift, rel=1e-9)


def test_fid_through_inception_grows_when_images_shift(inception_file, tmp_path):
    model = E.load_inception(str(inception_file))
    images = random_images(4, 48, 2)
    brighter = np.clip(images.astype(int) + 60, 0, 255).astype(np.uint8)
    feats = E.inception_features(model, images)
    stats = E.feature_stats(feats)
    fid_self, fid_shift = E.fid(feats, *stats), E.fid(E.inception_features(model, brighter), *stats)
    assert fid_shift > 0 and abs(fid_self) < 1e-9 * fid_shift
    E.save_stats(tmp_path / "s.npz", *stats)
    with np.load(tmp_path / "s.npz") as f:                # pytorch-fid's file layout
        assert set(f.files) == {"mu", "sigma"} and np.array_equal(f["sigma"], stats[1])
    assert all(np.array_equal(x, y) for x, y in zip(E.load_stats(tmp_path / "s.npz"), stats))


# --------------------------------------------------------------------------- CLIP score

def test_clip_score_is_100_times_clamped_cosine_of_clipmodel(tiny_clip_model):
    from transformers import CLIPModel, CLIPTokenizer
    scorer = E.ClipScore(tiny_clip_model)
    images = random_images(4, 32, 3)
    words = ["a red circle", "a blue square on a white background", "green triangle", "a cat in the city at night"]
    pairs = [(i, w) for i in range(4) for w in words]
    got = scorer(images[[i for i, _ in pairs]], [w for _, w in pairs])

    model, tok = CLIPModel.from_pretrained(tiny_clip_model).eval(), CLIPTokenizer.from_pretrained(tiny_clip_model)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    cos = []
    with torch.no_grad():
        for i, w in pairs:   # one unpadded caption at a time; 32 px images need no resize or crop
            pixels = (torch.from_numpy(images[i]).permute(2, 0, 1)[None].float() / 255 - mean) / std
            out = model(input_ids=tok(w, return_tensors="pt").input_ids, pixel_values=pixels)
            cos.append(float((out.image_embeds * out.text_embeds).sum()))   # both L2-normalised by CLIPModel
    cos = np.array(cos)
    assert (cos > 0).any() and (cos < 0).any()            # both sides of the clamp are exercised
    np.testing.assert_allclose(got, 100 * np.maximum(cos, 0), atol=1e-4)


def test_clip_score_refuses_a_text_encoder_alone(tiny_ckpt):
    """transformers would load an SD text encoder folder as a CLIPModel with a random vision tower."""
    with pytest.raises(M.UserError, match="not a whole CLIP model .* weights missing, e.g. "):
        E.ClipScore(tiny_ckpt.parent / "clip")


# --------------------------------------------------------------------------- prompt files

def test_prompt_files_txt_coco_csv_tsv_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "p.txt").write_text("a red circle\n\n  a blue square \n")
    assert E.read_prompts(tmp_path / "p.txt") == ["a red circle", "a blue square"]
    coco = {"images": [], "annotations": [{"image_id": 7, "id": 1, "caption": "a dog"},
                                          {"image_id": 3, "id": 2, "caption": "a cat"},
                                          {"image_id": 7, "id": 3, "caption": "a dog again"}]}
    (tmp_path / "captions_val2014.json").write_text(json.dumps(coco))
    assert E.read_prompts(tmp_path / "captions_val2014.json") == ["a dog", "a cat"]   # one caption per image
    (tmp_path / "p.csv").write_text('id,caption\n1,"a man, a woman"\n2,a car\n')
    assert E.read_prompts(tmp_path / "p.csv") == ["a man, a woman", "a car"]
    (tmp_path / "p.tsv").write_text("id\timage_id\tcaption\n0\t9\ta forest\n")   # MLPerf's captions layout
    assert E.read_prompts(tmp_path / "p.tsv") == ["a forest"]
    pq.write_table(pa.table({"text": ["a portrait", None, "a city"]}), tmp_path / "p.parquet")
    assert E.read_prompts(tmp_path / "p.parquet", "text") == ["a portrait", "a city"]
    with pytest.raises(M.UserError, match="no column 'caption'.*--caption_column"):
        E.read_prompts(tmp_path / "p.parquet")


# --------------------------------------------------------------------------- CLI end to end

def evaluate_argv(tmp_path, ckpt, *extra):
    return ["--ckpt", str(ckpt), "--steps", "2", "--batch_size", "2", "--out", str(tmp_path / "eval"), *extra]


def evaluate(tmp_path, ckpt, *extra):
    """evaluate.py's command line run in this process as its __main__ runs it (run_main: one-line error, exit
    status), without a new process's imports; an unexpected exception fails the test outright."""
    out_buf, err_buf, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out_buf), contextlib.redirect_stderr(err_buf):
        try:
            run_main(E.main, E.build_parser().parse_args(evaluate_argv(tmp_path, ckpt, *extra)))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return SimpleNamespace(returncode=code, stdout=out_buf.getvalue(), stderr=err_buf.getvalue())


def evaluate_script(tmp_path, ckpt, *extra, env=None):
    """The real script in its own process."""
    cmd = [sys.executable, "evaluate.py", *evaluate_argv(tmp_path, ckpt, *extra)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    (root / "prompts.txt").write_text("a red circle on a gray background\na cat in the forest\n")
    (root / "ref").mkdir()
    for i, (w, h) in enumerate([(48, 40), (32, 32), (40, 56)]):   # any shape: centre-cropped
        Image.fromarray(random_images(1, max(w, h), 10 + i)[0][:h, :w]).save(root / "ref" / f"{i}.jpg")
    return root


def test_cli_two_guidance_scales_results_table_and_resume(tiny_ckpt, tiny_clip_model, inception_file, eval_inputs,
                                                          tmp_path):
    def run(ref, *extra):
        return evaluate(tmp_path, tiny_ckpt, "--prompts", str(eval_inputs / "prompts.txt"), "--num_images", "3",
                        "--guidance_scales", "1", "4", "--ref_images", str(ref), "--inception", str(inception_file),
                        "--clip", str(tiny_clip_model), *extra)

    r = run(eval_inputs / "ref", "--save_ref_stats", str(tmp_path / "ref.npz"))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "eval"
    for scale in ("1", "4"):
        names = sorted(p.name for p in (out / f"cfg_{scale}").iterdir())
        assert names == ["00000.png", "00001.png", "00002.png"]
    assert Image.open(out / "cfg_4" / "00002.png").text["prompt"] == "a red circle on a gray background"   # cycled
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(row["guidance_scale"], row["images"], row["generated"], row["reused"]) for row in rows] == \
        [(1.0, 3, 3, 0), (4.0, 3, 3, 0)]
    assert all(row["fid"] > 0 and 0 <= row["clip_score"] <= 100 for row in rows)
    table = (out / "results.md").read_text()
    assert table.splitlines()[0] == "| guidance | images | generated | reused | FID | CLIP score |"
    assert f"| 4 | 3 | 3 | 0 | {rows[1]['fid']:.2f} | {rows[1]['clip_score']:.2f} |" in table and table in r.stdout
    assert (out / "results.csv").read_text().splitlines()[0] == "guidance_scale,images,generated,reused,fid,clip_score"

    # Rerun on the saved reference statistics with one image lost: only it is drawn again, pixel for pixel.
    lost = out / "cfg_4" / "00001.png"
    before = np.asarray(Image.open(lost))
    lost.unlink()
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("cfg_*/*.png")}
    r = run(tmp_path / "ref.npz")
    assert r.returncode == 0, r.stderr
    again = json.loads((out / "results.json").read_text())["rows"]
    assert [(row["generated"], row["reused"]) for row in again] == [(0, 3), (1, 2)]
    assert np.array_equal(np.asarray(Image.open(lost)), before)
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    for a, b in zip(rows, again):
        assert b["fid"] == pytest.approx(a["fid"], rel=1e-9) and b["clip_score"] == pytest.approx(a["clip_score"])

    # Other sampling settings into the same folder would mix two evaluations: refused.
    r = run(tmp_path / "ref.npz", "--steps", "3")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "{'steps': (2, 3)}" in r.stderr


@pytest.mark.parametrize("extra,message", [
    (["--clip", "./no_such_clip"], "CLIP model folder './no_such_clip' does not exist"),
    (["--inception", "someone/fid-inception"], "weights 'someone/fid-inception' is not in the local Hugging Face cache"),
    (["--ref_images", "nowhere"], "neither a folder of images nor a statistics .npz"),
])
@pytest.mark.slow
def test_bad_input_gives_one_clear_error(tiny_ckpt, tiny_clip_model, inception_file, eval_inputs, tmp_path, extra,
                                         message):
    r = evaluate_script(tmp_path, tiny_ckpt, "--prompts", str(eval_inputs / "prompts.txt"), "--ref_images",
                 str(eval_inputs / "ref"), "--clip", str(tiny_clip_model), "--inception", str(inception_file), *extra,
                 env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and message in r.stderr, r.stderr


def test_cli_shapes_prints_one_prompt_following_line(tiny_ckpt, tmp_path):
    r = evaluate(tmp_path, tiny_ckpt, "--shapes", "--shapes_seeds", "1", "--batch_size", "8")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("ddim x8:   0%|          | 0/2") == 3      # a steps bar per batch of 8 images
    lines = [line for line in r.stdout.splitlines() if line.startswith("prompt-following:")]
    assert len(lines) == 1 and re.fullmatch(r"prompt-following: color [01]\.\d\d shape [01]\.\d\d", lines[0])
    color, shape = map(float, re.findall(r"\d\.\d\d", lines[0]))
    assert 0 <= color <= 1 and 0 <= shape <= 1
    assert len(list((tmp_path / "eval" / "shapes").glob("*.png"))) == 24   # 8 colors x 3 shapes, one seed each


def test_cli_shapes_at_another_aspect(tiny_ckpt, tmp_path):
    """The bucketed demo's score: the same rule on images drawn at --width x --height (not centre-cropped back to a
    square); the other evaluations compare square images, so there the flags are one line."""
    r = evaluate(tmp_path, tiny_ckpt, "--shapes", "--shapes_seeds", "1", "--batch_size", "8", "--width", "48")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^prompt-following: color [01]\.\d\d shape [01]\.\d\d \(48x32\)$", r.stdout, re.M), r.stdout
    images = sorted((tmp_path / "eval" / "shapes").glob("*.png"))
    assert len(images) == 24 and {Image.open(p).size for p in images} == {(48, 32)}
    r = evaluate(tmp_path, tiny_ckpt, "--prompts", "p.txt", "--width", "48")
    assert r.returncode == 1 and "--height / --width draw the demo's shapes at another aspect" in r.stderr
