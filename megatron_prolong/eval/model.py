"""Load a trainer (or converted) checkpoint into a GPTModel for evaluation, in any TP/CP layout."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from megatron_prolong.config import ParallelConfig, TrainConfig
from megatron_prolong.convert import mcore


def eval_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def load_eval_model(checkpoint: str | Path, parallel: ParallelConfig, dtype: str | None = None):
    """(GPTModel in eval mode on this rank's device, checkpoint meta). Needs Megatron's groups initialised.

    The plugin's document attention is used whatever backend the checkpoint was trained with, so
    packed lines are scored per document on any machine; the weights are the same either way.
    """
    from megatron.core import dist_checkpointing

    from megatron_prolong.model.builder import build_model, build_transformer_config

    ckpt, meta = mcore.read_checkpoint(checkpoint)
    mcore.verify_safe(ckpt)
    model_cfg = replace(mcore.model_config_from_meta(meta), attention_backend="plugin")
    if dtype is None:
        reader = mcore.DistCheckpointReader(ckpt, prefix="")
        dtype = mcore.dtype_name(reader.dtype("embedding.word_embeddings.weight"))
    tconfig = build_transformer_config(model_cfg, parallel, TrainConfig(precision=dtype))
    gpt = build_model(model_cfg, tconfig, int(meta["vocab_size"]), int(meta["seq_length"]), seed=0)
    gpt.to(eval_device())
    sd = {"model": gpt.sharded_state_dict(metadata=mcore.SHARDING_META)}
    loaded = dist_checkpointing.load(sd, str(ckpt))
    gpt.load_state_dict(loaded["model"])
    gpt.eval()
    return gpt, meta
