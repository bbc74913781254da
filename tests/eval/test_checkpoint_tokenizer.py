"""What the evaluation tools take from a checkpoint: its tokenizer (the checkpoint's own copy) and
every id that ends generation."""

from __future__ import annotations

import json
import shutil

import pytest
from eval_helpers import LLAMA3_VOCAB, llama3_checkpoint, llama3_tokenizer_dir

from megatron_prolong.eval.model import eos_ids, load_tokenizer
from megatron_prolong.eval.rows import EvalInputError


def test_eos_ids_and_a_missing_tokenizer(tmp_path):
    ckpt = llama3_checkpoint(tmp_path)
    tok = load_tokenizer(ckpt)
    assert (tok.bos_id, tok.eos_id) == (128000, 128001)
    record = json.loads((ckpt / "prolong_meta.json").read_text())["tokenizer"]
    assert (record["bos_token_id"], record["eos_token_id"]) == (128000, [128001])
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [128009, 128001]}))
    # The tokenizer's EOS, the record's, then the checkpoint's generation_config.json: what an export
    # of it stops at, too.
    assert eos_ids(ckpt, tok) == [128001, 128009]

    shutil.rmtree(ckpt / "tokenizer")  # the recorded path is this copy too: nothing is left
    with pytest.raises(EvalInputError, match=f"folder to {ckpt}/tokenizer"):
        load_tokenizer(ckpt)


def test_a_source_config_that_disagrees_with_its_tokenizer(tmp_path, capfd):
    """A folder with a Llama-3 tokenizer but transformers' default ids (bos 1, eos 2) in config.json:
    the record keeps the tokenizer's BOS, stops at both EOS ids, and the conversion says so."""
    from convert_helpers import make_hf_llama

    from megatron_prolong.convert.hf import hf_to_mcore

    make_hf_llama(tmp_path / "hf", vocab=LLAMA3_VOCAB, layers=1, hidden=32, heads=4, groups=2, ffn=64,
                  tokenizer=False, tie=True)
    for f in llama3_tokenizer_dir().iterdir():
        if f.suffix == ".json":
            shutil.copy2(f, tmp_path / "hf" / f.name)
    hf_to_mcore(tmp_path / "hf", tmp_path / "mc")
    record = json.loads((tmp_path / "mc" / "prolong_meta.json").read_text())["tokenizer"]
    assert (record["bos_token_id"], record["eos_token_id"]) == (128000, [2, 128001])
    # (the tokenizer folder is the model folder: its generation_config.json adds eos 2 to the tokenizer's)
    assert "states bos 1 / eos [2], its tokenizer 128000 / [128001, 2]; keeping the tokenizer's BOS" in \
        capfd.readouterr().err
