"""AdamW with fp32 master weights (Megatron's optimizer) and the warmup + cosine-to-floor schedule."""

from __future__ import annotations

import torch
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_prolong.config import ParallelConfig, TrainConfig


def min_lr(train: TrainConfig) -> float:
    return train.min_lr if train.min_lr is not None else train.lr * train.min_lr_ratio


def inner_optimizers(optimizer: MegatronOptimizer) -> list:
    """The torch optimizers inside Megatron's (one per parameter group kind of a chained optimizer)."""
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o.optimizer for o in chained if getattr(o, "optimizer", None) is not None]


def use_fused_adam(optimizer: MegatronOptimizer) -> None:
    """Without TE or Apex, Megatron builds torch's AdamW with its default multi-tensor (foreach)
    implementation: about a dozen passes over the fp32 master weights and moments. torch's fused
    implementation does the update in one kernel per parameter group chunk, same math."""
    for inner in inner_optimizers(optimizer):
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            for group in inner.param_groups:
                group["fused"], group["foreach"] = True, False


def build_optimizer(
    train: TrainConfig, parallel: ParallelConfig, model_chunks: list, implementation: str = "foreach"
) -> MegatronOptimizer:
    """``implementation``: auto (fused on CUDA) | fused | foreach (torch AdamW's default)."""
    bf16 = train.precision == "bf16"
    cfg = OptimizerConfig(
        optimizer="adam",
        lr=train.lr,
        min_lr=min_lr(train),
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        adam_eps=train.adam_eps,
        clip_grad=train.grad_clip,
        bf16=bf16,
        params_dtype=model_chunks[0].config.params_dtype,
        use_distributed_optimizer=parallel.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(cfg, model_chunks)
    if implementation == "fused" or (implementation == "auto" and torch.cuda.is_available()):
        use_fused_adam(optimizer)
    return optimizer


def build_scheduler(train: TrainConfig, optimizer: MegatronOptimizer) -> OptimizerParamScheduler:
    """Steps are optimizer steps; warmup is a fraction of them, decay runs to the last one."""
    warmup = int(round(train.warmup_fraction * train.steps))
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=train.lr,
        min_lr=min_lr(train),
        lr_warmup_steps=warmup,
        lr_decay_steps=train.steps,
        lr_decay_style=train.lr_decay_style,
        start_wd=train.weight_decay,
        end_wd=train.weight_decay,
        wd_incr_steps=train.steps,
        wd_incr_style="constant",
    )
