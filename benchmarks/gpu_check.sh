#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine, at most 8 minutes, nothing fetched from the
# network. Results go under $OUT (the device tool returns at most 8 files): gpu_check.log (every
# step's output), steps.txt (step, exit status, seconds), the GPU search's leaderboard and search.json.
#   1. the CUDA tests (tests/test_gpu.py)
#   2. a 25-member ensemble (5 configurations x 5 folds, hflip TTA) on one 144 x 266 x 266 case-day
#      (bench_ensemble.py --original 266): seconds per case-day (goal: under 5 s on an H100/H200)
#   3. training throughput, real loader and augmentations vs ready tensors, 0-12 loader workers
#      (bench_feed.py, configs/uwmgi.yaml's model and batch): is training data-bound?
#   4. a search of 2 trials with workers.use_gpu (one GPU worker per trial) on a real-size subset:
#      `synth --profile shapes` (every real geometry, 144- and 80-slice scans) prepared at 320 px
#   5. the earlier training and inference benchmarks (fp32/bf16 x memory format; fused TTA vs loop)
# Most important first: a step that hangs is cut by its own timeout, and the later ones still run.
#
# Packages the GPU image lacks travel in .whl/, made here by benchmarks/gpu_wheels.sh: wheels for
# Python 3.12, and Ray as ray.tar.xz, its wheel unpacked without ray/jars, rllib and llm and packed
# again, since the wheel itself (79 MB) is over the tool's 64 MiB. They are installed only where
# `import ray` etc. fail.
#
# QUICK=1 PY=.venv/bin/python bash benchmarks/gpu_check.sh: the same steps at toy sizes on a CPU, to
# rehearse the script before spending GPU time (the CUDA tests skip there). ONLY="step ..." runs some.
set -uo pipefail
OUT=${OUT:-runs/gpu}
WORK=${WORK:-/tmp/gitseg-gpu}
PY=${PY:-python3}
QUICK=${QUICK:-0}
ONLY=${ONLY:-}  # e.g. ONLY="data prepare search_gpu": run these steps alone (a rerun of what failed)
mkdir -p "$OUT" "$WORK"
LOG=$OUT/gpu_check.log
export PYTHONUNBUFFERED=1
if ! $PY -c "import ray.tune, optuna, segmentation_models_pytorch, albumentations" 2>/dev/null; then
    if [ ! -f .whl/ray.tar.xz ]; then
        echo "gpu_check: Ray, Optuna, smp or albumentations is missing and .whl/ has no wheels: run" \
             "'bash benchmarks/gpu_wheels.sh' where PyPI is reachable and carry .whl" >&2
        exit 2
    fi
    mkdir -p /tmp/site
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    tar xJf .whl/ray.tar.xz -C /tmp/site
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"  # absolute: Ray's worker processes inherit it
GPU=$($PY -c "import torch; print(str(torch.cuda.is_available()).lower())")  # false: a QUICK rehearsal

if [ "$QUICK" = 1 ]; then
    ENSEMBLE=(--configs 2 --folds 2 --encoder resnet18 --size 64 --original 80 --slices 8)
    FEED=(--steps 3 --workers 0 2 --set train.batch_size=2 --set model.encoder=resnet18)
    SYNTH=(--cases 1) SIZE=64 STEPS=3 BATCH=2 LOADERS=1 CPUS=1
    TRAIN=(--size 64 --batch-size 2 --steps 2) INFER=(--size 64 --slices 8 --batch-size 4 --repeats 1)
else
    ENSEMBLE=(--configs 5 --folds 5 --encoder efficientnet-b4 --size 320 --original 266 --slices 144)
    FEED=(--steps 30 --workers 0 2 4 8 12)
    SYNTH=(--cases 3) SIZE=320 STEPS=20 BATCH=16 LOADERS=4 CPUS=5
    TRAIN=(--size 256 --batch-size 32 --steps 30) INFER=(--size 256 --slices 144 --batch-size 64 --repeats 3)
fi

step() {  # step NAME SECONDS COMMAND...: run under a timeout, output into the log, time into steps.txt
    local name=$1 limit=$2; shift 2
    [[ -z "$ONLY" || " $ONLY " == *" $name "* ]] || return 0
    local start=$SECONDS
    echo "=== $name ($(date -u +%T), limit ${limit} s): $*" | tee -a "$LOG"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "$name ${PIPESTATUS[0]} $((SECONDS - start))" | tee -a "$OUT/steps.txt"
}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    $PY -c "import torch, ray, segmentation_models_pytorch as s; print('python', __import__('sys').version.split()[0],
'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'smp', s.__version__, 'ray', ray.__version__)"
    echo "cores $(nproc)"
} 2>&1 | tee -a "$LOG"

step gpu_tests 120 $PY -m pytest tests/test_gpu.py -q -p no:cacheprovider -o addopts="" -rs

step bench_ensemble_25 200 $PY benchmarks/bench_ensemble.py "${ENSEMBLE[@]}" --tta hflip --volumes 0

step data 60 $PY -m gitseg synth --profile shapes "${SYNTH[@]}" --test-cases 0 --out "$WORK/data" --overwrite
step prepare 60 $PY -m gitseg prepare --data "$WORK/data" --out "$WORK/cache" --size $SIZE --folds 3 --holdout 0

step bench_feed 120 $PY benchmarks/bench_feed.py --cache "$WORK/cache" --config configs/uwmgi.yaml "${FEED[@]}"

step search_gpu 180 $PY -m gitseg search --config configs/search_rehearsal.yaml --verbose \
    --set storage_path="$WORK/search" --set num_samples=2 --set refit.topk=0 --set num_cpus=null \
    --set workers.use_gpu=$GPU --set workers.num_workers=1 --set workers.cpus_per_worker=$CPUS \
    --set "set=[data.cache=$WORK/cache, out=$WORK/train, train.epochs=2, train.max_steps_per_epoch=$STEPS, \
train.batch_size=$BATCH, data.num_workers=$LOADERS]"
cp "$WORK/search/rehearsal/leaderboard.csv" "$OUT/search_gpu_leaderboard.csv" 2>/dev/null
cp "$WORK/search/rehearsal/search.json" "$OUT/search_gpu.json" 2>/dev/null

step bench_train 60 $PY benchmarks/bench_train.py "${TRAIN[@]}"
step bench_infer 60 $PY benchmarks/bench_infer.py "${INFER[@]}"
