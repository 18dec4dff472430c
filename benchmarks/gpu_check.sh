#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine, at most 8 minutes, nothing fetched from the
# network (missing pure-Python packages travel as wheels in .whl/, see the device tool's README).
# Results go under $OUT, one file per step, each step timed.
#   1. the CUDA tests (tests/test_gpu.py)
#   2. a search of 2 trials with workers.use_gpu (one GPU worker per trial) on a real-size subset:
#      `synth --profile shapes` (every real geometry, 144- and 80-slice scans) prepared at 320 px
#   3. training throughput, real loader and augmentations vs ready tensors, 0-8 loader workers
#      (bench_feed.py, configs/uwmgi.yaml's model): is training data-bound?
#   4. a 25-member ensemble (5 configurations x 5 folds, hflip TTA) on one 144 x 266 x 266 case-day
#      (bench_ensemble.py --original 266): seconds per case-day (goal: under 5 s on an H100/H200)
#   5. the earlier training and inference benchmarks (fp32/bf16 x memory format; fused TTA vs loop)
set -uo pipefail
OUT=${OUT:-runs/gpu}
WORK=${WORK:-/tmp/gitseg-gpu}
mkdir -p "$OUT" "$WORK"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
step() {  # step NAME COMMAND...: run, keep its output in $OUT/NAME.txt, record its time
    local name=$1; shift
    local start=$SECONDS
    echo "=== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.txt"
    echo "$name ${PIPESTATUS[0]} $((SECONDS - start))" | tee -a "$OUT/steps.txt"
}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, segmentation_models_pytorch as s; print('torch', torch.__version__, 'smp', s.__version__)"
    nproc
} 2>&1 | tee "$OUT/device.txt"

step gpu_tests python3 -m pytest tests/test_gpu.py -q -p no:cacheprovider -o addopts=""

step data python3 -m gitseg synth --profile shapes --cases 3 --test-cases 0 --out "$WORK/data" --overwrite
step prepare python3 -m gitseg prepare --data "$WORK/data" --out "$WORK/cache" --size 320 --folds 3 --holdout 0
step search_gpu python3 -m gitseg search --config configs/search_rehearsal.yaml \
    --set storage_path="$WORK/search" --set num_samples=2 --set refit.topk=0 --set num_cpus=null \
    --set workers.use_gpu=true --set workers.num_workers=1 --set workers.cpus_per_worker=4 \
    --set "set=[data.cache=$WORK/cache, out=$WORK/train, train.epochs=2, train.max_steps_per_epoch=40, train.batch_size=16, data.num_workers=4]"
cp "$WORK/search/rehearsal/leaderboard.csv" "$OUT/search_gpu_leaderboard.csv" 2>/dev/null

step bench_feed python3 benchmarks/bench_feed.py --cache "$WORK/cache" --config configs/uwmgi.yaml \
    --steps 30 --workers 0 2 4 8
step bench_ensemble_25 python3 benchmarks/bench_ensemble.py --device cuda --configs 5 --folds 5 \
    --encoder efficientnet-b4 --size 320 --original 266 --slices 144 --tta hflip

step bench_train python3 benchmarks/bench_train.py --device cuda --size 256 --batch-size 32 --steps 30
step bench_infer python3 benchmarks/bench_infer.py --device cuda --size 256 --slices 144 --batch-size 64 --repeats 3
