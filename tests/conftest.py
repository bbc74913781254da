"""Shared fixtures, and the check that the suite leaves no process behind.

Every process the tests start inherits ``PROLONG_TEST_SESSION`` (a value unique to this pytest
session, set here before anything is started); at the end of the session any process still
carrying it (a trainer, a torchrun, a checkpoint writer, a Slurm daemon of the test cluster)
fails the run, is listed, and is killed.

pytest-xdist runs each test file whole on one worker (``--dist loadfile``), in collection order: the
files that take longest start first (``LONGEST_FIRST``), so that the workers end together, on short
files.

When the NeMo tests are selected, the session starts building their environment
(tests/convert/nemo_env/setup.sh) in the background as soon as it knows, so that its downloads and
installs overlap other tests; the NeMo tests' own call of setup.sh waits for it (and retries, with
its error, if it failed).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import pytest

from trainrun import TrainingRun, train

from megatron_prolong.gc_policy import skip_collection_at_exit

# A test worker ends holding every object torch, Megatron-Core and transformers made.
skip_collection_at_exit()
SESSION_MARK = "PROLONG_TEST_SESSION"
os.environ.setdefault(SESSION_MARK, uuid.uuid4().hex)  # a second import of this file keeps it
LEFTOVER_GRACE_S = 30  # processes already on their way out (daemons being stopped) get this long
REPO = Path(__file__).resolve().parent.parent
NEMO_TESTS = "tests/convert/test_nemo.py::"
# The files that took 45 s or more on 2 CPU cores, longest first.
LONGEST_FIRST = (
    "tests/train/test_checkpoint.py", "tests/parallel/test_layouts.py", "tests/slurm/test_slurm_launch.py",
    "tests/eval/test_demo_eval.py", "tests/train/test_resume.py", "tests/parallel/test_lifetime.py",
    "tests/parallel/test_cp_parity.py", "tests/train/test_optimizer_reshard.py", "tests/eval/test_in_training.py",
    "tests/train/test_checkpoint_stop.py", "tests/convert/test_trainer_and_tools.py", "tests/test_config.py",
    "tests/eval/test_lengths.py", "tests/parallel/test_layout_options.py", "tests/attention/test_attn_backends.py",
    "tests/eval/test_recall.py", "tests/eval/test_generate.py",
)
_nemo_env_build: subprocess.Popen | None = None


def _build_nemo_env_if_selected(config: pytest.Config, nodeids: Iterable[str]) -> None:
    global _nemo_env_build
    if _nemo_env_build is None and not config.option.collectonly and any(i.startswith(NEMO_TESTS) for i in nodeids):
        _nemo_env_build = subprocess.Popen(["bash", str(REPO / "tests" / "convert" / "nemo_env" / "setup.sh")],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                           start_new_session=True)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    _build_nemo_env_if_selected(node.config, ids)  # the controller of a pytest-xdist session


def pytest_configure(config):
    missing = [f for f in LONGEST_FIRST if not (REPO / f).is_file()]
    if missing:
        raise pytest.UsageError(f"tests/conftest.py: LONGEST_FIRST names files that do not exist: {missing}")
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist's own order: files with more tests first
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
    rank = {f: i for i, f in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
    if "PYTEST_XDIST_WORKER" not in os.environ:  # a session without pytest-xdist
        _build_nemo_env_if_selected(config, [item.nodeid for item in items])


def _stop_nemo_env_build() -> None:
    """A build the NeMo tests did not wait for (they failed early or the session was cut short) is
    stopped with all its processes: a half-built environment has no stamp and is rebuilt next time."""
    if _nemo_env_build is None or _nemo_env_build.poll() is not None:
        return
    os.killpg(_nemo_env_build.pid, signal.SIGTERM)
    try:
        _nemo_env_build.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(_nemo_env_build.pid, signal.SIGKILL)
        _nemo_env_build.wait()


@pytest.fixture
def run_training(tmp_path):
    counter = iter(range(1000))

    def _run(*overrides: str, nproc: int = 1, check: bool = True) -> TrainingRun:
        return train(tmp_path / f"run{next(counter)}", *overrides, nproc=nproc, check=check)

    return _run


def _parent(proc: Path) -> int:
    return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])


def _compile_worker_of_this_process(cmdline: str) -> bool:
    """torch.compile's worker pool (and the processes it forks), started by code under test in this
    interpreter: each watches its ``--parent`` and exits with it."""
    return "torch/_inductor/compile_worker" in cmdline and f"--parent={os.getpid()} " in cmdline + " "


def session_processes() -> dict[int, str]:
    """Live processes (not zombies) started by this session, other than pytest itself and its own
    helpers (multiprocessing's resource tracker and spawned workers of in-process code, torch.compile's
    worker pool: they end with this interpreter, unlike orphans): pid -> command line."""
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
            ours = (_parent(proc) == os.getpid() and cmdline.split(" -c ", 1)[-1].startswith("from multiprocessing.")
                    or _compile_worker_of_this_process(cmdline))
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if cmdline and not ours:  # a zombie has an empty command line
            found[pid] = cmdline
    return found


def pytest_sessionfinish(session, exitstatus):
    _stop_nemo_env_build()
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
