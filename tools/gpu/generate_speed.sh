#!/usr/bin/env bash
# Decoding on a lent GPU: the CUDA-graph decode tests (tests/gpu/test_decode_graphs.py), then
# tools/gpu/generate_speed.py (time per token against the memory bound, one recall sample against
# Hugging Face's generate, batching); logs and JSON under $OUT. Arguments go to generate_speed.py.
# The project's wheels and PYTHONPATH: tools/gpu/env.sh. transformers and safetensors are on the image.
set -uo pipefail
source "$(dirname "$0")/env.sh"
timeout 150 python3 -m pytest tests/gpu/test_decode_graphs.py -q -p no:cacheprovider > "$out/decode_tests.log" 2>&1
echo "tests rc $?"; tail -3 "$out/decode_tests.log"
timeout 420 python3 tools/gpu/generate_speed.py "$@" > "$out/generate_speed.log" 2>&1
echo "speed rc $?"; grep -vE "Warning|warn" "$out/generate_speed.log" | tail -20
