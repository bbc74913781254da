"""Output layer and cross-entropy in blocks of tokens (ProLong: 2,048).

At 64K tokens and a 128K vocabulary the logits of one sequence take 16 GiB in bf16 (more in fp32
for the softmax). Here the output layer and the vocabulary-parallel cross entropy run on one
block of tokens at a time under activation checkpointing: the forward keeps only the per-token
losses, the backward recomputes one block's logits at a time. Plugged into Megatron's GPTModel
through its ``output_processor`` hook; the result equals Megatron's own loss path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from torch.utils.checkpoint import checkpoint


def _block_loss(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, tp_group) -> torch.Tensor:
    logits = F.linear(x, weight).float()
    return tensor_parallel.vocab_parallel_cross_entropy(logits.unsqueeze(1), labels.unsqueeze(1), tp_group=tp_group).squeeze(1)


class BlockwiseLoss:
    """``output_processor`` for GPTModel.forward: per-token loss [b, s] without full logits."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size

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
        losses = [
            checkpoint(_block_loss, x[i : i + self.block_size], weight, flat_labels[i : i + self.block_size],
                       tp_group, use_reentrant=False)
            for i in range(0, s * b, self.block_size)
        ]
        return torch.cat(losses).reshape(s, b).transpose(0, 1)
