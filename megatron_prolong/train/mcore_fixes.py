"""Work-arounds for Megatron-Core 0.19: fixes 1-3 for the path without Apex/Transformer Engine
(torch Adam), fix 4 for checkpoints asked for by a stop signal.

They are applied explicitly (``apply()``, first thing in ``Trainer.build``; fix 4 by
``start_checkpoint_writer_queue()`` at the start of ``Trainer.run``, as it starts a process that only
a training run needs) and only on the Megatron-Core minor version they were written against; on
another version nothing is patched and ``apply`` says so, because the private attributes they use
may have changed meaning.

1. Loading a ``fully_reshardable`` distributed-optimizer checkpoint with torch's Adam: Megatron
   puts ``step`` into every parameter's state and then copies each state tensor from the
   checkpoint, which (correctly) holds no per-parameter ``step``, raising ``KeyError: 'step'``.
   The step is set from the checkpoint's param groups anyway, so it is set aside while the
   tensors are copied.
2. Megatron's distributed optimizer reads ``step`` from the torch optimizer's state when building
   the state dict to load into, and a new one has none: placeholders are put in while the load
   target is built and dropped before ``load_state_dict`` allocates the real state.
3. After a distributed-optimizer load every parameter's ``step`` is one shared tensor; torch's
   Adam increments it in place once per parameter, so the bias correction goes wrong.
4. Megatron's checkpoint writer sends its results through a queue held by a multiprocessing
   manager process that it starts at the first save. A stop signal sent to the whole process group
   (Ctrl-C, GNU ``timeout``, a Slurm step signal) kills that process, and the save the signal asks
   for fails with BrokenPipeError. The manager is started here instead, with the signals ignored,
   and its queue put where Megatron looks for it (the private ``filesystem_async._results_queue``).
   The queue carries the results pickled, so that the manager process never unpickles Megatron's
   objects: it then never imports torch (about 2 s of CPU and a few hundred MB per trainer process).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
from multiprocessing.managers import SyncManager

import torch
from megatron.core import package_info
from megatron.core.optimizer import distrib_optimizer

from megatron_prolong.train.optim import inner_optimizers, keeps_param_steps
from megatron_prolong.train.preemption import checkpoint_helper_init, signals_deferred

FOR_VERSION = (0, 19)
_DistOpt = distrib_optimizer.DistributedOptimizer
_original = _DistOpt._set_main_param_and_optimizer_states


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


def installed_version() -> tuple[int, int]:
    return package_info.MAJOR, package_info.MINOR


def apply() -> str | None:
    """Patch Megatron-Core (idempotent); returns a note when the installed version is not the one
    these work-arounds are for, and then patches nothing."""
    if installed_version() != FOR_VERSION:
        return (f"megatron-core {package_info.__shortversion__}: the work-arounds for "
                f"{'.'.join(map(str, FOR_VERSION))} (megatron_prolong/train/mcore_fixes.py) are not "
                "applied; if a distributed-optimizer checkpoint fails to load with KeyError: 'step', "
                "or a save asked for by a stop signal fails with BrokenPipeError, install "
                f"megatron-core {'.'.join(map(str, FOR_VERSION))}.x (constraints.txt)")
    _DistOpt._set_main_param_and_optimizer_states = _set_states_keeping_step
    return None


def applied() -> bool:
    return _DistOpt._set_main_param_and_optimizer_states is _set_states_keeping_step


class _PickledQueue:
    """A manager's queue whose items travel as pickled bytes (fix 4): what Megatron's writer calls."""

    def __init__(self, queue) -> None:
        self._queue = queue

    def put(self, item) -> None:
        self._queue.put(pickle.dumps(item))

    def get_nowait(self):
        return pickle.loads(self._queue.get_nowait())


def start_checkpoint_writer_queue() -> None:
    """Fix 4 (once per process: a queue already there is kept; nothing on another Megatron-Core
    version). Before the trainer's stop-signal handlers are installed. Python's resource tracker unblocks
    SIGINT/SIGTERM in this process when it starts, so it starts first; the manager then starts with
    the signals blocked and ignores them for good. It ends with this process: multiprocessing's exit
    handlers, or, if this process is killed, the kernel (parent-death signal)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from multiprocessing import resource_tracker

    if installed_version() != FOR_VERSION or filesystem_async._results_queue is not None:
        return
    resource_tracker.ensure_running()
    with signals_deferred():
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        # the initializer's module is what the helper imports: preemption.py, which imports neither
        # torch nor Megatron
        manager.start(initializer=checkpoint_helper_init, initargs=(os.getpid(),))
        # Megatron's get_write_results_queue() returns it
        filesystem_async._results_queue = _PickledQueue(manager.Queue())


def materialize_adam_state(optimizer) -> bool:
    """Placeholder Adam state for a fresh torch optimizer (fix 2); True if it was fresh. Not for
    TE's or Apex's FusedAdam: they keep no per-parameter ``step``, and FusedAdam's ``state_dict``
    fails on one (``KeyError: 'step'`` in ``get_unscaled_state``, which knows only the moments and
    master weights)."""
    inner = inner_optimizers(optimizer)
    fresh = applied() and keeps_param_steps(optimizer) and all(not opt.state for opt in inner)
    if fresh:
        for opt in inner:
            for group in opt.param_groups:
                for p in group["params"]:
                    opt.state[p].update(step=torch.zeros((), dtype=torch.float32),
                                        exp_avg=torch.zeros_like(p.data), exp_avg_sq=torch.zeros_like(p.data))
    return fresh


def drop_placeholder_state(optimizer) -> None:
    for opt in inner_optimizers(optimizer):
        opt.state.clear()


def unshare_adam_steps(optimizer) -> None:
    """Each parameter gets its own ``step`` tensor (fix 3)."""
    for opt in inner_optimizers(optimizer):
        for state in opt.state.values():
            if "step" in state and isinstance(state["step"], torch.Tensor):
                state["step"] = state["step"].clone()
