"""The suite's check for processes left behind (tests/conftest.py): a real stray child is reported,
torch.compile's worker pool of the pytest process itself is not (it exits with its parent)."""

from __future__ import annotations

import subprocess
import time

import conftest


def test_compile_workers_of_this_process_are_not_leaks_a_stray_child_is():
    from torch._inductor.compile_worker.subproc_pool import SubprocPool

    pool = SubprocPool(2)
    stray = subprocess.Popen(["sleep", "60"])
    try:
        deadline = time.monotonic() + 60
        while not (workers := _compile_workers()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert workers, "torch's compile worker did not start"
        left = conftest.session_processes()
        assert stray.pid in left
        assert not set(workers) & set(left), left
    finally:
        stray.kill()
        stray.wait()
        pool.shutdown()


def _compile_workers() -> list[int]:
    from pathlib import Path

    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "torch/_inductor/compile_worker" in cmdline:
            found.append(int(proc.name))
    return found
