"""Checkpoints: exact resume after kills (also mid-save), stage transitions, preemption, bad steps."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from trainrun import REPO, SMALL, _env, assert_losses_close, by_step, start, train


def _start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    return start(run_dir, *SMALL, *overrides, nproc=2, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return train(tmp_path_factory.mktemp("full") / "run", *SMALL, "train.steps=12",
                 "checkpoint.save_interval=1", nproc=2)


def test_killed_mid_save_and_at_random_steps_resumes_exactly(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    # 1. SIGKILL the whole job while a checkpoint is being written (its temporary folder exists).
    proc = _start(run_dir, "train.steps=12", "checkpoint.save_interval=1")
    deadline = time.monotonic() + 300
    while not list(ckpts.glob(".iter_*.tmp")) or not (ckpts / "latest_checkpointed_iteration.txt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before a save could be interrupted"
        time.sleep(0.01)
    _kill_group(proc)
    tracked = int((ckpts / "latest_checkpointed_iteration.txt").read_text())
    assert (ckpts / f"iter_{tracked:07d}" / "prolong_meta.json").is_file()  # the tracker points at a whole one
    # 2. Kill again at a random later moment.
    proc = _start(run_dir, "train.steps=12", "checkpoint.save_interval=1")
    time.sleep(8 + torch.randint(0, 6, ()).item())
    _kill_group(proc)
    # 3. Let it finish.
    finished = train(run_dir, *SMALL, "train.steps=12", "checkpoint.save_interval=1", nproc=2)
    assert "resumed from" in finished.output
    resumed, full = by_step(run_dir), by_step(uninterrupted.dir)  # each step logged once (a resume cuts)
    assert sorted(resumed) == list(range(1, 13))
    assert_losses_close([resumed[s]["loss"] for s in range(1, 13)], [full[s]["loss"] for s in range(1, 13)], rel=1e-9)


def test_keep_last_and_every(tmp_path):
    run = train(tmp_path / "run", *SMALL, "train.steps=6", "checkpoint.save_interval=1",
                "checkpoint.keep_last=2", "checkpoint.keep_every=3")
    kept = sorted(p.name for p in (run.dir / "checkpoints").glob("iter_*"))
    assert kept == ["iter_0000003", "iter_0000005", "iter_0000006"]


def test_killed_while_resaving_a_step_keeps_its_old_copy(uninterrupted, tmp_path):
    """A save of a step that exists moves the old copy aside until the new one is in place; a kill
    between the two renames leaves the old copy, which the next start puts back and resumes from."""
    from megatron_prolong.train.checkpoint import latest_checkpoint

    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted.dir, run_dir)
    ckpts = run_dir / "checkpoints"
    (ckpts / "iter_0000012").rename(ckpts / ".iter_0000012.replaced")  # the state between the renames
    assert latest_checkpoint(ckpts) == ckpts / "iter_0000012"
    assert (ckpts / "iter_0000012" / "prolong_meta.json").is_file() and not (ckpts / ".iter_0000012.replaced").exists()


def test_two_ranks_restart_after_a_save_killed_between_its_renames(uninterrupted, tmp_path):
    """Both ranks of the restarted job find the interrupted save; one repairs it, the other waits."""
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted.dir, run_dir)
    ckpts = run_dir / "checkpoints"
    (ckpts / "iter_0000012").rename(ckpts / ".iter_0000012.replaced")
    resumed = train(run_dir, *SMALL, "train.steps=13", "checkpoint.save_interval=1", nproc=2)
    assert f"resumed from {ckpts / 'iter_0000012'} at step 12" in resumed.output
    assert sorted(p.name for p in ckpts.glob("*iter_*")) == [f"iter_{s:07d}" for s in range(1, 14)]


# Two gloo ranks, released together by a barrier, each reading the latest checkpoint of a run whose
# re-save was killed between its renames (what a multi-process tool does), many times over.
RACE = textwrap.dedent("""
    import os, sys, shutil
    from pathlib import Path
    import torch.distributed as dist
    from megatron_prolong.train.checkpoint import latest_checkpoint
    dist.init_process_group("gloo")
    root = Path(sys.argv[1])
    for attempt in range(int(sys.argv[2])):
        if dist.get_rank() == 0:
            shutil.rmtree(root, ignore_errors=True)
            (root / ".iter_0000003.replaced").mkdir(parents=True)
            (root / ".iter_0000003.replaced" / "prolong_meta.json").write_text("{}")
            (root / "latest_checkpointed_iteration.txt").write_text("3")
        dist.barrier()
        assert latest_checkpoint(root) == root / "iter_0000003", attempt
        dist.barrier()
    dist.destroy_process_group()
""")


def test_concurrent_readers_of_an_interrupted_save_do_not_race(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path / "ckpts"), "300"], cwd=REPO,
                              env=dict(_env(), RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)


def test_damaged_latest_checkpoint_is_refused_naming_the_newest_intact_one(tmp_path):
    """A shard truncated after the save (full disk, killed copy): refused in one line before anything
    loads, naming the damage and the override; the override resumes, and the damaged one is kept."""
    from megatron_prolong.train.checkpoint import damage

    args = (*SMALL, "train.steps=6", "checkpoint.save_interval=2")
    run = train(tmp_path / "run", *args)
    ckpts = run.dir / "checkpoints"
    (ckpts / "latest_checkpointed_iteration.txt").write_text("4")  # as if stopped after step 4
    shard = ckpts / "iter_0000004" / "__0_0.distcp"
    size = shard.stat().st_size
    os.truncate(shard, size // 2)
    refused = train(run.dir, *args, check=False)
    assert refused.proc.returncode == 2, refused.output[-3000:]
    (line,) = [x for x in refused.proc.stderr.splitlines() if x.startswith("megatron-prolong:")]
    assert f"checkpoint {ckpts / 'iter_0000004'} is damaged: __0_0.distcp has {size // 2} bytes, the save wrote " \
           f"{size}" in line
    assert f"the newest intact one is {ckpts / 'iter_0000002'}: resume from it with checkpoint.resume_step=2" in line
    assert "Traceback" not in refused.output and shard.stat().st_size == size // 2
    resumed = train(run.dir, *args, "checkpoint.resume_step=2")
    assert f"resumed from {ckpts / 'iter_0000002'} at step 2" in resumed.output
    kept = ckpts / "iter_0000004.damaged" / "__0_0.distcp"
    assert kept.stat().st_size == size // 2 and damage(ckpts / "iter_0000004") is None
    again = train(run.dir, *SMALL, "train.steps=8", "checkpoint.save_interval=2", "checkpoint.resume_step=2")
    assert f"resumed from {ckpts / 'iter_0000006'} at step 6" in again.output  # the override has done its job


def test_retention_after_a_resume_from_an_earlier_step_spares_the_later_checkpoints(tmp_path):
    """Resuming from step 2 past a damaged step 4 with checkpoint.keep_last=1: the save of step 3
    prunes only what came before it; the damaged step 4 and step 6 stay as they were (keep-last
    over all saved steps would delete step 3, just saved, and both later ones)."""
    args = (*SMALL, "checkpoint.save_interval=2")
    run = train(tmp_path / "run", *args, "train.steps=6")
    ckpts = run.dir / "checkpoints"
    shard = ckpts / "iter_0000004" / "__0_0.distcp"
    os.truncate(shard, shard.stat().st_size // 2)
    size = shard.stat().st_size
    (ckpts / "latest_checkpointed_iteration.txt").write_text("4")  # as if stopped after step 4
    train(run.dir, *SMALL, "train.steps=3", "checkpoint.save_interval=1", "checkpoint.keep_last=1",
          "checkpoint.resume_step=2")
    kept = sorted(p.name for p in ckpts.glob("iter_*"))
    assert kept == ["iter_0000003", "iter_0000004", "iter_0000006"], kept
    assert shard.stat().st_size == size


@pytest.mark.parametrize("how", ["truncate", "flip", "remove"])
def test_manifest_finds_each_kind_of_damage(tmp_path, how):
    from megatron_prolong.train.checkpoint import damage, write_manifest

    (tmp_path / "rng").mkdir()
    (tmp_path / "rng" / "a.pt").write_bytes(b"0123456789")
    (tmp_path / "common.pt").write_bytes(b"abc")
    write_manifest(tmp_path)
    assert damage(tmp_path) is None
    f = tmp_path / "rng" / "a.pt"
    if how == "truncate":
        os.truncate(f, 4)
    elif how == "flip":
        f.write_bytes(b"0123456788")
    else:
        f.unlink()
    expected = {"truncate": "rng/a.pt has 4 bytes, the save wrote 10", "flip": "rng/a.pt differs from what the save wrote",
                "remove": "rng/a.pt is missing"}[how]
    assert expected in damage(tmp_path)


def test_stage_transition_keeps_optimizer_and_restarts_schedule(uninterrupted, tmp_path):
    stage1 = uninterrupted.dir  # peak lr 3e-3; stage 2 another one, as ProLong's scripts may use
    stage2 = train(tmp_path / "stage2", *SMALL, "train.steps=3", "model.rope_base=8e6", "train.lr=2e-3",
                   f"checkpoint.load={stage1}", "checkpoint.load_optimizer=true", "checkpoint.save_interval=0",
                   nproc=2)
    assert "model and optimizer" in stage2.output and "rope_base changes from 500000.0" in stage2.output
    fresh_opt = train(tmp_path / "model_only", *SMALL, "train.steps=3", "model.rope_base=8e6", "train.lr=2e-3",
                      f"checkpoint.load={stage1}", "checkpoint.load_optimizer=false", "checkpoint.save_interval=0",
                      nproc=2)
    assert "model only" in fresh_opt.output
    m2, m1 = stage2.metrics, fresh_opt.metrics
    # Schedule restarted: back at the peak, not at stage 1's floor (and not the loaded groups' lr).
    assert m2[0]["lr"] == m1[0]["lr"] == 2e-3 > 5 * uninterrupted.metrics[-1]["lr"]
    # Same weights at step 1 (same loss); kept Adam moments make the first update differ.
    assert m2[0]["loss"] == pytest.approx(m1[0]["loss"], rel=1e-9)
    assert m2[1]["loss"] != pytest.approx(m1[1]["loss"], rel=1e-6)
    # Data restarted too: the first step sees the same samples as stage 1's first step.
    assert m2[0]["domain/long/samples"] + m2[0]["domain/short/samples"] == 4


def test_mismatched_checkpoint_is_refused_in_words(uninterrupted, tmp_path):
    run = train(tmp_path / "bad", *SMALL, "train.steps=1", "model.num_layers=2",
                f"checkpoint.load={uninterrupted.dir}", check=False)
    assert run.proc.returncode != 0
    assert "does not fit the configured model" in run.output and "model.num_layers: checkpoint 4, config 2" in run.output


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
