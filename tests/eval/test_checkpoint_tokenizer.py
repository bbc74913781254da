"""What the evaluation tools take from a checkpoint: its tokenizer (the checkpoint's own copy) and
every id that ends generation."""

from __future__ import annotations

import json
import shutil

import pytest
from eval_helpers import llama3_checkpoint

from megatron_prolong.eval.model import eos_ids, load_tokenizer
from megatron_prolong.eval.rows import EvalInputError


def test_eos_ids_and_a_missing_tokenizer(tmp_path):
    ckpt = llama3_checkpoint(tmp_path)
    tok = load_tokenizer(ckpt)
    assert (tok.bos_id, tok.eos_id) == (128000, 128001)
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [128009, 128001]}))
    # The tokenizer's EOS, the record's (the source config.json's eos_token_id, 2 in this fixture),
    # then the checkpoint's generation_config.json: what an export of it stops at, too.
    assert eos_ids(ckpt, tok) == [128001, 2, 128009]

    shutil.rmtree(ckpt / "tokenizer")  # the recorded path is this copy too: nothing is left
    with pytest.raises(EvalInputError, match=f"folder to {ckpt}/tokenizer"):
        load_tokenizer(ckpt)
