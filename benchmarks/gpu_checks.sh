#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run (see docs/benchmarks.md for results):
#   1. the GPU-marked tests (FlexAttention fast path == SDPA reference, forward and backward);
#   2. DeepSpeed ZeRO-2 bf16 against a plain bf16-autocast loop on the `1b` preset, with MFU;
#   3. the same at a larger micro batch, DeepSpeed only.
# QUICK=1: 1 and one comparison at micro batch 8 instead of 2 and 3.
#
# Runs from the repository root, with the project installed (`make setup`) or, on a machine with
# only PyTorch, with the wheels in .whl/ (pip download / pip wheel them elsewhere) and the
# component folders on PYTHONPATH. Results land in $OUT (default: runs/gpu-checks).
set -uo pipefail
OUT=${OUT:-runs/gpu-checks}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -d .whl ] && ! $PY -c "import deepspeed" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/operator:$PWD/jobs:$PWD/model:$PWD/beam:$PWD
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)" | tee -a "$OUT/gpu.txt"

# --noconftest: the control-plane fixture plugin needs the Kubernetes client, which the GPU tests do not.
$PY -m pytest -q --noconftest -p no:cacheprovider -m gpu tests/model tests/jobs/test_data.py 2>&1 | tee "$OUT/pytest-gpu.txt"

if [ -n "${QUICK:-}" ]; then  # one comparison at micro batch 8 (both copies fit on an H200)
    timeout 200 $PY benchmarks/train_throughput.py --preset 1b --device cuda --steps 6 --micro-batch 8 \
        --json "$OUT/train-1b-mb8-both.json" 2>&1 | grep -v -E "^\[|Warning|warn" | tee "$OUT/train-1b-mb8-both.txt"
    exit 0
fi
timeout 240 $PY benchmarks/train_throughput.py --preset 1b --device cuda --steps 10 \
    --json "$OUT/train-1b-mb4.json" 2>&1 | grep -v -E "^\[|Warning|warn" | tee "$OUT/train-1b-mb4.txt"
timeout 120 $PY benchmarks/train_throughput.py --preset 1b --device cuda --steps 10 --micro-batch 8 \
    --no-baseline --json "$OUT/train-1b-mb8.json" 2>&1 | grep -v -E "^\[|Warning|warn" | tee "$OUT/train-1b-mb8.txt"
