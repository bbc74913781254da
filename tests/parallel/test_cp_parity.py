"""The ``spread`` CP split in the trainer: per-step losses AND gradient norms at CP = 2 and 4
(and CP = 2 with TP = 2 and sequence parallelism) equal the single process's, float32, 1e-4
relative. ``cp_min_chunk=4`` makes it cut the documents of these 256-token rows over all ranks,
not only place them whole, so both paths of the split run. The default ``balanced`` split runs in
tests/parallel/test_layouts.py (CP 2, CP 4, TP 2 x CP 2). The single-process run compared with
(tests/parallel/conftest.py) is trained once per session, shared with those tests."""

from __future__ import annotations

import pytest
from trainrun import PARITY, assert_losses_close

SPLIT = ("model.attention.cp_split=spread", "model.attention.cp_min_chunk=4")


@pytest.mark.parametrize("layout,nproc", [
    (("parallel.cp=2",), 2),
    (("parallel.cp=4",), 4),
    (("parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true"), 4),
], ids=["cp2", "cp4", "tp2-cp2-sp"])
def test_spread_split_matches_single_process(baseline, run_training, layout, nproc):
    run = run_training(*PARITY, *SPLIT, *layout, nproc=nproc)
    assert len(baseline["metrics"]) == 4
    assert_losses_close(run.losses, [m["loss"] for m in baseline["metrics"]])
    assert_losses_close([m["grad_norm"] for m in run.metrics], [m["grad_norm"] for m in baseline["metrics"]])
