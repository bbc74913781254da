"""Position-wise loss: buckets from known log-probabilities, and the tool against Hugging Face's
per-document losses on a converted random Llama; the plot is written."""

from __future__ import annotations

import json
import math

import torch
from convert_helpers import VOCAB, hf_logprobs, make_hf_llama

from megatron_prolong.convert.hf import hf_to_mcore
from megatron_prolong.eval.cli import main
from megatron_prolong.eval.position_loss import bucket_losses


def test_buckets_are_log_spaced_per_document():
    # Two documents: starts at 0 and 3. Positions 1, 2 | 1, 2, 3, 4.
    lps = [None, -1.0, -2.0, None, -3.0, -4.0, -5.0, -6.0]
    starts = [0, 0, 0, 3, 3, 3, 3, 3]
    got = bucket_losses([(lps, starts)])
    assert got == [
        {"start": 1, "end": 2, "loss": 2.0, "tokens": 2},  # position 1 of both documents: 1 and 3
        {"start": 2, "end": 4, "loss": (2 + 4 + 5) / 3, "tokens": 3},
        {"start": 4, "end": 8, "loss": 6.0, "tokens": 1},
    ]


def test_tool_matches_hf_per_document_losses(tmp_path):
    model = make_hf_llama(tmp_path / "hf", rope_theta=8e6, layers=1, max_pos=256)
    hf_to_mcore(tmp_path / "hf", tmp_path / "mc")
    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (70, 30, 200)]
    lines = [{"input_ids": docs[0] + docs[1], "indices": [[0, 70], [70, 100]]}, {"input_ids": docs[2] + [5] * 100}]
    (tmp_path / "held.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert main(["position-loss", "--checkpoint", str(tmp_path / "mc"), "--data", str(tmp_path / "held.jsonl"),
                 "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "position_loss.json").read_text())
    assert result["sequences_cut_to_max_length"] == 1 and result["max_length"] == 256

    # Reference: HF scores each document alone; the 300-token line is cut to the model's 256.
    sums, counts = {}, {}
    for doc in (docs[0], docs[1], (docs[2] + [5] * 100)[:256]):
        for pos, lp in enumerate(hf_logprobs(model, doc).tolist(), start=1):
            b = int(math.log2(pos))
            sums[b] = sums.get(b, 0.0) - lp
            counts[b] = counts.get(b, 0) + 1
    assert [x["start"] for x in result["buckets"]] == [2**b for b in sorted(sums)]
    for x in result["buckets"]:
        b = int(math.log2(x["start"]))
        assert x["tokens"] == counts[b]
        assert abs(x["loss"] - sums[b] / counts[b]) < 1e-5
    png = tmp_path / "out" / "position_loss.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5_000
