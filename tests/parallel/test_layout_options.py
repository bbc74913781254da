"""Training options that must not change the numbers train like a single process without them
(float32, relative 1e-4: losses, gradient norms, final weights and Adam moments; see
test_layouts.py): activation recompute, per-document RoPE positions, the overlapped data-parallel
gradient reduction."""

from __future__ import annotations

import pytest
from trainrun import PARITY, assert_trains_like


def test_full_recompute_matches(baseline, run_training):
    assert_trains_like(run_training(*PARITY, "train.recompute=full"), baseline)


def test_selective_recompute_matches_with_sequence_parallelism(baseline, run_training):
    """The plugin's modules (SwiGLU and norm outputs rebuilt, model/released.py) where the
    projections keep only their sequence shard of the norm output and all-gather it again in backward."""
    run = run_training(*PARITY, "train.recompute=selective", "parallel.tp=2", "parallel.sequence_parallel=true", nproc=2)
    assert_trains_like(run, baseline)


def test_per_document_positions_match_continuous(baseline, run_training):
    """RoPE is relative, so with document masking restarting positions per document is the same function."""
    assert_trains_like(run_training(*PARITY, "model.rope_positions=per_document"), baseline)


def test_overlapped_grad_reduce_matches(baseline, run_training):
    """Data-parallel gradients reduced bucket by bucket during backward (2 micro-batches per rank:
    Megatron starts a bucket's reduction once every micro-batch's gradient has arrived)."""
    run = run_training(*PARITY, "parallel.overlap_grad_reduce=true", "parallel.distributed_optimizer=true", nproc=2)
    assert_trains_like(run, baseline)
