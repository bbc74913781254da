"""Output layer and cross-entropy in blocks of tokens (ProLong: 2,048).

At 64K tokens and a 128K vocabulary the logits of one sequence take 16 GiB in bf16 (more in fp32
for the softmax). Here the output layer and the vocabulary-parallel cross entropy run on one
block of tokens at a time under activation checkpointing: the forward keeps only the per-token
losses, the backward recomputes one block's logits at a time. Plugged into Megatron's GPTModel
through its ``output_processor`` hook; the result equals Megatron's own loss path.

``cross_entropy="triton"`` runs the same per-token loss through the fused kernels of
:mod:`megatron_prolong.model.cross_entropy` (CUDA) instead of checkpointed blocks of Megatron's
unfused ``vocab_parallel_cross_entropy``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from torch.utils.checkpoint import checkpoint

from megatron_prolong.model.cross_entropy import fused_linear_cross_entropy, triton_available


def resolve_cross_entropy(choice: str) -> str:
    """``auto``: the fused Triton kernels on CUDA, Megatron's unfused cross entropy elsewhere."""
    if choice == "auto":
        return "triton" if torch.cuda.is_available() and triton_available() else "torch"
    if choice == "triton" and not triton_available():
        raise RuntimeError("kernels.cross_entropy=triton needs the `triton` package; use kernels.cross_entropy=torch")
    return choice


def _block_loss(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, tp_group) -> torch.Tensor:
    logits = F.linear(x, weight).float()
    return tensor_parallel.vocab_parallel_cross_entropy(logits.unsqueeze(1), labels.unsqueeze(1), tp_group=tp_group).squeeze(1)


class BlockwiseLoss:
    """``output_processor`` for GPTModel.forward: per-token loss [b, s] without full logits."""

    def __init__(self, block_size: int, cross_entropy: str = "torch") -> None:
        self.block_size = block_size
        self.cross_entropy = resolve_cross_entropy(cross_entropy)

    def __call__(self, *, hidden_states, output_layer, output_weight, labels, **_unused) -> torch.Tensor:
        weight = output_weight if output_weight is not None else output_layer.weight
        tp_group = output_layer.tp_group
        # What ColumnParallelLinear does to its input: gather the sequence-parallel shards, or mark
        # the replicated input so its gradient is summed over tensor-parallel ranks.
        if output_layer.sequence_parallel:
            x = tensor_parallel.gather_from_sequence_parallel_region(hidden_states, group=tp_group)
        else:
            x = tensor_parallel.copy_to_tensor_model_parallel_region(hidden_states, group=tp_group)
        s, b, h = x.shape
        x = x.reshape(s * b, h)
        flat_labels = labels.transpose(0, 1).reshape(s * b)
        if self.cross_entropy == "triton":
            loss = fused_linear_cross_entropy(x, weight, flat_labels, self.block_size, tp_group)
            return loss.reshape(s, b).transpose(0, 1)
        losses = [
            checkpoint(_block_loss, x[i : i + self.block_size], weight, flat_labels[i : i + self.block_size],
                       tp_group, use_reentrant=False)
            for i in range(0, s * b, self.block_size)
        ]
        return torch.cat(losses).reshape(s, b).transpose(0, 1)
