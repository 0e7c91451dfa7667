#!/usr/bin/env bash
# The wheel folder bench/gpu_check.sh installs from on a GPU machine that has no network. Such a machine (the
# H200 lent to this project's sessions: Python 3.12, torch 2.11, transformers 5.17, huggingface_hub 1.33,
# safetensors, pyarrow, opencv, pytest, ...) lacks exactly these pure-Python packages that the checks import:
#   diffusers          the reference UNet / pipeline / AutoencoderKL (SD_Model's VAE, every comparison)
#   importlib_metadata diffusers imports it at start
#   webdataset         sd_data's tar reader and writer (encode_latents, bench/data_pipeline.py)
#   braceexpand        webdataset imports it at start
# (datasets, wandb, img2dataset are not imported by the GPU checks: SD_Train --synthetic and the benches import them
# lazily, never.) Each wheel is fetched alone (--no-deps), for CPython 3.12 on x86-64, at the version the project pins.
#
#   bash bench/gpu_wheels.sh          # or: make gpu-wheels   -> .whl/ (git-ignored; carry it: carry [".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=python3

pinned() {  # the `name==version` line of requirements.txt, or the version given (transitive needs, not pinned there)
    grep -iE "^$1==" requirements.txt || echo "$1==$2"
}
wheels=("$(pinned diffusers '')" "$(pinned webdataset '')" "$(pinned importlib_metadata 10.2.0)"
        "$(pinned braceexpand 0.1.7)")

mkdir -p "$dir"
rm -f "$dir"/*.whl                    # one version of each: two of one package stop the whole install there
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d "$dir" "${wheels[@]}"
ls -l "$dir"
du -sh "$dir"
