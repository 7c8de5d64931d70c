#!/usr/bin/env bash
# The GPU checks and benchmarks, for a session lent the device machine (15 minutes in all, start included):
#   bash scripts/gpu_wheels.sh                                  # here, once: wheels the device image lacks
#   device run: carry [".wheels"], timeout_s <= 600, command "bash bench/gpu_session.sh [STEP ...]"
# Steps ("tests gdn" by default: the delta-rule checks, within one 600 s call), each with a time limit and logged
# to $OUT/<step>.log; a step that fails or runs out of time is noted in $OUT/steps.txt and the next one still runs:
#   tests       (300 s) pytest tests/test_cuda.py: Triton kernels and the model on CUDA vs the CPU oracles (bf16 and
#                       fp16 at K = 64 and 128 against float64 with fla's metric and tolerances; extreme decays,
#                       documents ending inside chunks, scale 1, > 65,535 programs on grid axis 0)
#   gdn         (270 s) bench/kernel_gdn.py: our Triton delta rule vs fla vs the torch reference at 1x4096x16,
#                       8x4096x16 and 1x32768x64 (K = V = 128, bf16, fwd and fwd+bwd) and our per-kernel split
#                       ($OUT/gdn.json)
#   train_step  (260 s) bench/train_step.py --skip-cpu: 0.8B bf16 seq 4096, eager vs compiled vs transformers + fla
#   titan       (60 s)  the torchtitan trainer on debug.toml + compile (also writes the debug corpus and tokenizer)
#   titan_08b   (200 s) the trainer on train_configs/qwen35_0.8b.toml as the recipe sets it (compile of model and
#                       loss, selective AC, float8) on this one GPU: no FSDP, so bf16 by autocast; the debug corpus
#                       and tokenizer stand in for the real ones; logs tps / TFLOPs / MFU every 5 steps
#                       (local batch TITAN_LOCAL_BATCH, default the recipe's 4, x 4096 tokens)
#   packed_step (240 s) bench/packed_step.py: 0.8B bf16 compiled step on 4 x 4096 packed tokens, dense mask + full
#                       logits vs flex_attention + chunked loss (tokens/s, MFU, peak memory), then attention alone
#                       (4 and 16 documents); not in the default list: name it
#   cp_32k      (240 s) bench/context_parallel.py --one-device-step cuda: the 0.8B step (bf16, chunked loss, no AC)
#                       at T = 32,768 (documents of 4,096) with CP = 1 on this one GPU: the memory model (saved
#                       activations + gradients) vs the measured peak; not in the default list: name it
#   decode      (300 s) bench/decode_gpu.py --new-tokens 128: #17's eval throughput, the 0.8B bf16 GSM8K-shaped
#                       batch (32 left-padded prompts of 60-160 tokens, 128 greedy tokens each, EOS off) in
#                       questions/s, ours compiled (CUDA graphs) and eager next to transformers (+ fla) on the same
#                       weights, with the compile time and the token agreement ($OUT/decode.json). Estimate ~190 s:
#                       imports and models ~25 s, first use of our and fla's Triton kernels ~70 s, compile ~60 s,
#                       then 4 calls each (warm-up + 3 repeats) of transformers ~5 s (~35 ms/step), ours eager ~3 s
#                       and ours compiled ~1 s; not in the default list: name it
# All eight exceed one call's 600 s: split them over calls on the warm machine (each within the idle release time),
# e.g. "tests gdn" (timeout_s 600) then "train_step titan_08b" (timeout_s 480).
# A fresh machine compiles every Triton kernel and autotunes fla's once per process, which is most of each limit.
# Record the numbers in BENCHMARKS.md with the device named.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
    # Into a separate target, first on the path: the image's own packages (transformers 5.17) stay untouched.
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .wheels/*.whl || echo "pip install failed"
    export PYTHONPATH=/tmp/site:$PWD
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'triton', triton.__version__)"
    python3 -c "import fla, transformers; print('fla', fla.__version__, 'transformers', transformers.__version__)"
} > "$OUT/env.txt" 2>&1
export PYTHONPATH=/tmp/site:$PWD

step() {  # step NAME SECONDS COMMAND...: run, log to $OUT/NAME.log, note the exit status
    local name=$1 seconds=$2
    shift 2
    local start=$SECONDS
    timeout "$seconds" "$@" > "$OUT/$name.log" 2>&1
    echo "$name: exit $? after $((SECONDS - start)) s" | tee -a "$OUT/steps.txt"
}

for name in ${@:-tests gdn}; do
    case $name in
        # pytest-timeout (in the device image) fails a test that hangs instead of letting it eat the step's limit
        tests) per_test=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout=60")
               step tests 300 python3 -m pytest -v -p no:cacheprovider --tb=short $per_test tests/test_cuda.py ;;
        train_step) step train_step 260 python3 bench/train_step.py --skip-cpu ;;
        gdn) step gdn 270 python3 bench/kernel_gdn.py --out "$OUT/gdn.json" ;;
        titan) step titan 60 python3 -m torchtitan_ext.train --config train_configs/debug.toml --training.steps 40 \
            --compile.enable true --metrics.log_freq 10 --job.dump_folder /tmp/titan_debug ;;
        titan_08b) python3 -m torchtitan_ext.debug_assets outputs/debug_assets > /dev/null
            step titan_08b 200 python3 -m torchtitan_ext.train --config train_configs/qwen35_0.8b.toml \
            --model.hf_assets_path outputs/debug_assets --data.dataset_path outputs/debug_assets/stdlib_docs.jsonl \
            --parallelism.data_parallel_shard_degree 1 --training.local_batch_size "${TITAN_LOCAL_BATCH:-4}" \
            --training.steps 20 --lr_scheduler.warmup_steps 2 --checkpoint.enable false --metrics.log_freq 5 \
            --job.dump_folder /tmp/titan_08b ;;
        packed_step) step packed_step 240 bash -c 'python3 bench/packed_step.py --device cuda --flavor 0.8B \
            --dtype bfloat16 --compile --threads 16 --warmup 2 --repeats 5 && for docs in 4 16; do
            python3 bench/packed_step.py --device cuda --dtype bfloat16 --attention-only --docs $docs \
            --doc-len $((16384 / docs)) --warmup 2 --repeats 5; done' ;;
        cp_32k) step cp_32k 240 python3 bench/context_parallel.py --one-device-step cuda --flavor 0.8B \
            --seq-lens 32768 ;;
        decode) step decode 300 python3 bench/decode_gpu.py --new-tokens 128 --repeats 3 --out "$OUT/decode.json" ;;
        *) echo "unknown step $name (tests, train_step, gdn, titan, titan_08b, packed_step, cp_32k, decode)" \
            | tee -a "$OUT/steps.txt" ;;
    esac
done
