"""The samplers against diffusers' schedulers step for step; SD_ImageGen.py / inference.py against diffusers'
StableDiffusionPipeline on a tiny random pipeline saved in the diffusers layout; the export formats (and the
scheduler they name) round-tripped through diffusers."""
import contextlib
import functools
import io
import json
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
from conftest import ROOT, diffusers_draw, fake_model
from sd_common import run_main
from tiny_models import save_tiny_clip, save_tiny_vae

PROMPT, NEGATIVE, SEED, STEPS, CFG = "a red circle on a gray background", "blue", 3, 10, 7.5

# --- the samplers, step for step against diffusers' schedulers (no UNet: fake_model, a fixed function of x, t) --

DPM = dict(algorithm_type="dpmsolver++", solver_order=2)
REFERENCE = {   # our sampler -> the diffusers scheduler it implements, configured as users configure it
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", DPM),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", dict(DPM, use_karras_sigmas=True)),
}
SCHEDULES = {"eps": {}, "v": dict(prediction_type="v_prediction"),
             "ztsnr_v": dict(prediction_type="v_prediction", zero_terminal_snr=True),
             "ztsnr_eps": dict(zero_terminal_snr=True)}


def reference_scheduler(sampler, schedule, spacing, **kw):
    import diffusers
    name, own = REFERENCE[sampler]
    return getattr(diffusers, name)(
        num_train_timesteps=schedule.num_train_timesteps, beta_start=schedule.beta_start, beta_end=schedule.beta_end,
        beta_schedule=schedule.beta_schedule, prediction_type=schedule.prediction_type,
        rescale_betas_zero_snr=schedule.zero_terminal_snr, timestep_spacing=spacing, steps_offset=1, **own, **kw)


def diffusers_trajectory(scheduler, x, steps, generator):
    """The latents after each step of StableDiffusionPipeline's loop: x_T times init_noise_sigma, the model's input
    through scale_model_input, the step's noise from the pipeline's generator."""
    scheduler.set_timesteps(steps)
    # Karras sigmas from a zero-terminal-SNR schedule's sigma_max ~ 4096 repeat t = 999 at the start, and diffusers
    # would then start at the second of them (diffusers issue #12771): start at the first, as our sampler does.
    if hasattr(scheduler, "set_begin_index"):     # the sigma schedulers (DDIM / DDPM step by timestep)
        scheduler.set_begin_index(0)
    x, trajectory = x * scheduler.init_noise_sigma, []
    for t in scheduler.timesteps:
        x = scheduler.step(fake_model(scheduler.scale_model_input(x, t), t), t, x, generator=generator).prev_sample
        trajectory.append(x)
    return trajectory


def assert_same_trajectory(ours, theirs):
    """Equal within 1e-5 at every step, relative to the latents' size where that exceeds 1: Euler's x_sigma starts
    at sigma_max * x_T, ~4096 x_T at zero terminal SNR, where float32 itself resolves only 5e-4."""
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max()), f"step {i}: {(a - b).abs().max():.3g}"


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("sampler", list(REFERENCE))
def test_sampler_matches_its_diffusers_scheduler_step_for_step(sampler, schedule, spacing):
    """Every step's latents, for eps and v prediction, zero terminal SNR and each timestep spacing, at 1, 7 and 30
    steps (DPM-Solver's first-order first and last steps, the Karras ramp). Euler ancestral draws its noise from
    the same seeded generator as diffusers, in the same order."""
    ours = M.NoiseSchedule(**SCHEDULES[schedule])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for steps in (1, 7, 30):
        theirs = diffusers_trajectory(reference_scheduler(sampler, ours, spacing), x, steps,
                                      torch.Generator().manual_seed(42))
        got = []
        M.SAMPLERS[sampler](fake_model, x.clone(), ours, steps, spacing=spacing,
                            generator=torch.Generator().manual_seed(42), callback=lambda i, t, xi, x0: got.append(xi))
        assert_same_trajectory(got, theirs)


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
def test_sigma_steps_are_diffusers_timesteps_and_sigmas(beta_schedule):
    """The timesteps each sampler calls the model at and its sigmas, exactly, over the beta schedules and step
    counts (cosine's Karras timesteps are truncated, the others' rounded; Euler's linspace ones fractional)."""
    for zero_snr in (False, True):
        ours = M.NoiseSchedule(beta_schedule=beta_schedule, zero_terminal_snr=zero_snr)
        for sampler in REFERENCE:
            for spacing in ("leading", "trailing", "linspace"):
                for steps in (1, 2, 10, 25, 50, 100):
                    ref = reference_scheduler(sampler, ours, spacing)
                    ref.set_timesteps(steps)
                    ts, sigmas = M.sigma_steps(ours, steps, spacing, 1, "euler" if "euler" in sampler else "dpm",
                                               karras="karras" in sampler)
                    assert ts == ref.timesteps.tolist() and torch.equal(sigmas, ref.sigmas), (sampler, spacing, steps)


@pytest.mark.parametrize("schedule", ["eps", "ztsnr_v"])
@pytest.mark.parametrize("sampler", [s for s in M.SAMPLERS if s not in M.FLOW_SAMPLERS])   # flow: its own test
def test_exported_scheduler_config_samples_as_our_sampler(sampler, schedule):
    """What an export writes to scheduler/: diffusers' from_config of it calls the model at our sampler's timesteps
    and steps our latents, for every sampler."""
    import diffusers
    ours = M.NoiseSchedule(**SCHEDULES[schedule])
    if sampler == "dpmpp_2m_karras" and ours.zero_terminal_snr:
        with pytest.raises(M.UserError, match="diffusers issue #12771"):
            M.diffusers_scheduler_config(ours, sampler=sampler)
        return
    name, config = M.diffusers_scheduler_config(ours, sampler=sampler)
    assert config["_class_name"] == name and config["timestep_spacing"] == M.default_spacing(ours)
    json.loads(json.dumps(config))                                        # what the export writes: plain JSON
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for steps in (7, 30):
        scheduler = getattr(diffusers, name).from_config(config)
        theirs = diffusers_trajectory(scheduler, x, steps, torch.Generator().manual_seed(42))
        got, seen = [], []
        M.SAMPLERS[sampler](lambda x, t: seen.append(t) or fake_model(x, t), x.clone(), ours, steps,
                            spacing=M.default_spacing(ours), generator=torch.Generator().manual_seed(42),
                            callback=lambda i, t, xi, x0: got.append(xi))
        assert seen == scheduler.timesteps.tolist()
        assert_same_trajectory(got, theirs)


def test_karras_export_refused_while_diffusers_repeats_the_first_timestep():
    """The reason for the refusal above: if diffusers stops repeating t = 999 at zero terminal SNR (issue #12771),
    this fails and dpmpp_2m_karras exports of such models can be allowed."""
    ref = reference_scheduler("dpmpp_2m_karras", M.NoiseSchedule(prediction_type="v_prediction",
                                                                 zero_terminal_snr=True), "trailing")
    ref.set_timesteps(25)
    assert ref.timesteps[0] == ref.timesteps[1] == 999


def test_eta_makes_euler_ancestral_and_back():
    """euler_a at eta 0 is Euler bitwise; at eta 1 its noise is really drawn (two seeds differ); eta between
    lands between."""
    s, x = M.NoiseSchedule(), torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(sampler, seed=1, **kw):
        return M.SAMPLERS[sampler](fake_model, x.clone(), s, 20, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(run("euler_a", eta=0.0), run("euler"))
    assert not torch.allclose(run("euler_a"), run("euler_a", seed=2), atol=1e-2)
    half, full = [(run("euler_a", eta=e) - run("euler")).abs().mean() for e in (0.5, 1.0)]
    assert 0 < half < full


@functools.lru_cache(maxsize=None)
def diffusers_image(folder, prompt=PROMPT, negative=NEGATIVE, seed=SEED, single_file=None):
    return diffusers_draw(folder, prompt, negative=negative, steps=STEPS, guidance_scale=CFG, seed=seed, size=64,
                          single_file=single_file)


def imagegen_argv(tmp_path, ckpt, *extra, out="img.png"):
    return ["--ckpt", str(ckpt), "--steps", str(STEPS), "--guidance_scale", str(CFG), "--seed", str(SEED), "--height", "64",
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
    assert f"ddim x1:   0%|          | 0/{STEPS}" in r.stderr                 # the steps' progress bar
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


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m_karras"])
def test_export_with_a_sampler_draws_our_image_in_diffusers(tiny_pipeline, tmp_path, sampler):
    """--export diffusers DIR --sampler X writes X's scheduler, and a plain StableDiffusionPipeline.from_pretrained(DIR)
    draws what SD_ImageGen.py --sampler X draws (euler_a: its step noise too, from the pipeline's one generator)."""
    r = imagegen(tmp_path, tiny_pipeline, "--export", "diffusers", tmp_path / "exp", "--export_dtype", "fp32",
                 "--sampler", sampler)
    assert r.returncode == 0 and f"(scheduler: {sampler})" in r.stdout, r.stderr
    written = json.loads((tmp_path / "exp" / "scheduler" / "scheduler_config.json").read_text())
    expected = {"euler_a": ("EulerAncestralDiscreteScheduler", {}),
                "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True,
                                                                         algorithm_type="dpmsolver++"))}[sampler]
    assert json.loads((tmp_path / "exp" / "model_index.json").read_text())["scheduler"] == ["diffusers", expected[0]]
    assert written["_class_name"] == expected[0] and all(written[k] == v for k, v in expected[1].items())
    r = imagegen(tmp_path, tmp_path / "exp", "--prompt", PROMPT, "--negative", NEGATIVE, "--sampler", sampler)
    assert r.returncode == 0, r.stderr
    ours = np.asarray(Image.open(tmp_path / "img.png"), dtype=np.float64)
    theirs = diffusers_image(tmp_path / "exp")
    assert np.abs(ours - theirs).mean() <= 0.5
    assert np.abs(theirs - diffusers_image(tiny_pipeline)).mean() > 1.0       # another sampler than DDIM's


def test_flow_checkpoint_samples_with_flow_euler_and_exports_a_pipeline_diffusers_runs(tiny_pipeline, tmp_path):
    """A rectified-flow checkpoint: SD_ImageGen samples it with flow_euler unasked (ddim is one line); --export
    diffusers writes a flow scheduler StableDiffusionPipeline can run (DPMSolverMultistepScheduler's flow mode at
    order 1, Euler on its own sigma grid), which draws our image within 0.5 of 255 on average and loads back as the
    same flow model; single-file refuses. FlowMatchEulerDiscreteScheduler itself fails in that pipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusionPipeline
    sd, cfg, _ = M.read_unet_state(tiny_pipeline)
    meta = M.checkpoint_meta(cfg, M.NoiseSchedule(prediction_type="flow", flow_shift=2.0), tiny_pipeline / "vae",
                             0.18215, tiny_pipeline, "last", 64)
    M.save_unet(sd, cfg, tmp_path / "flow.safetensors", "ours", meta)
    r = imagegen(tmp_path, tmp_path / "flow.safetensors", "--prompt", PROMPT, "--negative", NEGATIVE)
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "img.png").text["sampler"] == "flow_euler"
    ours = np.asarray(Image.open(tmp_path / "img.png"), dtype=np.float64)
    r = imagegen(tmp_path, tmp_path / "flow.safetensors", "--prompt", PROMPT, "--sampler", "ddim", out="ddim.png")
    assert r.returncode != 0 and "sampler 'ddim' does not fit this flow model" in r.stderr.strip().splitlines()[-1]
    r = imagegen(tmp_path, tmp_path / "flow.safetensors", "--export", "single-file", tmp_path / "flow_sf.safetensors")
    assert r.returncode != 0 and "a flow model has no single-file form" in r.stderr
    assert not (tmp_path / "flow_sf.safetensors").exists()

    r = imagegen(tmp_path, tmp_path / "flow.safetensors", "--export", "diffusers", tmp_path / "exp",
                 "--export_dtype", "fp32")
    assert r.returncode == 0, r.stderr
    assert np.abs(diffusers_image(tmp_path / "exp") - ours).mean() <= 0.5
    back = M.load_pipeline(tmp_path / "exp").schedule
    assert back.prediction_type == "flow" and back.flow_shift == 2.0
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "exp", safety_checker=None)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=2.0)
    with pytest.raises(AttributeError, match="init_noise_sigma"):
        pipe(PROMPT, num_inference_steps=2, height=64, width=64)


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
           "--steps", str(STEPS), "--seed", str(SEED), "--resolution", "64", "--out", str(tmp_path / "inf.png")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "(cpu)" in r.stdout and f"ddim x1:   0%|          | 0/{STEPS}" in r.stderr, r.stderr
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
    assert json.loads((tmp_path / "exp" / "unet" / "config.json").read_text())["sample_size"] == 16
    assert M.load_pipeline(tmp_path / "exp").meta["resolution"] == 64
    r = imagegen(tmp_path, tmp_path / "exp", "--prompt", "a red circle", "--steps", "2")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "img.png").size == (64, 64)


def test_a_non_square_image_is_diffusers_image_and_its_sides_are_checked_against_the_vae(tiny_pipeline, tmp_path):
    """96 x 64 (an aspect bucket's shape): the same pixels as StableDiffusionPipeline(width=96, height=64); a side
    that is not a multiple of the VAE's 8 is one line."""
    r = imagegen(tmp_path, tiny_pipeline, "--prompt", PROMPT, "--negative", NEGATIVE, "--width", "96")
    assert r.returncode == 0, r.stderr
    ours = np.asarray(Image.open(tmp_path / "img.png"), dtype=np.float64)
    ref = diffusers_draw(tiny_pipeline, PROMPT, negative=NEGATIVE, steps=STEPS, guidance_scale=CFG, seed=SEED,
                         size=64, width=96)
    assert ours.shape == ref.shape == (64, 96, 3) and np.abs(ours - ref).mean() <= 0.5
    r = imagegen(tmp_path, tiny_pipeline, "--prompt", PROMPT, "--width", "100")
    assert r.returncode == 1 and "width must be a multiple of 8 (the VAE's downsampling), got 100" in r.stderr


@pytest.mark.parametrize("extra,message", [
    (["--prompt", "x", "--height", "60"], "height must be a multiple of 8 (the VAE's downsampling), got 60"),
    (["--prompt", "x", "--height", "-64"], "height must be positive, got -64"),
    (["--prompt", "x", "--sampler", "dpm++"], "unknown sampler 'dpm++'; choose one of ddim, ddpm, euler, euler_a"),
    (["--prompt", "x", "--sampler", "dpmpp_2m", "--eta", "0.5"], "dpmpp_2m adds no noise: --eta does not apply"),
    (["--prompt", "x", "--eta", "-1"], "--eta must be at least 0, got -1.0"),
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
