"""A requeued run resumes on another number of processes and with a new learning-rate schedule."""

from __future__ import annotations

import math

import pytest
from trainrun import SMALL, assert_checkpoint_size_estimated, assert_losses_close, by_step, crashed_copy, train

# Run n of FULL: processes, optimizer; 6 steps of the demo schedule (peak 3e-3, floor 3e-4, one
# warmup step), saved at step 3.
OPTIMIZER = {1: "parallel.distributed_optimizer=false", 2: "parallel.distributed_optimizer=true"}
FULL = (*SMALL, "train.steps=6", "checkpoint.save_interval=3")


def megatron_lr(n: int, peak: float, floor: float, warmup: int, decay: int) -> float:
    """Linear warmup then cosine to the floor, at optimizer step n (0-based), as Megatron defines it."""
    if warmup and n <= warmup:
        return peak * n / warmup
    if n > decay:
        return floor
    ratio = (n - warmup) / (decay - warmup)
    return floor + 0.5 * (1 + math.cos(math.pi * ratio)) * (peak - floor)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """Uninterrupted runs on 1 and 2 processes."""
    return {n: train(tmp_path_factory.mktemp(f"full{n}") / "run", *FULL, OPTIMIZER[n], nproc=n) for n in (1, 2)}


@pytest.mark.parametrize("n", [1, 2])
def test_logged_lr_is_the_one_the_step_used(full, n):
    m = by_step(full[n].dir)
    assert m[1]["lr"] == 0.0  # the warmup's first step; the old log showed the next step's (the peak)
    for s in range(1, 7):
        assert m[s]["lr"] == pytest.approx(megatron_lr(s - 1, 3e-3, 3e-4, 1, 6), rel=1e-12), s


@pytest.mark.parametrize("n", [1, 2])
def test_size_estimate_matches_the_saved_checkpoints(full, n):
    assert_checkpoint_size_estimated(full[n].dir, 3, *FULL, OPTIMIZER[n])  # fp32; plain and distributed optimizer


@pytest.mark.parametrize("saved_on, resumed_on", [(1, 2), (2, 1)])
def test_resume_on_another_number_of_processes_continues_the_data_stream(full, tmp_path, saved_on, resumed_on):
    run_dir = crashed_copy(full[saved_on].dir, tmp_path / "run", step=3)
    resumed = train(run_dir, *FULL, OPTIMIZER[saved_on], nproc=resumed_on)
    assert "resumed from" in resumed.output
    assert "resuming at step 3: 3 steps to go (of 6)" in resumed.output  # not "training 6 steps"
    assert "done: 3 steps (resumed at step 3) in " in resumed.output
    after, ref = by_step(run_dir), by_step(full[saved_on].dir)
    assert sorted(after) == list(range(1, 7))  # the crashed attempt's steps 4-6 are not kept twice
    for other in (ref, by_step(full[resumed_on].dir)):
        assert_losses_close([after[s]["loss"] for s in (4, 5, 6)], [other[s]["loss"] for s in (4, 5, 6)], rel=1e-4)
    for s in (4, 5, 6):  # the same samples: per-domain counts since the start, exactly
        counts = {k: v for k, v in after[s].items() if k.endswith(("/samples", "/tokens")) or k == "tokens"}
        assert counts == {k: ref[s][k] for k in counts} and len(counts) == 5


@pytest.mark.parametrize("n", [1, 2])
def test_resume_with_a_new_schedule_applies_it_from_the_current_step(full, tmp_path, n):
    run_dir = crashed_copy(full[n].dir, tmp_path / "again", step=3)
    again = train(run_dir, *SMALL, OPTIMIZER[n], "train.steps=10", "train.lr=6e-3", "train.min_lr=1e-4",
                  "train.warmup_fraction=0.2", "checkpoint.save_interval=0", nproc=n)
    line = next(x for x in again.output.splitlines() if "changed schedule" in x)
    for change in ("train.lr 0.003 -> 0.006", "train.steps 6 -> 10", "floor (train.min_lr / min_lr_ratio) 0.0003",
                   "warmup steps (train.warmup_fraction x train.steps) 1 -> 2"):
        assert change in line, line
    m, m2 = by_step(full[n].dir), by_step(run_dir)
    assert sorted(m2) == list(range(1, 11))
    for s in range(4, 11):
        assert m2[s]["lr"] == pytest.approx(megatron_lr(s - 1, 6e-3, 1e-4, 2, 10), rel=1e-12), s
    assert m2[4]["loss"] == pytest.approx(m[4]["loss"], rel=1e-9)  # same weights and data at step 4
