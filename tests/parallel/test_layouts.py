"""Parallel layouts train like a single process (float32, relative 1e-4): the same per-step losses
and pre-clip gradient norms, and after the last step the same weights and Adam moments, read back
from each run's final checkpoint at their global shapes.

Losses alone cannot tell: Adam's update is invariant to a constant gradient scale, so a layout
that doubles its gradients trains to the same losses and weights. The gradient norm catches a
global scale error; the first moment (exp_avg, an average of clipped gradients) catches one that
changes the gradient's direction, e.g. a wrong reduction of some tensors only.

The layouts here; recompute, per-document positions and the overlapped gradient reduction in
test_layout_options.py (its own file, so the two run on separate test workers). The baseline run
(tests/parallel/conftest.py) is trained once per session.
"""

from __future__ import annotations

import pytest
from trainrun import PARITY, assert_trains_like


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
