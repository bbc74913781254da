#!/usr/bin/env bash
# Context-parallel attention checks on one lent GPU (< 4 minutes): the cudnn kernel vs the
# reference at CP = 1 and simulated CP (tests/gpu/test_cudnn_attention.py), then per-rank
# attention rate under CP vs the same kernel's CP = 1 rate (tools/bench_cp.py --simulate).
# Needs the project's wheels in .whl (cudnn-frontend among them); logs and JSON under $OUT.
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/tools PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv > "$out/gpu.txt" 2>&1
timeout 100 python3 -m pytest tests/gpu/test_cudnn_attention.py -q -s -p no:cacheprovider 2>&1 | tee "$out/cudnn_numerics.log" | grep -E "relative|passed|failed|Error" | tail -14
# 128K row: CP = 2 (stage 1's split of a 64K-per-rank share) and CP = 8 (16K per rank)
timeout 70 python3 tools/bench_cp.py --simulate 2,8 --seq 131072 --backends cudnn \
  --layouts one_doc,mean8K,mean2K --warmup 2 --rep 4 --out "$out/bench_cp_sim.json" > "$out/bench_cp_sim.log" 2>&1
echo "bench_cp rc $?"; grep -v '^{"device"' "$out/bench_cp_sim.log" | tail -14
# flex (what CP used before): one document and mean 2K, to compare (it compiles per shape)
timeout 100 python3 tools/bench_cp.py --simulate 2,8 --seq 131072 --backends flex \
  --layouts one_doc,mean2K --warmup 2 --rep 4 --out "$out/bench_cp_sim_flex.json" > "$out/bench_cp_sim_flex.log" 2>&1
echo "bench_cp flex rc $?"; grep -v '^{"device"' "$out/bench_cp_sim_flex.log" | tail -6
