#!/usr/bin/env bash
# GPU checks of TE's linears under the plugin's attention and of FP8, with Transformer Engine installed by tools/gpu/install_te.sh on the same
# warm machine (TE in /tmp/te). One part per `run` call, each under the 10-minute limit:
#
#   install (the last install_te.sh call):  ... bash tools/gpu/install_te.sh install && bash tools/gpu/te_checks.sh tests
#   then, back to back:                     bash tools/gpu/te_checks.sh bench_bf16
#                                           bash tools/gpu/te_checks.sh bench_fp8
#                                           bash tools/gpu/te_checks.sh fp8_numerics
#
# tests:        tests/gpu in full ($OUT/tests_gpu.log)
# bench_bf16:   tools/bench.py, bf16, 64K tokens, the four layouts (the stage-1 mix is derived):
#               plugin vs plugin + TE linears (te_linear) vs stock Megatron-Core + TE ($OUT/bench_bf16.json)
# bench_fp8:    the bf16 plugin path vs te_linear in FP8, delayed and tensorwise scaling, with an
#               FP8 matmul timed in the same run ($OUT/bench_fp8.json)
# fp8_numerics: tools/fp8_numerics.py, 8 layers, hidden 2048, 16K-byte sequences, 300 steps, bf16
#               vs both FP8 recipes from the same start ($OUT/fp8_numerics.json and .png)
#
# The project's wheels and PYTHONPATH: tools/gpu/env.sh.
set -uo pipefail
source "$(dirname "$0")/env.sh"
python3 -c "import transformer_engine.pytorch" || { echo "Transformer Engine does not import: run tools/gpu/install_te.sh first" >&2; exit 1; }
quiet() { grep -vE "Warning|warnings.warn|DEPRECATED"; }
case "${1:-}" in
tests)
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,memory.used --format=csv | tee "$out/gpu.txt"
  python3 -m pytest tests/gpu -q -s -p no:cacheprovider -rs 2>&1 | tee "$out/tests_gpu.log" \
    | grep -E "relative|difference|passed|failed|SKIPPED|Error" | head -40
  ;;
bench_bf16)
  python3 tools/bench.py --out "$out/bench_bf16.json" --warmup 2 --steps 4 --paths plugin,te_linear,stock 2>&1 \
    | tee "$out/bench_bf16.log" | quiet
  ;;
bench_fp8)
  python3 tools/bench.py --out "$out/bench_fp8.json" --warmup 2 --steps 4 --paths plugin --fp8 delayed,tensorwise \
    --layouts one_doc,mean1.5k 2>&1 | tee "$out/bench_fp8.log" | quiet
  ;;
fp8_numerics)
  python3 tools/fp8_numerics.py --out "$out" --steps "${FP8_STEPS:-300}" 2>&1 | tee "$out/fp8_numerics.log" | quiet
  ;;
*)
  echo "usage: $0 tests | bench_bf16 | bench_fp8 | fp8_numerics" >&2
  exit 2
  ;;
esac
