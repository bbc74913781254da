"""AdamW with fp32 master weights (Megatron's optimizer) and the warmup + cosine-to-floor schedule."""

from __future__ import annotations

from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_prolong.config import ParallelConfig, TrainConfig


def min_lr(train: TrainConfig) -> float:
    return train.min_lr if train.min_lr is not None else train.lr * train.min_lr_ratio


def build_optimizer(train: TrainConfig, parallel: ParallelConfig, model_chunks: list) -> MegatronOptimizer:
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
    return get_megatron_optimizer(cfg, model_chunks)


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
