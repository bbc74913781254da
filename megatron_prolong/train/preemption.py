"""Preemption: SIGTERM or SIGUSR1 asks the run to checkpoint at the next step boundary and exit.

SIGTERM is bounded: a second one, or ``deadline_s`` without reaching the exit, ends the process
at once (``parallel.lifetime.SigtermDeadline``); a rank blocked on a hung peer never reaches a step
boundary, and SIGTERM must not be ignored. SIGUSR1 (the Slurm scripts' "checkpoint, then
requeue", repeated until the step ends) waits for the step boundary however long it takes.

The exit code ``REQUEUE_EXIT_CODE`` (75, EX_TEMPFAIL: "try again") tells the Slurm scripts to
requeue the job; the requeued job resumes from the checkpoint by itself.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

import torch
import torch.distributed as dist

from megatron_prolong.parallel.lifetime import SigtermDeadline

REQUEUE_EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    def __init__(self, deadline_s: float) -> None:
        self._requested = False
        self._signal: int | None = None
        self._deadline = SigtermDeadline(deadline_s)
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in SIGNALS}

    def _on_signal(self, signum, frame) -> None:
        self._requested = True
        self._signal = signum

    def should_stop(self, device: torch.device) -> bool:
        """True on every rank once any rank was signalled (ranks may receive it at different times)."""
        flag = torch.tensor([1.0 if self._requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    @property
    def signal_name(self) -> str:
        return signal.Signals(self._signal).name if self._signal else "a signal on another rank"

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._deadline.close()


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGTERM/SIGUSR1 back while checkpoint writers are started and run.

    Megatron's checkpoint writer starts helper processes (multiprocessing spawn); a signal sent to
    the whole process group or Slurm step would kill them mid-save. Blocked signals stay pending
    in this process (delivered right after the save), and the helpers inherit the block.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
