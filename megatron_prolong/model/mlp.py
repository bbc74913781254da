"""Megatron's MLP with the SwiGLU output rebuilt for backward (``train.recompute_modules=[swiglu]``).

The fc2 projection keeps its input, the SwiGLU output (s x f bf16: 1.75 GiB per Llama-3-8B layer
at 64K tokens), for its weight gradient, while the SwiGLU's own backward keeps fc1's output
(2f wide) anyway. Here the SwiGLU output is released right after fc2's forward and rebuilt from
fc1's output when fc2's output gradient arrives (model/released.py): one elementwise pass over
fc1's output per layer buys back a third of the MLP's activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl
from megatron.core.transformer.mlp import MLP

from megatron_prolong.model.released import rebuildable, release_after


class SwiGLURecomputeMLP(MLP):
    """Gated SiLU without bias (Llama's MLP); Megatron's fused SwiGLU where the config fuses it."""

    def _swiglu(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.bias_activation_fusion:
            return bias_swiglu_impl(x, None)
        gate, up = torch.chunk(x, 2, dim=-1)
        return F.silu(gate) * up

    def forward(self, hidden_states: torch.Tensor, per_token_scale: torch.Tensor | None = None, **kwargs):
        if per_token_scale is not None:
            raise ValueError("the SwiGLU recompute MLP is for dense layers (no per-token scale)")
        fc1, bias = self.linear_fc1(hidden_states)
        if bias is not None:
            raise ValueError("the SwiGLU recompute MLP needs linears without bias (add_bias_linear=False)")
        act = rebuildable(self._swiglu, fc1)
        out, out_bias = self.linear_fc2(act)
        release_after(act, out)
        return out, out_bias
