"""The garbage collector in the project's short-lived processes (the trainer, the tools, test helpers).

Starting creates about a million objects (torch, Megatron-Core, the model) that live as long as the
process: the collector, run every few hundred allocations meanwhile, frees nearly nothing and costs
about 1.5 s of CPU a process. At exit the interpreter's last collection walks them all again (about
1.5 s more, after the process's last line); frozen, they are left to the process's end.
"""

from __future__ import annotations

import atexit
import gc


def skip_collection_at_exit() -> None:
    """Freeze the heap at exit. Call it first: exit handlers run in reverse order, so this one runs
    after every other (multiprocessing's, Megatron's), just before the interpreter's collection."""
    atexit.register(gc.freeze)


def pause_collection_while_starting() -> None:
    """No collections until ``gc.enable()`` (the trainer: once it is built, train/run.py), none at exit."""
    gc.disable()
    skip_collection_at_exit()
