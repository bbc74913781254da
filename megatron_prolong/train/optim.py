"""AdamW with fp32 master weights (Megatron's optimizer) and the warmup + cosine-to-floor schedule."""

from __future__ import annotations

import math

import torch
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer.optimizer import GRAD_NORM_GROUP_ATTR
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_prolong.config import ParallelConfig, TrainConfig


def min_lr(train: TrainConfig) -> float:
    return train.min_lr if train.min_lr is not None else train.lr * train.min_lr_ratio


def inner_optimizers(optimizer: MegatronOptimizer) -> list:
    """The torch optimizers inside Megatron's (one per parameter group kind of a chained optimizer)."""
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o.optimizer for o in chained if getattr(o, "optimizer", None) is not None]


def keeps_param_steps(optimizer: MegatronOptimizer) -> bool:
    """Whether the inner optimizers count steps per parameter (torch's Adam and AdamW: a tensor in
    each parameter's state) rather than per parameter group (TE's and Apex's FusedAdam, which
    Megatron picks wherever either imports: an int in ``param_groups[i]["step"]``)."""
    return all(isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) for inner in inner_optimizers(optimizer))


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
    _check_step_if_finite_covers(optimizer)
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


def step_if_finite(optimizer: MegatronOptimizer, loss_finite: bool = True) -> tuple[bool, float]:
    """Megatron-Core 0.19's ``ChainedOptimizer.step()`` in its pieces, each run once, with the update
    refused when the loss or the gradient norm is not finite: (updated, gradient norm before clipping).

    ``step()`` alone would apply a NaN or infinite gradient: it skips only on the overflow flag, which
    it sets only with a loss scaler (fp16), and bf16 and fp32 have none. Its pieces: the gradients
    copied to the fp32 main gradients (one pass), their norm (one all-reduce), clipping by that norm,
    the update. Calling ``get_grad_norm()`` and then ``step()`` would copy and reduce twice."""
    found_inf = optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    if found_inf or not loss_finite or not math.isfinite(grad_norm):
        return False, grad_norm
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = [] if getattr(inner, "is_stub_optimizer", False) else inner.get_parameters()
        if inner.config.clip_grad > 0.0 and params:
            clip_grad_by_total_norm_fp32(params, max_norm=inner.config.clip_grad, total_norm=grad_norm)
    return optimizer.step_with_ready_grads(), grad_norm


def _check_step_if_finite_covers(optimizer: MegatronOptimizer) -> None:
    """``step_if_finite`` leaves out the parts of Megatron's ``step()`` that the trainer never turns
    on; refuse an optimizer that uses one rather than train it differently."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        c = inner.config
        unsupported = [name for name, on in (
            ("use_precision_aware_optimizer", c.use_precision_aware_optimizer),
            ("log_num_zeros_in_grad", c.log_num_zeros_in_grad),
            ("grad_norm_skip_threshold", math.isfinite(c.grad_norm_skip_threshold)),
            ("separate gradient-norm groups", any(getattr(p, GRAD_NORM_GROUP_ATTR, None) for p in inner.get_parameters())),
        ) if on]
        if unsupported:
            raise NotImplementedError(f"step_if_finite does not implement Megatron's {', '.join(unsupported)}")
