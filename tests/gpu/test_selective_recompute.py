"""GPU: train.recompute=selective with the plugin's modules (model/released.py) through the trainer
in bf16, with Megatron's fused, torch.compile'd SwiGLU and torch's fused RMSNorm: the same losses
and gradient norms as no recompute, bit for bit (on the GPU each norm's input gradient is one
kernel's output, so the rebuilt graph sums nothing in another order), and each step's peak lower
by what the modules drop in every layer, less at most one layer's worth (the refill of a layer's
output briefly holds it twice)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LAYERS, SEQ, HIDDEN, FFN = 4, 16384, 4096, 14336


def _train(tmp_path, name: str, *overrides: str) -> list[dict]:
    run = tmp_path / name
    cmd = [sys.executable, "-m", "megatron_prolong.train", f"run.dir={run}", "model=llama3_8b",
           f"model.num_layers={LAYERS}", f"data.seq_length={SEQ}", "train.global_batch_size=1",
           "train.micro_batch_size=1", "train.steps=3", "train.precision=bf16", "train.lr=1e-4",
           "data.synthetic_sequences=4", "checkpoint.save_interval=0", "log.tensorboard=false", *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    shutil.rmtree(run / "checkpoints", ignore_errors=True)  # the last step's save: ~27 GB a run at this shape
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    """Two runs without recompute, bit-equal to each other: else a difference below need not be the
    recompute's. (On 2026-12-08, on an H100, the comparison with [swiglu] differed in the first
    step's loss, a forward value, by 6e-7 relative: 12.4908117 against 12.4908194; which of the two
    causes it is was not yet run.)"""
    first = _train(tmp_path_factory.mktemp("none"), "none", "train.recompute=none")
    again = _train(tmp_path_factory.mktemp("none_again"), "none", "train.recompute=none")
    assert [(r["loss"], r["grad_norm"]) for r in first] == [(r["loss"], r["grad_norm"]) for r in again], \
        "the trainer is not bit-reproducible on this GPU without recompute"
    return first


@pytest.mark.parametrize("modules, width", [("[swiglu]", FFN), ("[swiglu,layernorm]", FFN + 2 * HIDDEN)])
def test_same_numbers_and_less_memory(kept, tmp_path, modules, width):
    dropped = _train(tmp_path, "selective", "train.recompute=selective", f"train.recompute_modules={modules}")
    assert [r["loss"] for r in kept] == [r["loss"] for r in dropped]
    assert [r["grad_norm"] for r in kept] == [r["grad_norm"] for r in dropped]
    one = SEQ * width * 2 / 2**30  # what one layer drops, bf16
    saved = kept[-1]["memory_gib"] - dropped[-1]["memory_gib"]
    assert 0.95 * (LAYERS - 1) * one <= saved <= 1.05 * LAYERS * one, (saved, one)
