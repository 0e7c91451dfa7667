"""SD_ImageGen.py / inference.py against diffusers' StableDiffusionPipeline on a tiny random pipeline saved in
the diffusers layout, and the export formats round-tripped through diffusers."""
import contextlib
import functools
import io
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import SD_ImageGen
import SD_Model as M
from conftest import ROOT, diffusers_draw
from sd_common import run_main
from tiny_models import save_tiny_clip, save_tiny_vae

PROMPT, NEGATIVE, SEED, STEPS, CFG = "a red circle on a gray background", "blue", 3, 10, 7.5


@functools.lru_cache(maxsize=None)
def diffusers_image(folder, prompt=PROMPT, negative=NEGATIVE, seed=SEED, single_file=None):
    return diffusers_draw(folder, prompt, negative=negative, steps=STEPS, guidance_scale=CFG, seed=seed, size=64,
                          single_file=single_file)


def imagegen_argv(tmp_path, ckpt, *extra, out="img.png"):
    return ["--ckpt", str(ckpt), "--steps", str(STEPS), "--cfg", str(CFG), "--seed", str(SEED), "--height", "64",
            "--width", "64", "--out", str(tmp_path / out), *map(str, extra)]


def imagegen(tmp_path, ckpt, *extra, out="img.png"):
    """SD_ImageGen.py's command line run in this process, as its __main__ runs it (flags, run_main's one-line
    error, exit status), without paying the imports of a new process each time; an unexpected exception fails
    the test outright. test_the_real_script_* runs the script itself."""
    out_buf, err_buf, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out_buf), contextlib.redirect_stderr(err_buf):
        try:
            run_main(SD_ImageGen.main, SD_ImageGen.build_parser().parse_args(imagegen_argv(tmp_path, ckpt, *extra,
                                                                                          out=out)))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return SimpleNamespace(returncode=code, stdout=out_buf.getvalue(), stderr=err_buf.getvalue())


def imagegen_script(tmp_path, ckpt, *extra, out="img.png"):
    """The real script in its own process."""
    cmd = [sys.executable, "SD_ImageGen.py", *imagegen_argv(tmp_path, ckpt, *extra, out=out)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))


def test_imagegen_draws_diffusers_image(tiny_pipeline, tmp_path):
    r = imagegen(tmp_path, tiny_pipeline, "--prompt", PROMPT, "--negative", NEGATIVE)
    assert r.returncode == 0, r.stderr
    ours = np.asarray(Image.open(tmp_path / "img.png"), dtype=np.float64)
    ref = diffusers_image(tiny_pipeline)
    assert np.abs(ours - ref).mean() <= 0.5
    no_negative = diffusers_image(tiny_pipeline, negative="")
    assert np.abs(no_negative - ref).mean() > 2.0           # the negative prompt really changes the image
    info = Image.open(tmp_path / "img.png").text
    assert info["prompt"] == PROMPT and info["negative"] == NEGATIVE and info["seed"] == str(SEED)
    assert info["steps"] == str(STEPS) and info["guidance_scale"] == str(CFG) and info["checkpoint"] == str(tiny_pipeline)


def test_our_checkpoint_exports_to_diffusers_and_single_file(tiny_pipeline, tmp_path):
    """Our slim checkpoint (as SD_Train writes it) -> --export diffusers -> StableDiffusionPipeline draws our
    image; --export single-file -> diffusers' from_single_file and our load_unet read the same weights."""
    sd, cfg, _ = M.read_unet_state(tiny_pipeline)
    meta = M.checkpoint_meta(cfg, M.NoiseSchedule(), tiny_pipeline / "vae", 0.18215, tiny_pipeline, "last", 64)
    M.save_unet({k: v.half() for k, v in sd.items()}, cfg, tmp_path / "ours.safetensors", "ours", meta)
    r = imagegen(tmp_path, tmp_path / "ours.safetensors", "--prompt", PROMPT, "--negative", NEGATIVE)
    assert r.returncode == 0, r.stderr
    ours = np.asarray(Image.open(tmp_path / "img.png"), dtype=np.float64)

    for fmt, dst in [("diffusers", tmp_path / "exp"), ("single-file", tmp_path / "exp.safetensors")]:
        r = imagegen(tmp_path, tmp_path / "ours.safetensors", "--export", fmt, str(dst), "--export_dtype", "fp32")
        assert r.returncode == 0, r.stderr
    assert np.abs(diffusers_image(tmp_path / "exp") - ours).mean() <= 0.5
    assert np.abs(diffusers_image(tmp_path / "exp", single_file=tmp_path / "exp.safetensors") - ours).mean() <= 0.5
    back = M.load_unet(tmp_path / "exp.safetensors").state_dict()
    assert all(torch.equal(back[k], sd[k].half().float()) for k in sd)


@pytest.mark.slow
def test_grid_prompts_file_and_inference_front_end(tiny_pipeline, tmp_path):
    (tmp_path / "prompts.txt").write_text("a red circle\n\na blue square\n")
    r = imagegen(tmp_path, tiny_pipeline, "--prompts", str(tmp_path / "prompts.txt"), "--n", "3", "--grid")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "img.png").size == (3 * 64, 2 * 64)
    r = imagegen(tmp_path, tiny_pipeline, "--prompt", "a cat", "--n", "2", "--sampler", "ddpm")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "img_000.png").exists() and (tmp_path / "img_001.png").exists()
    cmd = [sys.executable, "inference.py", "--ckpt", str(tiny_pipeline), "--prompt", PROMPT, "--negative", NEGATIVE,
           "--steps", str(STEPS), "--seed", str(SEED), "--size", "64", "--out", str(tmp_path / "inf.png")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "(cpu)" in r.stdout, r.stderr
    same = np.asarray(Image.open(tmp_path / "inf.png"), dtype=np.float64)
    assert np.abs(same - diffusers_image(tiny_pipeline)).mean() <= 0.5   # negative prompt wired (the seed's bug)


def test_export_records_the_vaes_own_downsampling(tmp_path):
    """A VAE that downsamples 4x (the demo's): the diffusers export's sample_size is 64 px / 4 = 16 latents, and
    loading the export gives back 64 px, where a literal 8 gave 8 and 64 px images came out 32 px."""
    clip, vae = save_tiny_clip(tmp_path / "clip"), save_tiny_vae(tmp_path / "vae", channels=(8, 16, 16))
    assert M.FrozenVAE(vae).factor == 4
    meta = M.checkpoint_meta("small", M.NoiseSchedule(), vae, 1.0, clip, "last", 64)
    M.save_unet(M.UNet(M.unet_config("small")).initialize_weights().state_dict(), "small",
                tmp_path / "ours.safetensors", "ours", meta)
    r = imagegen(tmp_path, tmp_path / "ours.safetensors", "--export", "diffusers", str(tmp_path / "exp"))
    assert r.returncode == 0, r.stderr
    import json
    assert json.loads((tmp_path / "exp" / "unet" / "config.json").read_text())["sample_size"] == 16
    assert M.load_pipeline(tmp_path / "exp").meta["resolution"] == 64
    r = imagegen(tmp_path, tmp_path / "exp", "--prompt", "a red circle", "--steps", "2")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "img.png").size == (64, 64)


@pytest.mark.parametrize("extra,message", [
    (["--prompt", "x", "--height", "60"], "height must be a multiple of 8 (the VAE's downsampling), got 60"),
    (["--prompt", "x", "--height", "-64"], "height must be positive, got -64"),
    (["--prompt", "x", "--sampler", "euler"], "unknown sampler 'euler'"),
    (["--prompt", "x", "--steps", "0"], "steps must be at least 1, got 0"),
    (["--prompt", "x", "--steps", "-5"], "steps must be at least 1, got -5"),
    (["--prompt", "x", "--n", "0"], "images per prompt must be at least 1"),
    (["--prompt", "x", "--device", "cuda"], "torch sees no CUDA device"),
    ([], "no prompt"),
])
def test_bad_input_gives_one_clear_error(tiny_pipeline, tmp_path, extra, message):
    r = imagegen(tmp_path, tiny_pipeline, *extra)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and message in r.stderr


@pytest.mark.slow
def test_the_real_script_gives_one_line_for_a_missing_or_wrong_checkpoint(tmp_path):
    r = imagegen_script(tmp_path, tmp_path / "nope.pt", "--prompt", "x")
    assert r.returncode != 0 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "wrong.pt").write_bytes(b"garbage")
    r = imagegen_script(tmp_path, tmp_path / "wrong.pt", "--prompt", "x")
    assert r.returncode != 0 and "not a readable weights file" in r.stderr and "Traceback" not in r.stderr


def test_long_prompt_is_truncated_with_warning(tiny_pipeline, tmp_path):
    r = imagegen(tmp_path, tiny_pipeline, "--prompt", " ".join(["red"] * 100), "--steps", "2")
    assert r.returncode == 0 and "truncated to 77 tokens" in r.stdout


def test_default_fp16_export_loads_with_plain_from_pretrained_and_slow_tokenizer(tiny_pipeline, tmp_path):
    """Users load exports with no extra arguments: every part in one dtype (the fp16 text encoder's config once
    made transformers load it in fp16 beside diffusers' fp32 UNet: 'mat1 and mat2 must have the same dtype'),
    and the tokenizer folder also has vocab.json + merges.txt for the slow CLIPTokenizer."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer
    r = imagegen(tmp_path, tiny_pipeline, "--export", "diffusers", tmp_path / "exp")         # default: fp16
    assert r.returncode == 0, r.stderr
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "exp", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float32
    pipe(PROMPT, num_inference_steps=2, height=64, width=64)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "exp", safety_checker=None, torch_dtype=torch.float16)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float16
    tok = tmp_path / "exp" / "tokenizer"
    slow, fast = CLIPTokenizer(str(tok / "vocab.json"), str(tok / "merges.txt")), M.load_tokenizer(tok)
    assert len(slow) == len(fast) and slow(PROMPT).input_ids == fast(PROMPT).input_ids
