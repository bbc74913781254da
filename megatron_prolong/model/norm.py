"""RMSNorm that works with Megatron's sequence parallelism without Transformer Engine.

Megatron's local spec refuses sequence parallelism because torch's norms lack the attribute that
tells ``finalize_model_grads`` to all-reduce their gradients across tensor-parallel ranks (each
rank sees only its slice of the sequence). Marking the weight is all it takes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_prolong.model.released import rebuildable


class RMSNorm(torch.nn.RMSNorm):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused) -> None:
        # In the model's dtype like every Megatron parameter: the bf16 optimizer checkpoints only
        # parameters it maps from the model's 16-bit groups.
        super().__init__(normalized_shape=hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = bool(config.sequence_parallel)


class RebuiltRMSNorm(RMSNorm):
    """``train.recompute_modules`` ``layernorm``: the output feeding the QKV / fc1 projection is
    released after that projection's forward and rebuilt from the norm's input, which the norm's
    own backward keeps anyway (model/released.py)."""

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)  # torch.nn.RMSNorm.forward's call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rebuildable(self._norm, x, (self.weight,))
