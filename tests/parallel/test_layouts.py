"""Parallel layouts train like a single process (float32, relative 1e-4): the same per-step losses
and pre-clip gradient norms, and after the last step the same weights and Adam moments, read back
from each run's final checkpoint at their global shapes.

Losses alone cannot tell: Adam's update is invariant to a constant gradient scale, so a layout
that doubles its gradients trains to the same losses and weights. The gradient norm catches a
global scale error; the first moment (exp_avg, an average of clipped gradients) catches one that
changes the gradient's direction, e.g. a wrong reduction of some tensors only.
"""

from __future__ import annotations

import pytest
from trainrun import PARITY, assert_losses_close, assert_tensors_close, checkpoint_tensors


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    from trainrun import train

    run = train(tmp_path_factory.mktemp("baseline") / "run", *PARITY)
    return {"losses": run.losses, "grad_norms": [m["grad_norm"] for m in run.metrics],
            "tensors": checkpoint_tensors(run.dir)}


def assert_trains_like(run, baseline) -> None:
    assert len(baseline["losses"]) == 4
    assert_losses_close(run.losses, baseline["losses"])
    assert_losses_close([m["grad_norm"] for m in run.metrics], baseline["grad_norms"])
    assert_tensors_close(checkpoint_tensors(run.dir), baseline["tensors"])


@pytest.mark.parametrize(
    "layout,nproc",
    [
        (("parallel.tp=2",), 2),
        (("parallel.pp=2",), 2),
        (("parallel.cp=2",), 2),
        (("parallel.cp=4",), 4),
        (("parallel.tp=2", "parallel.sequence_parallel=true"), 2),
        ((), 2),  # data parallel: 2 replicas, the same global batch
        (("parallel.tp=2", "parallel.cp=2"), 4),
        (("parallel.distributed_optimizer=true",), 2),
    ],
    ids=["tp2", "pp2", "cp2", "cp4", "tp2-sp", "dp2", "tp2-cp2", "distopt-dp2"],
)
def test_layout_matches_single_process(baseline, run_training, layout, nproc):
    assert_trains_like(run_training(*PARITY, *layout, nproc=nproc), baseline)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_recompute_matches(baseline, run_training, mode):
    assert_trains_like(run_training(*PARITY, f"train.recompute={mode}"), baseline)


def test_per_document_positions_match_continuous(baseline, run_training):
    """RoPE is relative, so with document masking restarting positions per document is the same function."""
    assert_trains_like(run_training(*PARITY, "model.rope_positions=per_document"), baseline)


def test_overlapped_grad_reduce_matches(baseline, run_training):
    """Data-parallel gradients reduced bucket by bucket during backward (2 micro-batches per rank:
    Megatron starts a bucket's reduction once every micro-batch's gradient has arrived)."""
    run = run_training(*PARITY, "parallel.overlap_grad_reduce=true", "parallel.distributed_optimizer=true", nproc=2)
    assert_trains_like(run, baseline)
