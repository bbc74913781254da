#!/usr/bin/env bash
# The speed and memory harness (tools/bench.py) on a lent GPU: the plugin's layer, and, where
# Transformer Engine imports (after tools/gpu/install_te.sh install on the same machine), the
# trainer's TE path and stock Megatron-Core + TE side by side, 64K tokens, 2 and 4 layers, four
# layouts (about 5 minutes with TE on an H200). Writes $OUT/bench.json and $OUT/bench.log.
#
#   bash tools/gpu/bench.sh                      # the default comparison
#   bash tools/gpu/bench.sh --whole-model ...    # extra arguments go to tools/bench.py
#
# The project's wheels and PYTHONPATH: tools/gpu/env.sh.
set -uo pipefail
source "$(dirname "$0")/env.sh"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,memory.used --format=csv | tee "$out/gpu.txt"
python3 tools/bench.py --out "$out/bench.json" --warmup 2 --steps 4 "$@" 2>&1 | tee "$out/bench.log" \
  | grep -vE "Warning|warnings.warn|DEPRECATED"
