"""Outputs dropped between forward and backward, rebuilt from an input autograd keeps anyway.

A projection keeps its input for the weight gradient. Where that input is the output of a cheap
elementwise function of one tensor (RMSNorm of x, the SwiGLU of fc1's output), the function runs
without a graph, keeping only its input, and the projection's copy of its output is released right
after the projection's forward; when the projection's output gradient arrives, just before the
projection's backward, the output is rebuilt from the kept input. One elementwise pass buys back
the tensor's memory. This is the scheme of Megatron-Core's ``CheckpointWithoutOutput`` (its
``layernorm`` / ``moe_act`` recompute) without that class's run-time C++ extension: the rebuilt
values are copied into the released storage, which leaves the saved tensor (and its version
counter) as autograd recorded it.

Users: ``train.recompute_modules`` ``swiglu`` (model/mlp.py) and ``layernorm`` (model/norm.py, with
the QKV and fc1 projections below).
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear

_MARK = "_prolong_rebuild"


class _Slot:
    """One call of ``fn``: its autograd node (weakly: the node owns the slot), the released
    storage (until refilled: then only the tensors that saved it hold it, and it is freed with
    them after their backward), the rebuilt output with its graph."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        self.node = None
        self.storage: torch.UntypedStorage | None = None
        self.rebuilt: tuple[torch.Tensor, ...] | None = None

    def release(self, hook_tensor: torch.Tensor) -> None:
        self.storage.resize_(0)
        hook_tensor.register_hook(self.refill)

    def refill(self, _grad: torch.Tensor | None = None) -> None:
        ctx = self.node() if self.node is not None else None
        if self.rebuilt is not None or ctx is None:
            return
        # detached aliases: the inner autograd.grad must not run hooks of the real parameters,
        # which the outer engine runs when it accumulates what backward returns
        x, *params = (t.detach().requires_grad_(need)
                      for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[1:]))
        with torch.enable_grad():
            y = self.fn(x, *params)
        storage, self.storage = self.storage, None
        if storage is not None and storage.nbytes() == 0:
            storage.resize_(y.untyped_storage().nbytes())
            storage.copy_(y.untyped_storage())
        self.rebuilt = (y, x, *params)


class _Rebuilt(torch.autograd.Function):
    """``fn(x, *params)`` run without a graph: only x is kept. Backward rebuilds the graph
    (refilling the released output first if its consumer's gradient hook has not) and returns the
    gradients of x and of the parameters (inputs here, so autograd accumulates them as usual)."""

    @staticmethod
    def forward(ctx, slot: _Slot, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.slot, slot.node = slot, weakref.ref(ctx)
        ctx.save_for_backward(x, *params)
        with torch.no_grad():
            return slot.fn(x, *params)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        slot = ctx.slot
        slot.refill()
        y, *inputs = slot.rebuilt
        slot.rebuilt = None
        needs = ctx.needs_input_grad[1:]
        grads = iter(torch.autograd.grad(y, [t for t, need in zip(inputs, needs) if need], grad))
        return (None, *(next(grads) if need else None for need in needs))


def rebuildable(fn: Callable[..., torch.Tensor], x: torch.Tensor,
                params: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """``fn(x, *params)`` keeping only ``x`` for backward (``params``: the parameters ``fn`` uses,
    passed to it, not read from a module), marked so that :func:`release_after` may drop the output
    too. Plain ``fn(x, *params)`` when no graph is built."""
    if not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))):
        return fn(x, *params)
    slot = _Slot(fn)
    y = _Rebuilt.apply(slot, x, *params)
    slot.storage = y.untyped_storage()
    setattr(y, _MARK, slot)
    return y


def release_after(consumed: torch.Tensor, output: torch.Tensor) -> None:
    """``consumed`` has been used by the forward pass that produced ``output`` and nothing else reads
    it before ``output``'s gradient arrives: release it if it is marked, refill it at that gradient."""
    slot = consumed.__dict__.pop(_MARK, None)
    if slot is not None and output.requires_grad:
        slot.release(output)


class ReleasingColumnParallelLinear(ColumnParallelLinear):
    """Megatron's column-parallel linear (QKV, fc1) releasing a rebuildable input after its forward."""

    def forward(self, input_: torch.Tensor, *args, **kwargs):
        out = super().forward(input_, *args, **kwargs)
        release_after(input_, out[0])
        return out
