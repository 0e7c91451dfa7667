#!/usr/bin/env bash
# The GPU check of issues 18 (training) and 19 (sampling, latent encoding): one command for a machine with one CUDA
# GPU, a preinstalled torch and transformers and no network. It installs the wheels of bench/gpu_wheels.sh (.whl/),
# runs the `cuda` tests, then the benchmarks at fixed sizes, each step in a time box and each part within its time
# budget (train 330 s + sample 210 s: the whole run ends inside 9.5 minutes). Steps run in order of importance, so
# a budget that runs out drops the last ones (named SKIPPED in steps.tsv); `--only` runs named steps again.
#
#   bash bench/gpu_check.sh                   # both parts (device tool: carry [".whl"], timeout_s 600)
#   bash bench/gpu_check.sh train|sample      # one part
#   bash bench/gpu_check.sh --only compile_mfu,max_batch
#   bash bench/gpu_check.sh --cpu-dry         # the same steps on this CPU at tiny sizes: the rehearsal
#
# Writes into $OUT (set by the device tool; else bench/results/gpu-run/): log.txt (everything printed), env.txt
# (GPU, driver, versions), steps.tsv (step, exit status, seconds, OK/FAILED/TIMEOUT/SKIPPED), and <device>.md (every
# benchmark table and both profiles: the file to commit as bench/results/<device>.md).
set -uo pipefail
cd "$(dirname "$0")/.."

usage="usage: bash bench/gpu_check.sh [--cpu-dry] [train|sample|all] [--only STEP,...] [--train-s S] [--sample-s S]"
steps="tests_train unet_step_512 unet_step_256 train_e2e compile_mfu profile_train sdpa_kernels max_batch tests_sample
       sample_eager sample_cuda_graphs profile_sample data_pipeline"
dry=0 part=all only="" train_s="" sample_s=""
while [ $# -gt 0 ]; do
    case $1 in
        --cpu-dry) dry=1 ;;
        train|sample|all) part=$1 ;;
        --only|--train-s|--sample-s)
            [ $# -ge 2 ] || { echo "error: $1 needs a value; $usage" >&2; exit 2; }
            case $1 in --only) only=$2 ;; --train-s) train_s=$2 ;; --sample-s) sample_s=$2 ;; esac
            shift ;;
        -h|--help) echo "$usage"; exit 0 ;;
        *) echo "error: unknown argument '$1'; $usage" >&2; exit 2 ;;
    esac
    shift
done
# The budgets: 330 + 210 s on the GPU (the issues' 6 minutes a part, fitted into one 10-minute call); a loaded
# 2-core CPU needs far more for the same steps at tiny sizes.
[ -z "$train_s" ] && train_s=$([ $dry = 1 ] && echo 2400 || echo 330)
[ -z "$sample_s" ] && sample_s=$([ $dry = 1 ] && echo 1800 || echo 210)
for v in "$train_s" "$sample_s"; do
    [[ $v =~ ^[1-9][0-9]*$ ]] || { echo "error: a time budget must be a positive number of seconds, got '$v'" >&2; exit 2; }
done
for name in ${only//,/ }; do
    [[ " $(echo $steps) " == *" $name "* ]] || { echo "error: --only: no step '$name'; steps:" $steps >&2; exit 2; }
done

out=${OUT:-bench/results/gpu-run}
mkdir -p "$out" 2>/dev/null && [ -w "$out" ] || { echo "error: cannot write the output folder '$out'" >&2; exit 1; }
out=$(cd "$out" && pwd)
export BENCH_RESULTS_DIR=$out PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled

# Everything below prints to the terminal and to log.txt.
check() {

# Python: the machine's (it holds torch) on the GPU; the project's venv in the rehearsal. The wheels go to a folder
# put in front of it (pip install --target), so nothing of the machine's own packages is replaced.
if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ $dry = 1 ] && [ -x .venv/bin/python ]; then py=.venv/bin/python
else py=python3; fi
if compgen -G ".whl/*.whl" >/dev/null; then
    site=$(mktemp -d /tmp/sd_gpu_site.XXXX)
    PIP_ROOT_USER_ACTION=ignore "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" .whl/*.whl \
        || { echo "error: installing .whl/*.whl failed (see above)" >&2; exit 1; }
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
"$py" -c "import torch, transformers" 2>/dev/null || { echo "error: $py cannot import torch and transformers" >&2; exit 1; }
"$py" -c "import diffusers, webdataset" 2>/dev/null || {
    echo "error: $py cannot import diffusers / webdataset: run \`make gpu-wheels\` where pip reaches PyPI," \
         "and carry .whl/" >&2
    exit 1; }
[ $dry = 1 ] || "$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || {
    echo "error: torch sees no CUDA device here; rehearse with --cpu-dry" >&2; exit 1; }

{ date -u; nvidia-smi 2>/dev/null || echo "no nvidia-smi"; "$py" - <<'EOF'
import sys, torch, transformers, diffusers, huggingface_hub
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda, "| cudnn",
      torch.backends.cudnn.version(), "| transformers", transformers.__version__, "| diffusers", diffusers.__version__,
      "| huggingface_hub", huggingface_hub.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, f"{p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, capability {p.major}.{p.minor}")
EOF
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

# Sizes: the issues' figures on the GPU; the smallest that runs every code path in the rehearsal.
if [ $dry = 1 ]; then
    dev=cpu model=small res=64 res_small=32 bs=2 bs_small=2 n=2 steps=2 warm=1 e2e_phase=tiny e2e_steps=4 vae=tiny
    images=16 workers=1 latents=50 limit=4 pytest_dev=(--cuda-device cpu) backend=aot_eager
else
    dev=cuda model=sd1 res=512 res_small=256 bs=16 bs_small=64 n=8 steps=50 warm=2 e2e_phase=phase1 e2e_steps=40
    vae=sd images=2048 workers=$(( $(nproc) - 1 )) latents=4000 limit=256 pytest_dev=() backend=inductor
fi
step_s=$([ $dry = 1 ] && echo 1 || echo 10)       # timed steps per measurement
reps=$([ $dry = 1 ] && echo 1 || echo 3)          # timed sampling calls per measurement
prof_steps=$([ $dry = 1 ] && echo 1 || echo 3)    # profiled training steps
box_scale=$([ $dry = 1 ] && echo 8 || echo 1)     # a shared 2-core CPU takes minutes where the GPU takes seconds
bench="$py bench"
train_tests="mixed_precision or sdpa or compile_with or non_finite or never_wait"
sample_tests="fp16_sampling or cuda_graph or encode_latents"

: > "$out/steps.tsv"
deadline=0
now() { date +%s; }
step() {  # step NAME BOX_SECONDS COMMAND...: run it under `timeout`, within what is left of the part's budget
    local name=$1 box=$(( $2 * box_scale )); shift 2
    if [ -n "$only" ] && [[ ",$only," != *",$name,"* ]]; then return; fi
    local left=$(( deadline - $(now) ))
    [ $box -gt $left ] && box=$left
    if [ $box -lt 10 ]; then
        echo "=== [$name] SKIPPED: the part's time budget is spent"
        printf '%s\t-\t0\tSKIPPED\n' "$name" >> "$out/steps.tsv"
        return
    fi
    echo "=== [$name] (time box ${box}s): $*"
    local t0; t0=$(now)
    timeout --kill-after=15 $box "$@"
    local rc=$? status=OK
    [ $rc = 124 ] || [ $rc = 137 ] && status=TIMEOUT
    [ $rc != 0 ] && [ $status = OK ] && status=FAILED
    echo "=== [$name] $status (exit $rc) in $(( $(now) - t0 ))s"
    printf '%s\t%s\t%s\t%s\n' "$name" $rc $(( $(now) - t0 )) $status >> "$out/steps.tsv"
}

if [ $part = all ] || [ $part = train ]; then                          # issue 18
    deadline=$(( $(now) + train_s ))
    step tests_train 110 "$py" -m pytest -q -m cuda tests/test_cuda.py -k "$train_tests" -rs "${pytest_dev[@]}"
    step unet_step_512 60 $bench/unet_step.py --config $model --resolution $res --batch_size $bs --dtype bf16 \
        --channels_last --optimizer --steps $step_s --warmup $warm --device $dev
    step unet_step_256 50 $bench/unet_step.py --config $model --resolution $res_small --batch_size $bs_small \
        --dtype bf16 --channels_last --optimizer --steps $step_s --warmup $warm --device $dev
    step train_e2e 90 $bench/train_e2e.py --phase $e2e_phase --nproc 1 --steps $e2e_steps --warmup $(( e2e_steps / 2 )) \
        --log_every $(( e2e_steps / 4 )) -- --batch_size $bs --grad_accum 1 --resolution $res --device $dev
    step compile_mfu 120 $bench/unet_step.py --config $model --resolution $res --batch_size $bs --dtype bf16 \
        --channels_last --optimizer --compile --compile_backend $backend --impl ours --steps $step_s --warmup $warm \
        --device $dev
    step profile_train 40 $bench/kernel_profile.py --what train --config $model --resolution $res --batch_size $bs \
        --dtype bf16 --channels_last --steps $prof_steps --warmup $warm --device $dev
    step sdpa_kernels 20 $bench/kernel_profile.py --what sdpa --dtype bf16 --device $dev
    if [ $dry = 1 ]; then   # CUDA only: the rehearsal checks its one-line refusal on a CPU, and nothing more
        step max_batch 30 bash -c "$bench/max_batch.py --device cpu 2>&1 | tail -1 | grep '^error: .*CUDA'"
    else
        step max_batch 120 $bench/max_batch.py --config $model --resolution $res --dtype bf16 --channels_last \
            --limit $limit --steps 3 --device $dev
    fi
fi

if [ $part = all ] || [ $part = sample ]; then                         # issue 19
    deadline=$(( $(now) + sample_s ))
    step tests_sample 60 "$py" -m pytest -q -m cuda tests/test_cuda.py -k "$sample_tests" -rs "${pytest_dev[@]}"
    step sample_eager 80 $bench/sample.py --config $model --resolution $res --steps $steps --dtype fp16 \
        --batch_size 1 $n --repeats $reps --device $dev
    step sample_cuda_graphs 100 $bench/sample.py --config $model --resolution $res --steps $steps --dtype fp16 \
        --batch_size 1 --compile reduce-overhead --impl ours --repeats $reps --device $dev
    step profile_sample 35 $bench/kernel_profile.py --what sample --config $model --resolution $res --batch_size 1 \
        --steps $steps --dtype fp16 --warmup 1 --device $dev
    step data_pipeline 90 $bench/data_pipeline.py --device $dev --resolution $res --vae $vae --images $images \
        --batch_size 32 --workers $workers --latents $latents --compile
fi

echo "=== steps ($out/steps.tsv):"
column -t "$out/steps.tsv" 2>/dev/null || cat "$out/steps.tsv"
echo "=== results: $(ls "$out"/*.md 2>/dev/null | tr '\n' ' ')"
! grep -qE $'\t(FAILED|TIMEOUT)$' "$out/steps.tsv"
}

check 2>&1 | tee -a "$out/log.txt"
exit "${PIPESTATUS[0]}"
