"""Preemption and Ctrl-C: SIGTERM, SIGUSR1 or SIGINT asks the run to checkpoint at the next step
boundary and exit.

SIGTERM and SIGINT are bounded: a second one, or ``deadline_s`` without reaching the exit, ends the
process at once (``parallel.lifetime.SigtermDeadline``); a rank blocked on a hung peer never reaches
a step boundary, and neither signal must be ignored. SIGUSR1 (the Slurm scripts' "checkpoint, then
requeue", repeated until the step ends) waits for the step boundary however long it takes.

The exit code ``REQUEUE_EXIT_CODE`` (75, EX_TEMPFAIL: "try again") tells the Slurm scripts to
requeue the job; the requeued job resumes from the checkpoint by itself. Ctrl-C is a user stopping
the run, not a preemption: it exits with ``INTERRUPT_EXIT_CODE`` (130, as a shell reports Ctrl-C).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from megatron_prolong.parallel.lifetime import SigtermDeadline

if TYPE_CHECKING:
    import torch

REQUEUE_EXIT_CODE = 75
INTERRUPT_EXIT_CODE = 128 + signal.SIGINT
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class PreemptionHandler:
    def __init__(self, deadline_s: float) -> None:
        # Megatron's checkpoint-writer helper must already run with these signals ignored
        # (mcore_fixes.start_checkpoint_writer_queue()), or the stop they ask for could not be saved.
        self._signal: int | None = None
        self._interrupted = False
        self._deadline = SigtermDeadline(deadline_s)
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in SIGNALS}

    def _on_signal(self, signum, frame) -> None:
        self._signal = signum

    def should_stop(self, device: torch.device) -> bool:
        """True on every rank once any rank was signalled (ranks may receive it at different times).
        Ctrl-C on any rank wins over a preemption: the user wants the run stopped, not requeued."""
        import torch  # not at the top: the checkpoint-writer helper imports this module, and no torch
        import torch.distributed as dist

        mine = 0.0 if self._signal is None else 2.0 if self._signal == signal.SIGINT else 1.0
        flag = torch.tensor([mine], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self._interrupted = flag.item() == 2.0
        return bool(flag.item())

    @property
    def exit_code(self) -> int:
        return INTERRUPT_EXIT_CODE if self._interrupted else REQUEUE_EXIT_CODE

    @property
    def signal_name(self) -> str:
        return signal.Signals(self._signal).name if self._signal else "a signal on another rank"

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._deadline.close()


def checkpoint_helper_init(parent: int) -> None:
    """The start of Megatron's checkpoint-writer helper (``mcore_fixes.start_checkpoint_writer_queue``;
    kept in this module, which imports neither torch nor Megatron, as the helper imports the module it
    comes from): ignore the stop signals (the trainer handles them and needs the helper for its last
    save), and die with the trainer however it ends (Linux PR_SET_PDEATHSIG), so that an ignored
    SIGTERM never leaves it behind."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the trainer died before the line above
        os._exit(0)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGTERM/SIGUSR1/SIGINT back while checkpoint writers are started and run.

    Megatron's checkpoint writer starts helper processes (multiprocessing spawn); a signal sent to
    the whole process group or Slurm step would kill them mid-save. Blocked signals stay pending
    in this process (delivered right after the save), and the helpers inherit the block.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
