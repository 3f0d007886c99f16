#!/usr/bin/env bash
# Everything this project measures on a lent GPU machine, in one run (results in docs/benchmarks.md):
#   1. benchmarks/gpu_checks.sh (GPU tests; DeepSpeed ZeRO-2 bf16 vs plain on the `1b` preset, MFU);
#   2. the same training comparison with the previous compile scope and an eager loss, DeepSpeed
#      only (the baseline of 1, same run, same card);
#   3. benchmarks/beam_traces.py with 1, 2 and 4 workers on the machine's CPU cores, 20,000
#      programs (the Beam speed-up target cannot be met on a 2-core machine: see
#      docs/benchmarks.md). BEAM_ONLY=1 runs this section alone.
# On a machine with only PyTorch: wheels in .whl/ (DeepSpeed and its pure-Python deps) and
# .whl-beam/ (apache-beam for this Python, without pyarrow/pymongo/pillow, which the trace step
# does not import). Results land in $OUT (default: runs/device-checks).
set -uo pipefail
OUT=${OUT:-runs/device-checks}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export OUT PYTHONUNBUFFERED=1

if [ -z "${BEAM_ONLY:-}" ]; then   # BEAM_ONLY=1: section 3 alone
# 1: the GPU checks (installs .whl/ into /tmp/site and sets PYTHONPATH itself)
QUICK=1 bash benchmarks/gpu_checks.sh

export PYTHONPATH=/tmp/site:$PWD/operator:$PWD/jobs:$PWD/model:$PWD/beam:$PWD
# 2: the previous configuration, DeepSpeed only
timeout 150 $PY benchmarks/train_throughput.py --preset 1b --device cuda --steps 6 --micro-batch 8 \
    --compile-scope pointwise --eager-loss --no-baseline --json "$OUT/train-1b-mb8-pointwise.json" \
    2>&1 | grep -v -E "^\[|Warning|warn" | tee "$OUT/train-1b-mb8-pointwise.txt"
fi
export PYTHONPATH=/tmp/site:$PWD/operator:$PWD/jobs:$PWD/model:$PWD/beam:$PWD

# 3: Beam on the CPU cores
if [ -d .whl-beam ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/beam-site \
        .whl-beam/*.whl || exit 1
    export PYTHONPATH=/tmp/beam-site:$PYTHONPATH
fi
# the tracer's C recorder, when this machine has a compiler and the Python headers
$PY - <<'PYEOF' 2>&1 | tail -1 | tee "$OUT/ctracer.txt"
import subprocess, sysconfig
out = "beam/cwm_beam/_ctracer" + sysconfig.get_config_var("EXT_SUFFIX")
cmd = ["gcc", "-O2", "-shared", "-fPIC", "-I" + sysconfig.get_paths()["include"],
       "beam/cwm_exec/_ctracer.c", "-o", out]
r = subprocess.run(cmd, capture_output=True, text=True)
print("built " + out if r.returncode == 0 else "C recorder not built: " + (r.stderr or "")[-300:])
PYEOF
nproc | tee "$OUT/cpus.txt"
# 20,000 programs: per-process start-up is small beside a run this long (5,000 was not enough)
timeout 300 $PY benchmarks/beam_traces.py --synthetic 19200 --workers 1 2 4 2>&1 | grep -v -E "Warning|warn" \
    | tail -20 | tee "$OUT/beam-traces.txt"
