"""The benchmarks run (tiny sizes, CPU) and append a well-formed table; the max-batch search finds the edge.
Figures are not asserted here: speed and memory targets live in bench/results, not in tests."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow                     # every test here runs the real scripts


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def run_bench(tmp_path, script, *args):
    env = dict(os.environ, BENCH_RESULTS_DIR=str(tmp_path), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc


def results(tmp_path):
    files = list(tmp_path.glob("*.md"))
    assert len(files) == 1
    return files[0].read_text()


@pytest.mark.parametrize("edge", [0, 1, 5, 37, 64, 100])
def test_largest_fitting_finds_the_edge_in_few_probes(edge):
    from max_batch import largest_fitting
    probes = []

    def fits(b):
        probes.append(b)
        return b <= edge
    assert largest_fitting(fits, limit=100) == edge
    assert len(probes) <= 2 * 7 + 1 and max(probes) <= 100


def test_unet_step_appends_a_table_with_the_ratio(tmp_path):
    proc = run_bench(tmp_path, "unet_step.py", "--config", "small", "--resolution", 64, "--batch_size", 1, "--steps", 1,
                     "--warmup", 0, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    text = results(tmp_path)
    assert "### UNet training step (bench/unet_step.py)" in text and "| ours / diffusers |" in text


def test_sample_appends_a_table(tmp_path):
    proc = run_bench(tmp_path, "sample.py", "--config", "small", "--resolution", 64, "--steps", 2, "--repeats", 1,
                     "--warmup", 0, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "| diffusers / ours latency |" in results(tmp_path)


def test_max_batch_needs_cuda_and_says_so(tmp_path):
    proc = run_bench(tmp_path, "max_batch.py", "--device", "cpu")
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert not list(tmp_path.glob("*.md"))


def test_checkpoint_save_appends_a_table(tmp_path):
    proc = run_bench(tmp_path, "checkpoint_save.py", "--config", "small", "--dir", tmp_path / "ckpt")
    assert proc.returncode == 0, proc.stderr
    assert "| small | " in results(tmp_path) and not list((tmp_path / "ckpt").iterdir())   # measured, then removed


def test_data_pipeline_measures_02_and_03_with_projections(tmp_path):
    proc = run_bench(tmp_path, "data_pipeline.py", "--stages", "filter", "download", "--filter_rows", 20000,
                     "--download_images", 6, "--download_size", "400x300", "--download_resolution", 64,
                     "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    text = results(tmp_path)
    assert "| 02 filter --preset phase1, 1 process |" in text and "-> LAION-2B-en, 2.3B rows, 1 process" in text
    assert "img/s per core (6 of 6 kept)" in text and "-> 100M images, one 16-core node" in text


def test_sampler_steps_scores_every_sampler_and_finds_the_fewest_steps(tmp_path):
    """On a random tiny checkpoint: a row per sampler x step count, the reference, and the summary table."""
    import SD_Model as M
    from tiny_models import save_tiny_clip, save_tiny_vae
    clip, vae = save_tiny_clip(tmp_path / "clip"), save_tiny_vae(tmp_path / "vae")
    meta = M.checkpoint_meta("small", M.NoiseSchedule(), vae, 1.0, clip, "last", 32)
    M.save_unet(M.UNet(M.unet_config("small")).initialize_weights().state_dict(), "small",
                tmp_path / "ema_final.safetensors", "ours", meta)
    proc = run_bench(tmp_path, "sampler_steps.py", "--ckpt", tmp_path / "ema_final.safetensors", "--samplers",
                     "euler_a", "dpmpp_2m_karras", "--steps", 1, "--reference", "ddim:2", "--shapes_seeds", 1,
                     "--batch_size", 24, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    text = results(tmp_path)
    assert "| sampler | steps | color | shape | images/s | reaches ddim-2 |" in text
    rows = [line for line in text.splitlines() if line.startswith(("| euler_a |", "| dpmpp_2m_karras |", "| ddim |"))]
    assert len(rows) == 2 + 1 + 2           # the grid, the reference, a summary row per sampler
    proc = run_bench(tmp_path, "sampler_steps.py", "--ckpt", tmp_path / "ema_final.safetensors", "--reference", "ddim")
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith("error: --reference takes")


def test_ema_appends_a_table_with_every_variant(tmp_path):
    proc = run_bench(tmp_path, "ema.py", "--config", "small", "--resolution", 64, "--batch_size", 1, "--every", 2,
                     "--block", 2, "--rounds", 1, "--warmup", 0, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    text = results(tmp_path)
    assert "### EMA cost per training step (bench/ema.py)" in text and "sd1_fp32_ema_gb_off_the_gpu_with_cpu=3.44" in text
    for row in ("| no EMA |", "| EMA every step (model) |", "| EMA every 2 steps (model) |", "| EMA every step (cpu) |",
                "| EMA every 2 steps (cpu) |"):
        assert row in text
    proc = run_bench(tmp_path, "ema.py", "--every", 3, "--block", 4, "--device", "cpu")
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith("error: --block 4 must be a multiple")


def test_kernel_profile_appends_the_top_kernels_by_kind(tmp_path):
    proc = run_bench(tmp_path, "kernel_profile.py", "--what", "train", "--config", "small", "--resolution", 32,
                     "--batch_size", 1, "--steps", 1, "--warmup", 0, "--top", 5, "--dtype", "fp32", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    text = results(tmp_path)
    assert "| kernel | calls | ms | share | kind |" in text and "by_kind=" in text
    lines = text.splitlines()
    start = lines.index("| kernel | calls | ms | share | kind |") + 2                 # past the header and its rule
    rows = [line for line in lines[start:start + 6] if line.startswith("| ")]
    assert len(rows) == 5                    # CPU ops need not all be aten:: ones (autograd / optimizer records)


@pytest.mark.parametrize("args,message", [
    (["--bogus"], "error: unknown argument '--bogus'"),
    (["--train-s", "0"], "error: a time budget must be a positive number of seconds, got '0'"),
    (["--sample-s", "-5"], "error: a time budget must be a positive number of seconds, got '-5'"),
])
def test_gpu_check_refuses_bad_arguments_in_one_line(tmp_path, args, message):
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), *args], cwd=REPO, capture_output=True,
                          text=True, env=dict(os.environ, OUT=str(tmp_path)), timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(message) and not list(tmp_path.iterdir())


def test_gpu_check_says_when_its_output_folder_is_not_writable(tmp_path):
    (tmp_path / "file").write_text("")
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu-dry"], cwd=REPO, capture_output=True,
                          text=True, env=dict(os.environ, OUT=str(tmp_path / "file" / "out")), timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: cannot write the output folder '{tmp_path}/file/out'"


def test_buckets_crop_appends_the_area_table(tmp_path):
    proc = run_bench(tmp_path, "buckets.py", "crop", "--images", 1000)
    assert proc.returncode == 0, proc.stderr
    text = results(tmp_path)
    assert "| 16:9 | 640x384 | 93.8% | 56.2% |" in text and "| mix of 1,000 images (ASSUMED_MIX) |" in text
