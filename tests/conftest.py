"""Shared fixtures, and the check that the suite leaves no process behind.

Every process the tests start inherits ``PROLONG_TEST_SESSION`` (a value unique to this pytest
session, set here before anything is started); at the end of the session any process still
carrying it (a trainer, a torchrun, a checkpoint writer, a Slurm daemon of the test cluster)
fails the run, is listed, and is killed.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest

from trainrun import TrainingRun, train

SESSION_MARK = "PROLONG_TEST_SESSION"
os.environ[SESSION_MARK] = uuid.uuid4().hex
LEFTOVER_GRACE_S = 30  # processes already on their way out (daemons being stopped) get this long


@pytest.fixture
def run_training(tmp_path):
    counter = iter(range(1000))

    def _run(*overrides: str, nproc: int = 1, check: bool = True) -> TrainingRun:
        return train(tmp_path / f"run{next(counter)}", *overrides, nproc=nproc, check=check)

    return _run


def _parent(proc: Path) -> int:
    return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])


def session_processes() -> dict[int, str]:
    """Live processes (not zombies) started by this session, other than pytest itself and its own
    multiprocessing helpers (the resource tracker, spawned workers of in-process code: they end with
    this interpreter, unlike orphans): pid -> command line."""
    mark = f"{SESSION_MARK}={os.environ[SESSION_MARK]}".encode()
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        pid = int(proc.name)
        if pid == os.getpid():
            continue
        try:
            if mark not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            ours = _parent(proc) == os.getpid() and cmdline.split(" -c ", 1)[-1].startswith("from multiprocessing.")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if cmdline and not ours:  # a zombie has an empty command line
            found[pid] = cmdline
    return found


def pytest_sessionfinish(session, exitstatus):
    if not Path("/proc/self/environ").exists():
        return
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    while (left := session_processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    if not left:
        return
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    lines = "\n".join(f"  pid {pid}: {cmd[:300]}" for pid, cmd in sorted(left.items()))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = f"{len(left)} process(es) started by the tests were still alive at the end (now killed):\n{lines}"
    if reporter:
        reporter.write_line(message, red=True, bold=True)
    else:
        print(message)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
