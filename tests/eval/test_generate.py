"""Greedy generation with the KV cache: token for token Hugging Face's greedy ``generate`` on a
converted random Llama (RoPE base 8e6), in one process and with TP = 2 / CP = 2 over gloo; the
cached decode gives the log-probabilities of re-running the full context."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from convert_helpers import VOCAB, make_hf_llama

from megatron_prolong.convert.hf import hf_to_mcore
from megatron_prolong.eval.generate import generate_file
from megatron_prolong.eval.score import score_file

REPO = Path(__file__).resolve().parents[2]
NEW = 14


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (37, 64, 5)]


def _hf_greedy(model, prompt: list[int], eos: int, new: int = NEW) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=eos,
                             pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A random HF Llama (RoPE base 8e6, GQA, untied), its Megatron conversion and HF's greedy outputs."""
    root = tmp_path_factory.mktemp("gen")
    model = make_hf_llama(root / "hf", rope_theta=8e6, layers=2, seed=3)
    hf_to_mcore(root / "hf", root / "mc")
    prompts = _prompts()
    free = [_hf_greedy(model, p, eos=2) for p in prompts]
    assert all(len(f) == NEW and 2 not in f for f in free), "the fixture should not hit EOS by chance"
    # EOS: the 6th token of the first greedy continuation stops it, in HF and here alike.
    eos = free[0][5]
    refs = [_hf_greedy(model, p, eos=eos) for p in prompts]
    assert len(refs[0]) == 6
    lines = [{"input_ids": p} for p in prompts]
    # Packed: generation continues document 2, which attends only to itself, so HF's greedy decoding
    # of document 2 alone is the reference (RoPE is relative: its offset in the row does not matter).
    lines.append({"input_ids": list(range(3, 40)), "indices": [[0, 20], [20, 37]]})
    refs.append(_hf_greedy(model, list(range(23, 40)), eos=eos))
    (root / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root, refs, eos


def _read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _check_against_full_context(ckpt: Path, work: Path, rows: list[dict]) -> None:
    """Log p of every generated token equals scoring prompt + output with the full forward (one process)."""
    lines = []
    for r in rows:
        ids = r["input_ids"] + r["output_ids"]
        docs = [list(d) for d in r.get("indices", [[0, len(r["input_ids"])]])]
        docs[-1][1] = len(ids)  # the output continues the last document
        lines.append({"input_ids": ids, "indices": docs})
    (work / "full.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    score_file(ckpt, work / "full.jsonl", work / "scored.jsonl")
    for r, s in zip(rows, _read(work / "scored.jsonl"), strict=True):
        n = len(r["input_ids"])
        full = s["token_logprobs"][n:]
        assert len(full) == len(r["output_logprobs"])
        assert max(abs(a - b) for a, b in zip(full, r["output_logprobs"])) < 1e-5


def test_greedy_equals_hf_generate_and_full_context(converted, tmp_path):
    root, refs, eos = converted
    generate_file(root / "mc", root / "in.jsonl", tmp_path / "out.jsonl", max_new_tokens=NEW, eos=[eos])
    rows = _read(tmp_path / "out.jsonl")
    for r, ref in zip(rows, refs, strict=True):
        assert r["output_ids"] == ref
    assert rows[0]["output_ids"][-1] == eos and len(rows[0]["output_ids"]) == 6
    assert all(isinstance(r["text"], str) for r in rows)
    _check_against_full_context(root / "mc", tmp_path, rows)


@pytest.mark.parametrize("batch", [2, 4])
def test_batched_rows_equal_hf_generate(converted, tmp_path, batch):
    """Rows decoded together (prompts of 37, 64, 5 and a packed 37 tokens; the first stops at its EOS
    after 6 tokens while the others go on): each row's tokens are HF's for that prompt alone, and its
    log-probabilities those of the full context."""
    root, refs, eos = converted
    generate_file(root / "mc", root / "in.jsonl", tmp_path / "out.jsonl", max_new_tokens=NEW, eos=[eos],
                  batch_size=batch)
    rows = _read(tmp_path / "out.jsonl")
    assert [r["output_ids"] for r in rows] == refs
    _check_against_full_context(root / "mc", tmp_path, rows)


def test_default_eos_and_prompt_text(converted, tmp_path):
    """``prompt`` lines are tokenized with the checkpoint's tokenizer; the default EOS is its eos id."""
    root, _, _ = converted
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "w5 w9 w200 w17"}) + "\n")
    generate_file(root / "mc", tmp_path / "in.jsonl", tmp_path / "out.jsonl", max_new_tokens=3)
    row = _read(tmp_path / "out.jsonl")[0]
    assert row["input_ids"] == [5, 9, 200, 17] and len(row["output_ids"]) == 3
    assert row["text"] == " ".join(f"w{t}" for t in row["output_ids"] if t != 2)


@pytest.mark.parametrize("flag", ["--tp", "--cp"])
def test_two_processes_match_hf(converted, flag, tmp_path):
    """CP = 2: each rank keeps its shard of the cache, decode merges by log-sum-exp. TP = 2: heads
    and vocabulary split. Both give HF's tokens and the full-context log-probabilities."""
    root, refs, eos = converted
    out = tmp_path / "out.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tools/eval_long.py",
         "generate", flag, "2", "--checkpoint", str(root / "mc"), "--input", str(root / "in.jsonl"),
         "--output", str(out), "--max-new-tokens", str(NEW), "--eos-ids", str(eos)],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _read(out)
    for r, ref in zip(rows, refs, strict=True):
        assert r["output_ids"] == ref
    _check_against_full_context(root / "mc", tmp_path, rows)


def test_too_long_is_refused_before_generation(converted, tmp_path):
    root, _, _ = converted
    (tmp_path / "in.jsonl").write_text(json.dumps({"input_ids": [5] * 4090}) + "\n")
    with pytest.raises(Exception, match="exceeds the model's length 4096"):
        generate_file(root / "mc", tmp_path / "in.jsonl", tmp_path / "out.jsonl", max_new_tokens=10)
    assert not (tmp_path / "out.jsonl").exists()
