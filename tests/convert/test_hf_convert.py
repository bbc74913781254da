"""Hugging Face Llama <-> Megatron: logits agree, round trips are exact, RoPE settings survive."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from convert_helpers import VOCAB, hf_logprobs, hf_state, make_hf_llama, megatron_logits

from megatron_prolong.convert.hf import hf_to_mcore, mcore_to_hf
from megatron_prolong.inference import read_checkpoint

VARIANTS = {
    "rope5e5-untied-gqa": dict(rope_theta=5e5),
    "rope8e6-tied": dict(rope_theta=8e6, tie=True),
    "llama3.1-scaling": dict(rope_theta=5e5, max_pos=16384,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "linear-interpolation-mha": dict(rope_theta=1e4, groups=4, rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_and_round_trip_is_exact(tmp_path, variant):
    kw = VARIANTS[variant]
    model = make_hf_llama(tmp_path / "hf", **kw)
    hf_to_mcore(tmp_path / "hf", tmp_path / "mc")

    # Long enough that RoPE scaling matters (wavelengths beyond the 8192 boundary still differ per position).
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (96,), generator=g).tolist()
    tokens[5] = VOCAB - 1  # the last real vocabulary row, next to the padding
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0]
    got = megatron_logits(tmp_path / "mc", tokens)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 1e-4

    mcore_to_hf(tmp_path / "mc", tmp_path / "back")
    a, b = hf_state(tmp_path / "hf"), hf_state(tmp_path / "back")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k

    # The written config loads in stock transformers and gives the same model.
    from transformers import LlamaForCausalLM

    back = LlamaForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(back(torch.tensor([tokens])).logits[0], ref)
    assert (tmp_path / "back" / "tokenizer.json").is_file()


def test_overrides_reach_config_json(tmp_path):
    make_hf_llama(tmp_path / "hf", rope_theta=5e5)
    hf_to_mcore(tmp_path / "hf", tmp_path / "mc", rope_base=8e6, seq_length=65536)
    _, meta = read_checkpoint(tmp_path / "mc")
    assert meta["model"]["rope_base"] == 8e6 and meta["seq_length"] == 65536
    assert meta["has_optimizer"] is False
    tok = meta["tokenizer"]
    assert (tok["kind"], tok["path"]) == ("hf", str(tmp_path / "mc" / "tokenizer"))
    assert (tok["bos_token_id"], tok["eos_token_id"]) == (1, [2]) and "files" not in tok
    assert (tmp_path / "mc" / "tokenizer" / "tokenizer.json").is_file()
    from megatron_prolong.tokenizer import HFTokenizer

    assert HFTokenizer(meta["tokenizer"]["path"]).vocab_size == VOCAB

    mcore_to_hf(tmp_path / "mc", tmp_path / "back")
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["rope_theta"] == 8e6 and cfg["max_position_embeddings"] == 65536
    assert cfg["bos_token_id"] == 1 and cfg["eos_token_id"] == 2  # the source's (other ids: test_export_generation)
    from transformers import AutoConfig

    loaded = AutoConfig.from_pretrained(tmp_path / "back")
    assert loaded.rope_theta == 8e6 and loaded.max_position_embeddings == 65536


def test_reads_transformers5_rope_parameters(tmp_path):
    """A config.json written by transformers 5.x (rope_parameters, no top-level rope_theta)."""
    make_hf_llama(tmp_path / "hf", rope_theta=8e6)
    cfg_file = tmp_path / "hf" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    theta = cfg.pop("rope_theta")
    cfg.pop("rope_scaling", None)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    cfg_file.write_text(json.dumps(cfg))
    hf_to_mcore(tmp_path / "hf", tmp_path / "mc")
    assert read_checkpoint(tmp_path / "mc")[1]["model"]["rope_base"] == 8e6

    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg["max_position_embeddings"] = 131072
    cfg_file.write_text(json.dumps(cfg))
    hf_to_mcore(tmp_path / "hf", tmp_path / "mc32")
    m = read_checkpoint(tmp_path / "mc32")[1]["model"]
    assert (m["rope_base"], m["rope_scaling"], m["rope_scaling_factor"]) == (5e5, "llama3", 32.0)


def test_sharded_output_and_bf16(tmp_path):
    make_hf_llama(tmp_path / "hf")
    hf_to_mcore(tmp_path / "hf", tmp_path / "mc", dtype="bf16")
    mcore_to_hf(tmp_path / "mc", tmp_path / "back", max_shard_size="40KB")
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / "back" / s).is_file() for s in shards)
    a, b = hf_state(tmp_path / "hf"), hf_state(tmp_path / "back")
    for k in a:
        assert b[k].dtype == torch.bfloat16 and torch.equal(a[k].to(torch.bfloat16), b[k]), k
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg.get("torch_dtype", cfg.get("dtype")) == "bfloat16"
    assert not list(tmp_path.glob(".*tmp*"))
    # A sharded folder (index + shards) converts in again, still bf16 and unchanged.
    hf_to_mcore(tmp_path / "back", tmp_path / "mc2")
    mcore_to_hf(tmp_path / "mc2", tmp_path / "back2")
    c = hf_state(tmp_path / "back2")
    assert all(torch.equal(b[k], c[k]) for k in b)


def test_score_packed_line_equals_documents_alone(tmp_path):
    from megatron_prolong.eval.score import score_file

    model = make_hf_llama(tmp_path / "hf", rope_theta=8e6)
    hf_to_mcore(tmp_path / "hf", tmp_path / "mc")
    g = torch.Generator().manual_seed(3)
    lengths = [17, 1, 30, 12]
    docs = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]
    line, indices, start = [], [], 0
    for d in docs:
        line += d
        indices.append([start, start + len(d)])
        start += len(d)
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"input_ids": line, "indices": indices, "id": "packed"}) + "\n"
                   + json.dumps({"input_ids": docs[0]}) + "\n")
    score_file(tmp_path / "mc", inp, tmp_path / "out.jsonl", chunk=16)
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rows[0]["id"] == "packed" and len(rows[0]["token_logprobs"]) == len(line)
    got = rows[0]["token_logprobs"]
    start = 0
    for d in docs:
        part = got[start:start + len(d)]
        assert part[0] is None
        if len(d) > 1:
            ref = hf_logprobs(model, d)
            assert torch.allclose(torch.tensor(part[1:], dtype=torch.float64), ref, atol=1e-4), (part, ref)
        start += len(d)
    assert sum(x is None for x in got) == len(docs)
    alone = rows[1]["token_logprobs"]
    assert alone[0] is None and torch.allclose(torch.tensor(alone[1:]), torch.tensor(got[1:len(docs[0])]), atol=1e-5)


@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_outputs_follow_the_umask(tmp_path, umask):
    """Both directions: the folder and every file in it as mkdir/open give them under the umask
    (a colleague reads the export), not mkdtemp's owner-only modes."""
    make_hf_llama(tmp_path / "hf")
    previous = os.umask(umask)
    try:
        hf_to_mcore(tmp_path / "hf", tmp_path / "mc")
        mcore_to_hf(tmp_path / "mc", tmp_path / "back")
    finally:
        os.umask(previous)
    for out in (tmp_path / "mc", tmp_path / "back"):
        paths = [out, *out.rglob("*")]
        assert (out / "config.json").is_file() or (out / "prolong_meta.json").is_file()
        modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in paths}
        want = {k: (0o777 if (tmp_path / k).is_dir() else 0o666) & ~umask for k in modes}
        assert modes == want
