"""Checkpoints on stop: preemption and Ctrl-C signals to the process group, the checkpoint-writer
helper's lifetime, non-finite steps (split from test_checkpoint.py, so the two run on separate
test workers)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from trainrun import SMALL, start, train


def _start_and_wait_for_a_save(run_dir: Path, *overrides: str) -> subprocess.Popen:
    proc = start(run_dir, *SMALL, "train.steps=500", "checkpoint.save_interval=2", *overrides,
                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    tracker = run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
    while not tracker.exists() or int(tracker.read_text()) < 2:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(1.0)
    return proc


@pytest.mark.parametrize("sig,code", [(signal.SIGUSR1, 75), (signal.SIGTERM, 75), (signal.SIGINT, 130)],
                         ids=["SIGUSR1", "SIGTERM", "SIGINT"])
def test_stop_signal_to_the_group_checkpoints_and_exits(tmp_path, sig, code):
    """The signal goes to the whole process group (as Slurm signals a step, GNU timeout its child, a
    terminal a Ctrl-C) after a first save has started Megatron's checkpoint-writer helpers: they
    must survive it. Preemptions exit 75 (requeue); Ctrl-C exits 130."""
    run_dir = tmp_path / "run"
    proc = _start_and_wait_for_a_save(run_dir)
    os.killpg(proc.pid, sig)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == code, out[-3000:]
    step = int((run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text())
    assert 3 <= step < 500 and f"{sig.name}: checkpointed at step {step}" in out
    assert "Traceback" not in out and "Error" not in out, out[-3000:]


def test_checkpoint_writer_helper_dies_with_the_killed_trainer(tmp_path):
    """The helper ignores the stop signals, so nothing but its parent's death may end it: SIGKILL the
    trainer alone and the helper (and Python's resource tracker) must go too, closing the output pipe."""
    from megatron_prolong.parallel.lifetime import descendants

    proc = _start_and_wait_for_a_save(tmp_path / "run")
    helpers = descendants(proc.pid)
    assert helpers
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)  # hangs while a helper holds the pipe open
    deadline = time.monotonic() + 30
    while alive := [p for p in helpers if _alive(p)]:
        assert time.monotonic() < deadline, f"helpers outlived the trainer: {alive}"
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_second_ctrl_c_exits_at_once(tmp_path):
    # Steps of several seconds: the second Ctrl-C comes long before the step boundary where the
    # first one would checkpoint (two signals sent at once would arrive as one).
    proc = _start_and_wait_for_a_save(tmp_path / "run", "data.seq_length=2048")
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "a second SIGINT; exiting now" in out, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]


def test_non_finite_steps_are_skipped_then_stop(tmp_path):
    run = train(tmp_path / "run", *SMALL, "train.steps=20", "train.lr=1e12", "train.warmup_fraction=0",
                "train.grad_clip=0", "train.max_skipped_steps_in_row=2", "checkpoint.save_interval=0", check=False)
    assert run.proc.returncode != 0
    assert "2 steps in a row had a non-finite loss or gradient" in run.output
    skipped = [m for m in run.metrics if m["skipped"]]
    assert len(skipped) >= 1 and skipped[-1]["skipped_total"] >= 1
    assert not (run.dir / "checkpoints" / "latest_checkpointed_iteration.txt").exists()
