#!/usr/bin/env bash
# Every GPU check and benchmark in one run, for a session lent the device machine (15 minutes in all):
#   bash scripts/gpu_wheels.sh                                  # here, once: wheels the device image lacks
#   device run: carry [".wheels"], timeout_s 600, command "bash bench/gpu_session.sh"
# Results land in $OUT (env.txt, gdn.json + gdn.log, train_step.log); a step that fails or runs out of time is
# logged and the next one still runs. Record the numbers in BENCHMARKS.md with the device named.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-index .wheels/*.whl > "$OUT/pip.log" 2>&1 || echo "pip install failed" >> "$OUT/pip.log"
export PYTHONPATH=$PWD
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'triton', triton.__version__)"
    python3 -c "import fla; print('fla', fla.__version__)" || echo "fla not importable"
    python3 -c "import torchtitan_ext, torchtitan; print('torchtitan imports')" || echo "torchtitan_ext not importable"
} > "$OUT/env.txt" 2>&1

step() {  # step NAME SECONDS COMMAND...: run, log to $OUT/NAME.log, note the exit status
    local name=$1 seconds=$2
    shift 2
    local start=$SECONDS
    timeout "$seconds" "$@" > "$OUT/$name.log" 2>&1
    echo "$name: exit $? after $((SECONDS - start)) s" | tee -a "$OUT/steps.txt"
}

step gdn 300 python3 bench/kernel_gdn.py --out "$OUT/gdn.json"
step train_step 200 python3 bench/train_step.py --skip-cpu
cat "$OUT/steps.txt"
