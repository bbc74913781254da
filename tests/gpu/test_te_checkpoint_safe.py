"""GPU with Transformer Engine: checkpoints whose layers carry TE ``_extra_state`` pass the
safe-checkpoint allow-list (megatron_prolong.safe_checkpoint) and resume."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from trainrun import train

from megatron_prolong.safe_checkpoint import verify

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None, reason="needs Transformer Engine"),
]

RUN = ("train.precision=bf16", "data.seq_length=1024", "train.global_batch_size=4", "train.micro_batch_size=2",
       "checkpoint.save_interval=0", "log.tensorboard=false", "model.attention_backend=te")


def test_te_checkpoint_passes_the_allow_list_and_resumes(tmp_path):
    train(tmp_path / "run", *RUN, "train.steps=2")
    verify(tmp_path / "run" / "checkpoints" / "iter_0000002")
    resumed = train(tmp_path / "run", *RUN, "train.steps=3")
    assert "resumed from" in resumed.output and len(resumed.losses) == 1
