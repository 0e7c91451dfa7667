"""Run plumbing every script shares, one home each: the one-line user error and the entry-point wrapper that
prints it, atomic files and folders (a kill, a crash or a full disk never leaves a half-written output that a
resume would take as done), and the choice of device and dtype.

Imports nothing heavy at the top: the data scripts that never touch a model do not import torch.
"""
import argparse
import errno
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path


#################################################################################
#                        User Errors and Entry Points                           #
#################################################################################

class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, wrong checkpoint): shown as one line, no traceback."""


def run_main(main, args):
    """Run an entry script's main(args); a UserError becomes `error: ...` on stderr (once, from rank 0 under
    torchrun) and exit status 1, so `&&`-chained pipelines stop."""
    try:
        return main(args)
    except UserError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help as a user reads it: the description as written (line breaks kept), and a flag's default shown
    once, only when there is one and its help text does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or any(action.default is v for v in (None, False, argparse.SUPPRESS)) \
                or action.default == "":
            return text
        return super()._get_help_string(action)


def arg_parser(doc, **kwargs):
    """Every script's ArgumentParser: its docstring whole as the description (they are a few lines), HelpFormatter,
    and no prefix matching (a typo'd or shortened flag is an error, never silently another flag)."""
    return argparse.ArgumentParser(description=doc.strip(), formatter_class=HelpFormatter, allow_abbrev=False,
                                   **kwargs)


#################################################################################
#                           Atomic Files and Folders                            #
#################################################################################

def temp_name(path, shared=False):
    """The hidden name a file is written under before it is renamed into place: `.NAME.tmp`, a fixed name, so
    the next run finds (and overwrites) what a killed one left. `shared`: several processes write this file
    (every encode_latents rank writes latent_info.json), so each gets its own temp name (the pid in it)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp" + (str(os.getpid()) if shared else ""))


def _no_space(e, dst):
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return UserError(f"no space left on device while writing '{dst}' (the partial file was removed; finished "
                         "outputs are intact): free space or pick another output folder, then re-run")
    return None


def commit(tmp, dst, fsync=True):
    """Put a finished temp file in place: flush it to disk (so a power cut cannot leave a renamed but empty
    file), rename it onto `dst` in one step, then flush the folder (so the rename itself survives a power cut)."""
    if fsync:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, dst)
    if fsync:
        fd = os.open(Path(dst).parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_path(dst, fsync=True, shared=False):
    """Yield a temp path beside `dst` to write to; when the block ends it is flushed to disk (fsync) and renamed
    onto `dst`, so `dst` is the old file or the complete new one, never a part. On any failure the temp file is
    removed; a full disk becomes one line that says so."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(dst, shared)
    try:
        yield tmp
        commit(tmp, dst, fsync)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if (err := _no_space(e, dst)) is not None:
            raise err from None
        raise


def write_atomic(path, data, fsync=True, shared=False):
    """Write bytes (or text) to `path` through atomic_path."""
    with atomic_path(path, fsync, shared) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


@contextmanager
def atomic_folder(out):
    """Yield an empty folder beside `out` to build into; when the block ends it replaces `out`. An interrupted
    build leaves the previous `out` intact, and its own leftover (a fixed name) is cleared by the next run.
    Callers check first that `out` is theirs to replace: this deletes the old `out`."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if (err := _no_space(e, out)) is not None:
            raise err from None
        raise


def check_writable(folder, flag):
    """Create `folder` (and parents) and prove a file can be written in it, before any expensive work."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = temp_name(folder / ".write_test", shared=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{flag} '{folder}' is not writable ({e.strerror}); pick a folder you can write to") from None
    return folder


#################################################################################
#                              Devices and Dtypes                               #
#################################################################################

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def pick_device(name="auto", index=None):
    """A torch.device from 'auto' (CUDA, then Apple's MPS, then CPU), 'cuda', 'cuda:N', 'mps' or 'cpu'; a device
    this machine lacks is one line, not torch's "not compiled with CUDA" traceback. `index` picks the GPU
    (torchrun's LOCAL_RANK) when the name does not."""
    import torch
    name = (name or "auto").lower()
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    kind = name.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}, but torch sees no CUDA device; use --device cpu (or auto)")
    if kind == "mps" and not has_mps:
        raise UserError(f"--device {name}, but this machine has no Apple MPS device; use --device cpu (or auto)")
    if kind not in ("cuda", "mps", "cpu"):
        raise UserError(f"--device '{name}' is not one of auto, cuda, cuda:N, mps, cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and index is not None:
        device = torch.device("cuda", index)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def pick_dtype(device, name=None, gpu="fp16"):
    """The compute dtype: `name` (fp32 / fp16 / bf16) when given, else `gpu` on CUDA and MPS and fp32 on CPU
    (CPU kernels are fp32-only in practice). Inference defaults to fp16 (every CUDA GPU has it); training and
    encoding pass gpu='bf16' (no loss scaling, the seed's choice)."""
    import torch
    if not name:
        name = gpu if device.type in ("cuda", "mps") else "fp32"
    if name not in DTYPES:
        raise UserError(f"dtype '{name}' is not one of {list(DTYPES)}")
    return getattr(torch, DTYPES[name])


def require_positive(args, *names):
    """One line, before any work, for a size or count flag below 1 (None: a flag not given, nothing to check)."""
    for name in names:
        values = getattr(args, name)
        if values is not None and min(values if isinstance(values, list) else [values]) < 1:
            raise UserError(f"--{name} must be at least 1, got {values}")
