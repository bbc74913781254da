#!/usr/bin/env bash
# Generation speed on a lent GPU (tools/gpu/generate_speed.py): prefill tokens/s at 32K and 128K,
# decode tokens/s on the 128K cache, Llama-3-8B shape, bf16, random weights; logs under $OUT.
# Needs the project's wheels in .whl (megatron-core, hydra, omegaconf, streaming and their imports).
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout 170 python3 tools/gpu/generate_speed.py "$@" > "$out/generate_speed.log" 2>&1
echo "rc $?"; grep -E "built|check|prompt_tokens|Error" "$out/generate_speed.log" | tail -6
