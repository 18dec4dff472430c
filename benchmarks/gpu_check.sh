#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (nothing is fetched from the network):
# the CUDA tests, the training-throughput benchmark (fp32/bf16 x contiguous/channels_last, peak
# memory) and the inference benchmark (fused TTA vs naive loop). Results go under $OUT.
# Missing pure-Python packages travel as wheels in .whl/ (see the device tool's README).
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, segmentation_models_pytorch as s; print('torch', torch.__version__, 'smp', s.__version__)"
} 2>&1 | tee "$OUT/device.txt"
python3 -m pytest tests/test_gpu.py -q -p no:cacheprovider -o addopts="" 2>&1 | tee "$OUT/gpu_tests.txt"
python3 benchmarks/bench_train.py --device cuda --size 256 --batch-size 32 --steps 30 2>&1 | tee "$OUT/bench_train_gpu.txt"
python3 benchmarks/bench_infer.py --device cuda --size 256 --slices 144 --batch-size 64 --repeats 3 2>&1 | tee "$OUT/bench_infer_gpu.txt"
