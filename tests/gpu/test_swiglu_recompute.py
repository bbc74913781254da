"""GPU: train.recompute=selective (the SwiGLU output recomputed, model/mlp.py) through the trainer
with Megatron's fused, torch.compile'd SwiGLU in bf16: the same losses and gradient norms as no
recompute, bit for bit, and each step's peak lower by the layers' SwiGLU outputs, less at most
one of them (the refill of a layer's output briefly holds it twice)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LAYERS, SEQ, FFN = 4, 16384, 14336


def _train(tmp_path, name: str, *overrides: str) -> list[dict]:
    run = tmp_path / name
    cmd = [sys.executable, "-m", "megatron_prolong.train", f"run.dir={run}", "model=llama3_8b",
           f"model.num_layers={LAYERS}", f"data.seq_length={SEQ}", "train.global_batch_size=1",
           "train.micro_batch_size=1", "train.steps=3", "train.precision=bf16", "train.lr=1e-4",
           "data.synthetic_sequences=4", "checkpoint.save_interval=0", "log.tensorboard=false", *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


def test_same_numbers_and_less_memory(tmp_path):
    kept = _train(tmp_path, "none", "train.recompute=none")
    dropped = _train(tmp_path, "swiglu", "train.recompute=selective")
    assert [r["loss"] for r in kept] == [r["loss"] for r in dropped]
    assert [r["grad_norm"] for r in kept] == [r["grad_norm"] for r in dropped]
    one = SEQ * FFN * 2 / 2**30  # one layer's SwiGLU output, bf16
    saved = kept[-1]["memory_gib"] - dropped[-1]["memory_gib"]
    assert 0.95 * (LAYERS - 1) * one <= saved <= 1.05 * LAYERS * one, (saved, one)
