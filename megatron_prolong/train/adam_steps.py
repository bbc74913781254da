"""Adam's step counter in a checkpoint, for whichever Adam implementation saved it and loads it.

Megatron-Core builds TE's FusedAdam where Transformer Engine imports (Apex's where Apex does),
torch's AdamW elsewhere, so a run that moves between machines with and without TE, or a checkpoint
made before a TE install, meets the other layout. The moments (``exp_avg``, ``exp_avg_sq``) are
the same tensors in both; the step counter is not:

- torch AdamW: a float32 tensor in every parameter's state; Megatron's non-distributed optimizer
  saves it once as ``state["common_step"]`` and puts it back into every parameter's state on load;
- FusedAdam: an int per parameter group, ``param_groups[i]["step"]``, and none per parameter
  (its ``load_state_dict`` and ``state_dict`` fail with ``KeyError: 'step'`` on one);
- Megatron's distributed optimizer saves ``param_groups[i]["step"]`` for both (a float from
  torch's, an int from FusedAdam's, whose kernel takes only an int).

:func:`match_step_layout` rewrites a loaded optimizer state into the layout of the optimizer that
loads it, so the bias correction resumes at the saved step either way.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def _inner_state_dicts(tree) -> Iterator[dict]:
    """Every torch-optimizer state dict (a dict with ``param_groups``) inside Megatron's optimizer
    state, whatever wraps it (a chained, float16 or distributed optimizer)."""
    if isinstance(tree, dict):
        if isinstance(tree.get("param_groups"), list):
            yield tree
            return
        for value in tree.values():
            yield from _inner_state_dicts(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _inner_state_dicts(value)


def _take_step(sd: dict) -> float | None:
    """Remove the step counter from one state dict, in any of the layouts; returns it."""
    found = set()
    state = sd.get("state")
    if isinstance(state, dict):
        common = state.pop("common_step", None)
        if common is not None:
            found.add(float(common))
        for entry in state.values():
            if isinstance(entry, dict) and entry.get("step") is not None:
                found.add(float(entry.pop("step")))
    for group in sd["param_groups"]:
        step = group.pop("step", None)
        if step is not None:
            found.add(float(step))
    if len(found) > 1:
        raise ValueError(f"the checkpoint's optimizer holds different step counts {sorted(found)}; "
                         "Megatron-Core keeps one per optimizer")
    return found.pop() if found else None


def match_step_layout(optimizer_state: dict, param_steps: bool) -> list[int]:
    """Put the step counter of a loaded Megatron optimizer state (in place) where the loading
    optimizer reads it: ``param_steps`` (torch's Adam, ``optim.keeps_param_steps``) or per group
    (FusedAdam). Returns the steps found, one per inner optimizer that had one."""
    steps = []
    for sd in _inner_state_dicts(optimizer_state):
        step = _take_step(sd)
        if step is None:
            continue
        steps.append(int(step))
        if param_steps and isinstance(sd.get("state"), dict):
            # Megatron's non-distributed optimizer gives it to every parameter on load
            sd["state"]["common_step"] = torch.tensor(step, dtype=torch.float32)
        else:
            # torch's under the distributed optimizer: Megatron turns it into the per-parameter tensors
            for group in sd["param_groups"]:
                group["step"] = step if param_steps else int(step)
    return steps
