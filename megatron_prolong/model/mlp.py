"""Megatron's MLP with the SwiGLU output recomputed in backward (``train.recompute_modules=[swiglu]``).

The fc2 projection keeps its input, the SwiGLU output (s x f bf16: 1.75 GiB per Llama-3-8B layer
at 64K tokens), for its weight gradient, while the SwiGLU's own backward keeps fc1's output
(2f wide) anyway. Here the SwiGLU output's storage is released right after fc2's forward and
refilled from fc1's output when fc2's output gradient arrives, just before fc2's backward: one
elementwise pass over fc1's output per layer buys back a third of the MLP's activations. It is
the scheme of Megatron-Core's ``CheckpointWithoutOutput`` (its ``moe_act`` recompute, for MoE
experts only), without that class's run-time C++ extension: the recomputed values are copied
into the released storage, which leaves the tensor fc2 saved (and its version counter) as it was.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl
from megatron.core.transformer.mlp import MLP


class _Slot:
    """One SwiGLU call: its autograd node (weakly: the node owns the slot), the output's storage,
    the recomputed output with its graph."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.node = None
        self.storage: torch.UntypedStorage | None = None
        self.recomputed: tuple[torch.Tensor, torch.Tensor] | None = None

    def refill(self, _grad: torch.Tensor) -> None:
        (x,) = self.node().saved_tensors
        x = x.detach().requires_grad_()
        with torch.enable_grad():
            y = self.fn(x)
        self.storage.resize_(y.untyped_storage().nbytes())
        self.storage.copy_(y.untyped_storage())
        self.recomputed = (x, y)


class _DroppedOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, slot: _Slot) -> torch.Tensor:
        ctx.slot, slot.node = slot, weakref.ref(ctx)
        ctx.save_for_backward(x)
        with torch.no_grad():
            return slot.fn(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        slot = ctx.slot
        if slot.recomputed is None:  # nothing consumed the output's gradient first
            slot.refill(grad)
        x, y = slot.recomputed
        slot.recomputed = None
        torch.autograd.backward(y, grad)
        return x.grad, None


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
        if not (torch.is_grad_enabled() and fc1.requires_grad):
            return self.linear_fc2(self._swiglu(fc1))
        slot = _Slot(self._swiglu)
        act = _DroppedOutput.apply(fc1, slot)
        out, out_bias = self.linear_fc2(act)
        slot.storage = act.untyped_storage()
        slot.storage.resize_(0)
        out.register_hook(slot.refill)
        return out, out_bias
