"""sd_common: the one-line error wrapper, atomic files and folders (a kill, a crash or a full disk leaves the old
output or the complete new one, never a part), the device / dtype choice, and the one flag vocabulary that
sd_common.arg_parser's scripts share (a renamed flag has no alias)."""
import errno
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch

import sd_common
from sd_common import UserError

REPO = Path(__file__).resolve().parents[1]


def test_atomic_path_replaces_whole_or_not_at_all(tmp_path):
    dst = tmp_path / "sub" / "file.bin"
    sd_common.write_atomic(dst, b"old")
    with pytest.raises(RuntimeError):
        with sd_common.atomic_path(dst) as tmp:
            tmp.write_bytes(b"half of the new")
            raise RuntimeError("killed mid-write")
    assert dst.read_bytes() == b"old" and sorted(p.name for p in dst.parent.iterdir()) == ["file.bin"]
    sd_common.write_atomic(dst, "new")
    assert dst.read_text() == "new"
    assert sd_common.temp_name(dst).name == ".file.bin.tmp"                      # fixed: a rerun finds it
    assert sd_common.temp_name(dst, shared=True).name == f".file.bin.tmp{os.getpid()}"


def test_a_full_disk_is_one_line_and_leaves_no_part(tmp_path):
    dst = tmp_path / "ckpt.pt"
    with pytest.raises(UserError, match=r"no space left on device while writing '.*ckpt.pt' \(the partial file "
                                        r"was removed; finished outputs are intact\)"):
        with sd_common.atomic_path(dst) as tmp:
            tmp.write_bytes(b"x" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not list(tmp_path.iterdir())


def test_atomic_folder_swaps_in_a_finished_build_only(tmp_path):
    out = tmp_path / "dataset"
    with sd_common.atomic_folder(out) as tmp:
        (tmp / "a.arrow").write_text("first")
    with pytest.raises(KeyboardInterrupt):
        with sd_common.atomic_folder(out) as tmp:
            (tmp / "a.arrow").write_text("second, interrupted")
            raise KeyboardInterrupt
    assert (out / "a.arrow").read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]
    with sd_common.atomic_folder(out) as tmp:
        (tmp / "b.arrow").write_text("third")
    assert sorted(p.name for p in out.iterdir()) == ["b.arrow"]


def test_check_writable(tmp_path):
    assert sd_common.check_writable(tmp_path / "new" / "run", "--out_dir").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"--out '.*file/run' is not writable"):
        sd_common.check_writable(tmp_path / "file" / "run", "--out")


def test_devices_and_dtypes():
    assert sd_common.pick_device("cpu") == torch.device("cpu")
    assert sd_common.pick_device("auto").type in ("cuda", "mps", "cpu")
    with pytest.raises(UserError, match=r"--device 'tpu' is not one of"):
        sd_common.pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"--device cuda:1, but torch sees no CUDA device"):
            sd_common.pick_device("cuda:1")
    cpu = torch.device("cpu")
    assert sd_common.pick_dtype(cpu) == torch.float32 and sd_common.pick_dtype(cpu, "bf16") == torch.bfloat16
    assert sd_common.pick_dtype(torch.device("cuda"), gpu="bf16") == torch.bfloat16
    assert sd_common.pick_dtype(torch.device("cuda")) == torch.float16
    with pytest.raises(UserError, match="dtype 'fp8'"):
        sd_common.pick_dtype(cpu, "fp8")


def test_run_main_prints_one_line_and_exits_1(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)

    def main(args):
        raise UserError("the folder 'x' does not exist")
    with pytest.raises(SystemExit) as e:
        sd_common.run_main(main, None)
    assert e.value.code == 1 and capsys.readouterr().err == "error: the folder 'x' does not exist\n"
    monkeypatch.setenv("RANK", "1")                  # under torchrun only rank 0 says it
    with pytest.raises(SystemExit):
        sd_common.run_main(main, None)
    assert capsys.readouterr().err == ""


# One name per concept across every CLI (issue 14): each old name, and what argparse says of it.
RENAMED = [
    ("bench/unet_step.py", ["--res", "64"], "unrecognized arguments: --res 64"),
    ("bench/unet_step.py", ["--batch", "2"], "unrecognized arguments: --batch 2"),
    ("bench/unet_step.py", ["--grad_ckpt"], "unrecognized arguments: --grad_ckpt"),
    ("bench/kernel_profile.py", ["--grad_ckpt"], "unrecognized arguments: --grad_ckpt"),
    ("bench/sample.py", ["--res", "64", "--batch", "1"], "unrecognized arguments: --res 64 --batch 1"),
    ("bench/max_batch.py", ["--res", "64"], "unrecognized arguments: --res 64"),
    ("bench/kernel_profile.py", ["--res", "64", "--batch", "1"], "unrecognized arguments: --res 64 --batch 1"),
    ("bench/ema.py", ["--res", "64", "--batch", "1"], "unrecognized arguments: --res 64 --batch 1"),
    ("bench/buckets.py", ["speed", "--res", "64", "--batch", "1"], "unrecognized arguments: --res 64 --batch 1"),
    ("bench/data_pipeline.py", ["--download_image_size", "64"], "unrecognized arguments: --download_image_size 64"),
    ("01b_download_diffusiondb.py", ["--download_dir", "raw"], "unrecognized arguments: --download_dir raw"),
    ("01c_download_journeydb_images.py", ["--download_dir", "raw"], "unrecognized arguments: --download_dir raw"),
    ("03_download_images.py", ["--image_size", "256"], "unrecognized arguments: --image_size 256"),
    ("04_preprocess_to_cache.py", ["--tokenizer", "openai/clip-vit-large-patch14"],
     "unrecognized arguments: --tokenizer openai/clip-vit-large-patch14"),
    ("SD_Model.py", ["convert", "a", "b", "--format", "original"],
     "argument --format: invalid choice: 'original'"),           # then the choices, quoted as the Python quotes them
    ("SD_Model.py", ["convert", "a", "b", "--format", "ours", "--live"], "unrecognized arguments: --live"),
]


@pytest.mark.parametrize("script,args,error", RENAMED, ids=[f"{s} {' '.join(a)}" for s, a, _ in RENAMED])
def test_a_renamed_flag_is_refused_by_its_old_name(script, args, error, monkeypatch, capsys):
    """No aliases: the script's own argparse (run in-process, main never reached) exits 2 with one error line."""
    def reached(main, parsed):
        pytest.fail(f"{script} accepted {args}")
    monkeypatch.setattr(sd_common, "run_main", reached)
    monkeypatch.setattr(sys, "argv", [script, *args])
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "")       # bench/common.py sets it on import: restored after
    monkeypatch.syspath_prepend(str(REPO / "bench"))      # the benchmarks import bench/common.py
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(REPO / script), run_name="__main__")
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and f": error: {error}" in last, last
