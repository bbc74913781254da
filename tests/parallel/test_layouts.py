"""Parallel layouts give the per-step losses of a single process (float32, relative 1e-4)."""

from __future__ import annotations

import pytest
from trainrun import PARITY, assert_losses_close


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    from trainrun import train

    return train(tmp_path_factory.mktemp("baseline") / "run", *PARITY).losses


@pytest.mark.parametrize(
    "layout,nproc",
    [
        (("parallel.tp=2",), 2),
        (("parallel.pp=2",), 2),
        (("parallel.cp=2",), 2),
        (("parallel.tp=2", "parallel.sequence_parallel=true"), 2),
        ((), 2),  # data parallel: 2 replicas, the same global batch
        (("parallel.tp=2", "parallel.cp=2"), 4),
    ],
    ids=["tp2", "pp2", "cp2", "tp2-sp", "dp2", "tp2-cp2"],
)
def test_layout_matches_single_process(baseline, run_training, layout, nproc):
    run = run_training(*PARITY, *layout, nproc=nproc)
    assert len(baseline) == 4
    assert_losses_close(run.losses, baseline)


def test_distributed_optimizer_matches(baseline, run_training):
    run = run_training(*PARITY, "parallel.distributed_optimizer=true", nproc=2)
    assert_losses_close(run.losses, baseline)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_recompute_matches(baseline, run_training, mode):
    run = run_training(*PARITY, f"train.recompute={mode}")
    assert_losses_close(run.losses, baseline)


def test_per_document_positions_match_continuous(baseline, run_training):
    """RoPE is relative, so with document masking restarting positions per document is the same function."""
    run = run_training(*PARITY, "model.rope_positions=per_document")
    assert_losses_close(run.losses, baseline)


def test_overlapped_grad_reduce_matches(tmp_path, run_training):
    """Data-parallel gradients reduced bucket by bucket during backward (2 micro-batches per rank:
    Megatron starts a bucket's reduction once every micro-batch's gradient has arrived) give the
    same losses and gradient norms."""
    from trainrun import train

    single = train(tmp_path / "single", *PARITY).metrics
    run = run_training(*PARITY, "parallel.overlap_grad_reduce=true", "parallel.distributed_optimizer=true", nproc=2)
    assert_losses_close(run.losses, [m["loss"] for m in single])
    assert_losses_close([m["grad_norm"] for m in run.metrics], [m["grad_norm"] for m in single])
