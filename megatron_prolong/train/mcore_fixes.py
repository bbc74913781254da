"""Work-arounds for Megatron-Core 0.19 bugs on the path without Apex/Transformer Engine (torch Adam).

Loading a ``fully_reshardable`` distributed-optimizer checkpoint with torch's Adam: Megatron puts
``step`` into every parameter's state and then copies each state tensor from the checkpoint,
which (correctly) holds no per-parameter ``step``, raising ``KeyError: 'step'``. The step is set
from the checkpoint's param groups anyway, so it is set aside while the tensors are copied.
"""

from __future__ import annotations

import torch
from megatron.core.optimizer import distrib_optimizer

_original = distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states


def _set_states_keeping_step(self, model_param, tensors):
    if "step" in tensors or getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True):
        return _original(self, model_param, tensors)
    group_index, group_order = self.model_param_group_index_map[model_param]
    state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
    step = state.pop("step", None)
    try:
        return _original(self, model_param, tensors)
    finally:
        if step is not None:
            state["step"] = step


def apply() -> None:
    distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states = _set_states_keeping_step


def unshare_adam_steps(inner_optimizers) -> None:
    """After a distributed-optimizer load, every parameter's ``step`` is one shared tensor.

    torch's Adam increments each parameter's step in place, so a shared tensor advances once per
    parameter per iteration and the bias correction goes wrong: resumed losses drift from an
    uninterrupted run. Each parameter gets its own copy.
    """
    for inner in inner_optimizers:
        for state in inner.state.values():
            if "step" in state and isinstance(state["step"], torch.Tensor):
                state["step"] = state["step"].clone()
