"""No run leaves a process behind when its launcher, the launcher's parent or a peer is killed, and
SIGTERM reaches a rank blocked on a hung peer (megatron_prolong/parallel/lifetime.py).

Real 2-process trainer runs over gloo. "Within a bound" is a generous wait (the failure mode is a
process alive for the 10-minute collective timeout or for ever), not a timing measurement.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from trainrun import REPO, _env, command, free_port, read_metrics, start

from megatron_prolong.parallel.lifetime import SIGTERM_EXIT_CODE, descendants

LONG = ("data.seq_length=256", "train.global_batch_size=4", "train.micro_batch_size=1", "train.precision=fp32",
        "log.tensorboard=false", "train.steps=500", "checkpoint.save_interval=0")
BOUND_S = 90


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pids: list[int], bound: float = BOUND_S) -> list[int]:
    deadline = time.monotonic() + bound
    while (alive := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def _ranks(root: int) -> list[int]:
    def is_rank(pid: int) -> bool:
        try:
            return b"megatron_prolong.train" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False

    return [p for p in descendants(root) if is_rank(p)]


def _wait_steps(run_dir: Path, n: int, procs) -> None:
    deadline = time.monotonic() + 300
    while len(read_metrics(run_dir)) < n:
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, "the run ended early"
        time.sleep(0.2)


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _wait_ranks(proc: subprocess.Popen, n: int) -> list[int]:
    deadline = time.monotonic() + 120
    while len(ranks := _ranks(proc.pid)) < n:
        assert proc.poll() is None and time.monotonic() < deadline, "torchrun ended before starting its ranks"
        time.sleep(0.05)
    return ranks


def _kill_and_expect_gone(proc: subprocess.Popen, tree: list[int], what: str) -> None:
    proc.kill()
    proc.wait()
    left = _wait_gone(tree)
    assert not left, f"{left} still alive {BOUND_S} s after {what} was killed"


@pytest.mark.parametrize("when", ["starting", "training"])
def test_ranks_exit_when_torchrun_is_killed(tmp_path, when):
    """The orphan of the checkpoint tests: SIGKILL torchrun alone (its workers live in sessions of
    their own). Killed while the ranks start, a rank used to wait in the rendezvous, retrying to
    connect to the dead agent's store for the whole 30-minute timeout; killed while they train,
    the ranks trained on."""
    # No pipes: an orphaned rank would hold them open.
    proc = start(tmp_path / "run", *LONG, nproc=2, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ranks = []
    try:
        ranks = _wait_ranks(proc, 2)
        if when == "training":
            _wait_steps(tmp_path / "run", 1, [proc])
        _kill_and_expect_gone(proc, ranks, "torchrun")
    finally:
        _kill_all(ranks)
    steps = len(read_metrics(tmp_path / "run"))
    assert steps < 500, steps  # they stopped, rather than finishing the run


def test_run_ends_when_the_process_that_started_torchrun_is_killed(tmp_path):
    """A test (or any parent) that dies mid-run: torchrun follows it (PR_SET_PDEATHSIG in
    trainrun.start), and the ranks follow torchrun."""
    script = textwrap.dedent(f"""
        import subprocess, sys, time
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from trainrun import start
        proc = start({str(tmp_path / 'run')!r}, *{LONG!r}, nproc=2, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
        print(proc.pid, flush=True)
        time.sleep(3600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    tree = []
    try:
        torchrun = int(parent.stdout.readline())
        _wait_steps(tmp_path / "run", 1, [parent])
        tree = [torchrun, *descendants(torchrun)]
        assert len(_ranks(torchrun)) == 2
        _kill_and_expect_gone(parent, tree, "the parent")
    finally:
        _kill_all(tree)


def _direct_ranks(run_dir: Path, *overrides: str) -> list[subprocess.Popen]:
    """Two ranks started the way srun starts them: no torchrun, rendezvous from the environment."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(_env(), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen(command(run_dir, *LONG, *overrides), cwd=REPO, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def test_rank_exits_when_its_peer_is_killed(tmp_path):
    procs = _direct_ranks(tmp_path / "run")
    try:
        _wait_steps(tmp_path / "run", 1, procs)
        procs[1].kill()
        out, _ = procs[0].communicate(timeout=BOUND_S)
        assert procs[0].returncode != 0, out[-3000:]
    finally:
        _kill_all([p.pid for p in procs])
        for p in procs:
            p.communicate()


def test_sigterm_reaches_a_rank_blocked_on_a_hung_peer(tmp_path):
    """Peer stopped (a hung node): rank 0 blocks inside a gloo collective, where the Python handler
    never runs. A second SIGTERM ends it at once (the first asked for a checkpoint that cannot come)."""
    procs = _direct_ranks(tmp_path / "run")
    try:
        _wait_steps(tmp_path / "run", 1, procs)
        os.kill(procs[1].pid, signal.SIGSTOP)
        time.sleep(2)  # rank 0 is now waiting for rank 1 in the next collective
        os.kill(procs[0].pid, signal.SIGTERM)
        time.sleep(1)
        os.kill(procs[0].pid, signal.SIGTERM)
        out, _ = procs[0].communicate(timeout=BOUND_S)
        assert procs[0].returncode == SIGTERM_EXIT_CODE, out[-3000:]
        assert "a second SIGTERM; exiting now" in out
    finally:
        _kill_all([p.pid for p in procs])
        for p in procs:
            p.communicate()


DEFERRING = textwrap.dedent("""
    import signal, sys, time
    from megatron_prolong.parallel.lifetime import SigtermDeadline
    signal.signal(signal.SIGTERM, lambda *a: None)  # "later", like the preemption handler
    deadline = SigtermDeadline(float(sys.argv[1]))
    print("ready", flush=True)
    time.sleep(float(sys.argv[2]))
    deadline.close()
    sys.exit(3)
""")


@pytest.mark.parametrize("deadline,work,code", [(1.0, 600.0, SIGTERM_EXIT_CODE), (600.0, 0.5, 3)],
                         ids=["stuck-exits-at-deadline", "finishes-in-time-keeps-its-code"])
def test_sigterm_deadline(deadline, work, code):
    proc = subprocess.Popen([sys.executable, "-c", DEFERRING, str(deadline), str(work)], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=BOUND_S)
    assert proc.returncode == code, err
    assert ("still running 1 s after SIGTERM" in err) == (code == SIGTERM_EXIT_CODE), err


_WATCH = textwrap.dedent("""
    import os, sys, time
    from megatron_prolong.parallel import lifetime
    parents = iter([int(x) for x in sys.argv[1].split(",")])
    last = [next(parents)]
    def getppid():
        last[0] = next(parents, last[0])
        return last[0]
    os.getppid = getppid
    lifetime._cmdline = lambda pid: sys.argv[2] if pid == 1 else ""
    lifetime.watch_launcher(poll_s=0.05)
    time.sleep(2)
    print("alive")
""")


@pytest.mark.parametrize("parents,pid1,alive", [
    ("1", "/usr/bin/python3 /usr/local/bin/torchrun --nproc_per_node 8 -m megatron_prolong.train", True),
    ("1", "/sbin/init splash", False),
    ("4242", "/sbin/init", True),
    ("4242,4242,4242,1", "/sbin/init", False),
], ids=["launcher-is-pid-1", "orphaned-before-start", "parent-alive", "parent-dies"])
def test_launcher_watchdog_and_pid_1(parents, pid1, alive):
    """torchrun as a container's PID 1 is the launcher, not a dead parent; a parent of 1 that is an
    init (the launcher died before the watchdog started) or a parent that changes ends the rank."""
    from megatron_prolong.parallel.lifetime import PARENT_GONE_EXIT_CODE

    res = subprocess.run([sys.executable, "-c", _WATCH, parents, pid1], cwd=REPO, capture_output=True, text=True,
                         timeout=60, env=_env())
    if alive:
        assert res.returncode == 0 and "alive" in res.stdout, res.stderr
    else:
        gone = parents.split(",")[0]
        assert res.returncode == PARENT_GONE_EXIT_CODE and f"the launcher (pid {gone}) is gone" in res.stderr
