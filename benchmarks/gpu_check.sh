#!/usr/bin/env bash
# The GPU half of minilora, checked on a real GPU in under 15 minutes (stages 5 and 6, the step times and the memory wall, take the most).
#
# On a fresh GPU machine:
#     pip install '.[cuda12,test]'        # or '.[cuda13,test]'; add torch for the PyTorch column
#     bash benchmarks/gpu_check.sh
#
# Stages, each with its own time limit; the script stops at the first failure:
#   1. CuPy sees the GPU (name, CuPy and CUDA versions)
#   2. the test suite with CuPy required: every test parametrised over
#      numpy / standin / cupy runs its cupy case (MINILORA_REQUIRE_CUPY=1 turns a
#      CuPy that cannot start into failures, not skips)
#   3. minilora --backend cupy gradcheck
#   4. a short pretraining run, a sample from it, and a LoRA fine-tune, on CuPy
#   5. benchmarks/gpu_steps.py: the step-time table (NumPy, CuPy, PyTorch eager)
#   6. benchmarks/memory_wall.py --backend cupy: the memory wall on the GPU, GPT-2 small and XL for full, LoRA and
#      QLoRA, with and without activation checkpointing: each cell's plan against the CuPy memory pool's
#      high-water mark; a cell whose plan exceeds the GPU's free memory is refused by the plan; the stage fails if
#      a measured peak exceeds 1.10 x its plan
#
# Expected output, in order: the GPU line; pytest's summary ending
# "N passed, M xfailed" (no "skipped" among the cupy cases, no failures);
# gradcheck's table ending "... passed, 0 failed"; "pretrained 60 steps ...";
# a line of sampled text; the LoRA run's summary line; the gpu_steps table
# (see the comment at the top of benchmarks/gpu_steps.py); the memory-wall table
# (| size | method | checkpointing | plan | GPU pool peak | peak / plan | step (s) |); then
# "gpu_check: all stages passed in S s".
set -euo pipefail
cd "$(dirname "$0")/.."
export MINILORA_REQUIRE_CUPY=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MPLBACKEND=Agg
RUN="$(mktemp -d)"
trap 'rm -rf "$RUN"' EXIT
START=$SECONDS

stage() {  # stage NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo
    echo "== $name (limit ${limit}s)"
    local t0=$SECONDS rc=0
    timeout "$limit" "$@" || rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "-- $name: FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ', over its time limit'))"
        return "$rc"
    fi
    echo "-- $name: $((SECONDS - t0)) s"
}

stage "1. CuPy sees the GPU" 60 python -c "
import cupy
n = cupy.cuda.runtime.getDeviceCount()
assert n >= 1, 'no GPU visible'
p = cupy.cuda.runtime.getDeviceProperties(0)
print(f\"GPU: {p['name'].decode()} ({p['totalGlobalMem'] / 2**30:.0f} GiB), CuPy {cupy.__version__}, \"
      f'CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}')
" || { echo "gpu_check: CuPy cannot use a GPU here; install the extra: pip install '.[cuda12,test]'"; exit 1; }

stage "2. test suite, CuPy required" 150 python -m pytest -o addopts= -q -p no:cacheprovider -rs
stage "3. gradcheck on CuPy" 60 python -m minilora.cli --backend cupy gradcheck
stage "4a. pretraining on CuPy" 60 python -m minilora.cli --backend cupy pretrain --steps 60 --eval-every 30 \
    --checkpoint-every 0 --out "$RUN/pretrain"
stage "4b. sampling on CuPy" 30 python -m minilora.cli --backend cupy generate \
    --checkpoint "$RUN/pretrain/checkpoint.npz" --max-new-tokens 80 --stop-at-newline
stage "4c. LoRA fine-tune on CuPy" 60 python -m minilora.cli --backend cupy finetune --method lora \
    --checkpoint "$RUN/pretrain/checkpoint.npz" --steps 30 --out "$RUN/lora"
stage "5. step times" 300 python benchmarks/gpu_steps.py --steps 10 --max-seconds 15  # 300 s: the gpt2-small row's NumPy step is slow
stage "6. the memory wall on the GPU" 300 python benchmarks/memory_wall.py --backend cupy --methods full,lora,qlora \
    --sizes gpt2-small,gpt2-xl \
    --out "$RUN/memory_wall_gpu.json" --figure ""
cp "$RUN/memory_wall_gpu.json" benchmarks/memory_wall_gpu.json  # to commit beside the CPU's table

echo
echo "gpu_check: all stages passed in $((SECONDS - START)) s"
