#!/usr/bin/env bash
# The speed and memory harness (tools/bench.py) on a lent GPU: the plugin's layer, and, where
# Transformer Engine imports (tools/gpu/install_te.sh install, then PYTHONPATH=/tmp/te:...), the
# trainer's TE path and stock Megatron-Core + TE side by side, 64K tokens, 2 and 4 layers, four
# layouts (about 5 minutes with TE on an H200). Writes $OUT/bench.json and $OUT/bench.log.
#
#   bash tools/gpu/bench.sh                      # the default comparison
#   bash tools/gpu/bench.sh --whole-model ...    # extra arguments go to tools/bench.py
#
# Needs the project's wheels in $WHL (default .whl: megatron-core, hydra-core, omegaconf, antlr4,
# mosaicml-streaming and its imports, nvidia-cudnn-frontend) unless megatron-core imports already.
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
whl=${WHL:-.whl}
if ! python3 -c "import megatron.core, hydra, streaming" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$whl"/*.whl || exit 1
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,memory.used --format=csv | tee "$out/gpu.txt"
python3 tools/bench.py --out "$out/bench.json" --warmup 2 --steps 4 "$@" 2>&1 | tee "$out/bench.log" \
  | grep -vE "Warning|warnings.warn|DEPRECATED"
