#!/usr/bin/env bash
# Context-parallel attention checks on one lent GPU. Usage: cp_checks.sh [128k|512k] [BASE]
#   128k (< 5 minutes): the cudnn kernel vs the reference at CP = 1 and simulated CP 2/4/8
#        (tests/gpu), the Triton ring passes; per-rank attention rate under CP vs the same
#        kernel's CP = 1 rate on 128K rows (tools/bench_cp.py --simulate, with a kernel profile of
#        the slowest rank; the packed rows also with the `spread` split), and over a stream of
#        64K rows of the stage-1 mix (graph builds counted).
#   512k (< 8 minutes): the same rate at CP = 8 on 512K rows (one document, eight 64K documents,
#        mean-2K packed; the packed rows also with the `spread` split), and a stream of 512K rows
#        of the stage-2 mix.
#   BASE: a folder holding an earlier tree's megatron_prolong and tools (git archive), timed in the
#        same run for a before/after at 128K.
# The project's wheels and PYTHONPATH: tools/gpu/env.sh. Logs and JSON under $OUT.
set -uo pipefail
what=${1:-128k}
base=${2:-}
source "$(dirname "$0")/env.sh"
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv > "$out/gpu.txt" 2>&1
bench() {  # name, timeout, args...
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 tools/bench_cp.py "$@" --out "$out/$name.json" > "$out/$name.log" 2>&1
  echo "$name rc $?"; grep -E '^\{"(layout|cp)"' "$out/$name.log" | cut -c1-400
}
if [ "$what" = 128k ]; then
  timeout 150 python3 -m pytest tests/gpu/test_cudnn_attention.py tests/gpu/test_ring_ops.py -q -s \
    -p no:cacheprovider 2>&1 | tee "$out/cudnn_numerics.log" | grep -E "relative|passed|failed|Error" | tail -30
  bench cp_sim_128k 150 --simulate 2,4,8 --seq 131072 --backends cudnn \
    --layouts one_doc,mean8K,mean2K --warmup 2 --rep 4 --profile
  bench cp_sim_128k_spread 120 --simulate 2,4,8 --seq 131072 --backends cudnn --split spread \
    --layouts mean8K,mean2K --warmup 2 --rep 4
  bench cp_stream_64k 150 --simulate 2,4,8 --seq 65536 --backends cudnn --stream 12 --mix stage1
  if [ -n "$base" ]; then
    (cd "$base" && PYTHONPATH=/tmp/site:$PWD:$PWD/tools timeout 120 python3 tools/bench_cp.py \
      --simulate 2,4,8 --seq 131072 --backends cudnn --layouts one_doc,mean8K,mean2K --warmup 2 \
      --rep 4 --out "$out/cp_sim_128k_base.json" > "$out/cp_sim_128k_base.log" 2>&1)
    echo "base rc $?"; grep -E '^\{"layout"' "$out/cp_sim_128k_base.log" | cut -c1-400
  fi
else
  bench cp_sim_512k 240 --simulate 8 --seq 524288 --backends cudnn \
    --layouts one_doc,docs64K,mean2K --warmup 1 --rep 2
  bench cp_sim_512k_spread 150 --simulate 8 --seq 524288 --backends cudnn --split spread \
    --layouts docs64K,mean2K --warmup 1 --rep 2
  bench cp_stream_512k 200 --simulate 8 --seq 524288 --backends cudnn --stream 6 --mix stage2
fi
