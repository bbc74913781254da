"""Stage 2 loads stage 1's optimizer state into another layout: the Adam moments and fp32 master
weights survive it exactly (compared as full tensors by parameter name, read from the checkpoints
independently of any layout), and training continues with the unchanged-layout run's losses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainrun import REPO, SMALL, _env, assert_losses_close, by_step, crashed_copy, train

from megatron_prolong.convert.mcore import DistCheckpointReader
from megatron_prolong.inference import megatron_session

RUN = (*SMALL, "train.steps=4", "parallel.distributed_optimizer=true")
SOURCE = ("parallel.tp=1",)  # data-parallel 2: the distributed optimizer shards the state over 2 ranks


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return train(tmp_path_factory.mktemp("tp1dp2") / "run", *RUN, *SOURCE, "checkpoint.save_interval=2", nproc=2)


def optimizer_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every optimizer tensor of a checkpoint at its global shape, keyed by parameter name."""
    with megatron_session():
        reader = DistCheckpointReader(path, prefix="")
        return {k: reader.load(k) for k in reader.metadata if k.startswith("optimizer.")}


RNG_FILES = {"parallel.tp=2": {"tp0_pp0_cp0_dp0.pt", "tp1_pp0_cp0_dp0.pt"},
             "parallel.cp=2": {"tp0_pp0_cp0_dp0.pt", "tp0_pp0_cp1_dp0.pt"}}


def _rng_files(path: Path) -> set[str]:
    return {f.name for f in (path / "rng").iterdir()}


@pytest.mark.parametrize("layout", [("parallel.tp=2",), ("parallel.cp=2",)], ids=["tp2", "cp2"])
def test_optimizer_state_survives_a_layout_change(source, tmp_path, layout):
    run_dir = crashed_copy(source.dir, tmp_path / "run", step=2)
    iter2 = run_dir / "checkpoints" / "iter_0000002"
    assert _rng_files(iter2) == {"tp0_pp0_cp0_dp0.pt", "tp0_pp0_cp0_dp1.pt"}  # RNG keyed by coordinate
    saved = optimizer_tensors(iter2)
    resave = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              str(REPO / "tests" / "resave_checkpoint.py"), f"run.dir={run_dir}", *RUN, *layout]
    done = subprocess.run(resave, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    loaded = optimizer_tensors(iter2)
    assert _rng_files(iter2) == RNG_FILES[layout[0]]
    assert sorted(loaded) == sorted(saved)
    kinds = {k.split(".")[2] for k in saved}
    assert {"exp_avg", "exp_avg_sq"} <= kinds, kinds
    for key, tensor in saved.items():
        assert torch.equal(loaded[key], tensor), key
    train(run_dir, *RUN, *layout, "checkpoint.save_interval=0", nproc=2)
    after, ref = by_step(run_dir), by_step(source.dir)
    assert_losses_close([after[s]["loss"] for s in (3, 4)], [ref[s]["loss"] for s in (3, 4)], rel=1e-4)
