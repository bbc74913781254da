"""Checkpoints: exact resume after kills (also mid-save), retention, damaged checkpoints, stage
transitions. Stop signals and bad steps: test_checkpoint_stop.py (its own file, so the two halves
run on separate test workers)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from trainrun import REPO, SMALL, TrainingRun, _env, assert_losses_close, by_step, free_port, start, train


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
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path / "ckpts"), "300"], cwd=REPO,
                              env=dict(_env(), RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """One run of 6 steps saved every 2; each test that damages it works on its own copy."""
    return train(tmp_path_factory.mktemp("six") / "run", *SMALL, "train.steps=6", "checkpoint.save_interval=2")


def _copy(run: TrainingRun, dest: Path) -> TrainingRun:
    shutil.copytree(run.dir, dest)
    return TrainingRun(dest, run.proc)


def test_damaged_latest_checkpoint_is_refused_naming_the_newest_intact_one(six_steps, tmp_path):
    """A shard truncated after the save (full disk, killed copy): refused in one line before anything
    loads, naming the damage and the override; the override resumes, and the damaged one is kept."""
    from megatron_prolong.train.checkpoint import damage

    args = (*SMALL, "train.steps=6", "checkpoint.save_interval=2")
    run = _copy(six_steps, tmp_path / "run")
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


def test_retention_after_a_resume_from_an_earlier_step_spares_the_later_checkpoints(six_steps, tmp_path):
    """Resuming from step 2 past a damaged step 4 with checkpoint.keep_last=1: the save of step 3
    prunes only what came before it; the damaged step 4 and step 6 stay as they were (keep-last
    over all saved steps would delete step 3, just saved, and both later ones)."""
    run = _copy(six_steps, tmp_path / "run")  # 6 steps saved every 2
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
