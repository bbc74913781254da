"""The trainer starts from an hf-to-mcore output; a TP=2-saved checkpoint converts back to the same HF
weights; the command-line tools run end to end (as subprocesses, like users run them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from convert_helpers import hf_state, make_hf_llama

REPO = Path(__file__).resolve().parents[2]


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_trainer_starts_from_converted_checkpoint_and_tp2_converts_back(tmp_path, run_training):
    make_hf_llama(tmp_path / "hf", tie=False, rope_theta=5e5)
    res = _tool("tools/convert_checkpoint.py", "hf-to-mcore", "--input", str(tmp_path / "hf"),
                "--output", str(tmp_path / "mc"), "--seq-length", "128")
    assert res.returncode == 0, res.stderr[-3000:]
    overrides = (tmp_path / "mc" / "train_overrides.txt").read_text().split()
    assert f"checkpoint.load={tmp_path / 'mc'}" in overrides

    # One TP=2 step with a learning rate far below float32 resolution: weights are saved unchanged.
    run = run_training(*overrides, "parallel.tp=2", "train.steps=1", "train.lr=1e-30",
                "train.precision=fp32", "data.seq_length=128", "train.global_batch_size=2",
                "train.micro_batch_size=1", "log.tensorboard=false", nproc=2)
    assert "initialised from" in run.output and "model only" in run.output
    assert run.losses and run.losses[0] < 20

    res = _tool("tools/convert_checkpoint.py", "mcore-to-hf", "--input", str(run.dir),
                "--output", str(tmp_path / "back"))
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = hf_state(tmp_path / "hf"), hf_state(tmp_path / "back")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].equal(b[k]), k
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["max_position_embeddings"] == 128 and cfg["rope_theta"] == 5e5


def test_eval_long_score_tool(tmp_path):
    make_hf_llama(tmp_path / "hf", layers=1)
    res = _tool("tools/convert_checkpoint.py", "hf-to-mcore", "--input", str(tmp_path / "hf"),
                "--output", str(tmp_path / "mc"))
    assert res.returncode == 0, res.stderr[-3000:]
    (tmp_path / "in.jsonl").write_text(json.dumps({"input_ids": [5, 6, 7, 8, 9], "indices": [[0, 2], [2, 5]]}) + "\n")
    res = _tool("tools/eval_long.py", "score", "--checkpoint", str(tmp_path / "mc"),
                "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"))
    assert res.returncode == 0, res.stderr[-3000:]
    row = json.loads((tmp_path / "out.jsonl").read_text())
    lp = row["token_logprobs"]
    assert len(lp) == 5 and lp[0] is None and lp[2] is None
    assert all(isinstance(x, float) and x < 0 for x in (lp[1], lp[3], lp[4]))

    (tmp_path / "bad.jsonl").write_text(json.dumps({"input_ids": [5, 6, 999]}) + "\n")
    res = _tool("tools/eval_long.py", "score", "--checkpoint", str(tmp_path / "mc"),
                "--input", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "bad_out.jsonl"))
    assert res.returncode == 1 and "line 1" in res.stderr and "input_ids must be in [0, 300)" in res.stderr
    assert not (tmp_path / "bad_out.jsonl").exists()


@pytest.mark.parametrize("flag", ["--cp", "--tp"])
def test_score_with_two_processes_matches_one_process(tmp_path, flag):
    """torchrun with 2 processes: CP=2 (zigzag split, padding to 2 x CP) and TP=2 (vocabulary-parallel
    log-softmax, the padding columns on rank 1) give the single-process log-probabilities."""
    from megatron_prolong.convert.hf import hf_to_mcore
    from megatron_prolong.eval.score import score_file

    make_hf_llama(tmp_path / "hf", layers=1)
    hf_to_mcore(tmp_path / "hf", tmp_path / "mc")
    lines = [{"input_ids": list(range(3, 40)), "indices": [[0, 9], [9, 10], [10, 37]]},
             {"input_ids": list(range(100, 123))}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    score_file(tmp_path / "mc", tmp_path / "in.jsonl", tmp_path / "ref.jsonl")
    ref = [json.loads(x)["token_logprobs"] for x in (tmp_path / "ref.jsonl").read_text().splitlines()]
    out = tmp_path / "out.jsonl"
    res = _tool("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tools/eval_long.py",
                "score", flag, "2", "--checkpoint", str(tmp_path / "mc"), "--input", str(tmp_path / "in.jsonl"),
                "--output", str(out), "--chunk", "8")
    assert res.returncode == 0, res.stderr[-3000:]
    got = [json.loads(x)["token_logprobs"] for x in out.read_text().splitlines()]
    for g, r in zip(got, ref, strict=True):
        assert [x is None for x in g] == [x is None for x in r]
        assert max(abs(a - b) for a, b in zip(g, r) if a is not None) < 1e-5
