#!/usr/bin/env bash
# Trainer checks on a lent GPU (after tools/gpu/install_te.sh install): TE-vs-plugin loss parity
# (tests/gpu) and 64K training throughput of a Llama-3-8B-shaped model (2 layers) per attention path.
# The project's wheels and PYTHONPATH: tools/gpu/env.sh.
set -uo pipefail
source "$(dirname "$0")/env.sh"
python3 -m pytest tests/gpu -q -s -p no:cacheprovider 2>&1 | tee "$out/te_parity.log" | grep -E "relative|passed|failed|Error" | head -5
run64k() {  # name, overrides...
  local name=$1; shift
  python3 -m megatron_prolong.train run.dir="/tmp/r64k_$name" model=llama3_8b model.num_layers=2 \
    data.seq_length=65536 train.global_batch_size=2 train.micro_batch_size=1 train.steps=10 \
    train.precision=bf16 train.lr=1e-5 data.synthetic_sequences=8 checkpoint.save_interval=0 \
    log.tensorboard=false train.memory_check=off "$@" > "$out/train_$name.log" 2>&1
  echo "$name rc $?"; grep -E "^step" "$out/train_$name.log" | tail -2
  cp "/tmp/r64k_$name/metrics.jsonl" "$out/metrics_$name.jsonl" 2>/dev/null
}
run64k plugin_auto model.attention_backend=plugin
run64k plugin_flex model.attention_backend=plugin model.attention.kernel=flex
run64k te model.attention_backend=te
