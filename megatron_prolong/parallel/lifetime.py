"""No training process outlives its launcher, and SIGTERM is never ignored for long.

Two backstops:

- **Launcher watchdog.** torchrun starts every worker in a session of its own, so killing
  torchrun (or its process group, as a test harness or a batch system does) leaves the workers
  running with parent 1: they train on, write into the run dir a restarted job also writes into,
  or wait on a store that is gone. A worker started by a launcher (torchrun, srun, or any
  multi-process rendezvous) therefore exits, with its own children, once its parent is gone. A
  single process started by hand is left alone (``nohup`` is a legitimate way to run it).
  Started by ``init_distributed``.
- **SIGTERM deadline.** The trainer's preemption handler turns SIGTERM (and SIGINT, Ctrl-C) into
  "checkpoint at the next step boundary". A Python signal handler only runs when the main thread is back in the
  interpreter; a rank blocked in a collective on a hung peer never gets there, so SIGTERM would
  be ignored until the collective timeout. The C-level handler still writes the signal number to
  the wakeup fd, which a thread watches: a second SIGTERM exits at once, and a process still
  alive ``deadline_s`` after the first exits then. Open while the preemption handler is.

Exiting kills this process's descendants first (Megatron's checkpoint-writer helpers would
otherwise be orphaned in turn).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import NoReturn

PARENT_POLL_S = 1.0
PARENT_GONE_EXIT_CODE = 1
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc; elsewhere this process's multiprocessing children)."""
    if not Path("/proc/self/stat").exists():
        return [c.pid for c in multiprocessing.active_children() if c.pid]
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def exit_now(reason: str, code: int) -> NoReturn:
    """Say why, kill every descendant, and end this process without cleanup (callable from any thread)."""
    try:
        print(f"megatron-prolong: {reason}; exiting now (exit {code})", file=sys.stderr, flush=True)
    except (OSError, ValueError):  # stderr may be a closed pipe once the launcher is gone
        pass
    for pid in descendants(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    os._exit(code)


def launched_by_launcher(world_size: int) -> bool:
    """torchrun (TORCHELASTIC_RUN_ID), an srun task (SLURM_STEP_ID) or any multi-process rendezvous."""
    return world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ or "SLURM_STEP_ID" in os.environ


_watching: threading.Thread | None = None
LAUNCHERS = ("torchrun", "torch.distributed.run", "torch/distributed/run.py", "srun", "slurmstepd")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _is_launcher(pid: int) -> bool:
    """Whether process ``pid`` runs a launcher (torchrun, srun) rather than an init that adopted orphans."""
    cmd = _cmdline(pid)
    return any(name in cmd for name in LAUNCHERS)


def watch_launcher(poll_s: float = PARENT_POLL_S) -> None:
    """Exit once the parent process (the launcher) is gone: a daemon thread polling getppid(), one per process."""
    global _watching
    parent = os.getppid()
    if _watching is not None or (parent == 1 and _is_launcher(1)):  # torchrun as a container's PID 1 ends with it
        return

    def watch() -> None:
        # A parent of 1 that is no launcher: the launcher died before this thread started.
        while os.getppid() == parent and parent != 1:
            time.sleep(poll_s)
        exit_now(f"the launcher (pid {parent}) is gone (killed?); this rank must not outlive it",
                 PARENT_GONE_EXIT_CODE)

    _watching = threading.Thread(target=watch, name="prolong-launcher-watchdog", daemon=True)
    _watching.start()


class SigtermDeadline:
    """While open, a caught SIGTERM (or SIGINT) is answered within ``deadline_s`` (open and close in the
    main thread)."""

    def __init__(self, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._previous = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name="prolong-sigterm-deadline", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        first = False
        while data := os.read(self._read, 64):
            stops = [s for s in data if s in (signal.SIGTERM, signal.SIGINT)]  # Ctrl-C counts as SIGTERM
            if not stops:
                continue
            name, code = signal.Signals(stops[-1]).name, 128 + stops[-1]
            if first or len(stops) > 1:
                exit_now(f"a second {name}", code)
            first = True
            timer = threading.Timer(self.deadline_s, exit_now, args=(
                f"still running {self.deadline_s:.0f} s after {name} (blocked, e.g. in a collective on a hung "
                "peer; the bound is parallel.timeout_minutes)", code))
            timer.daemon = True  # a run that stops in time exits with its own code
            timer.start()

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous)
        os.close(self._write)  # the thread reads end-of-file and returns
        self._thread.join()
        os.close(self._read)
