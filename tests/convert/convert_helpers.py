"""Tiny random Hugging Face Llamas (built with transformers, float32) and helpers for the converters."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("PROLONG_CONVERT_QUIET", "1")

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

VOCAB = 300  # not a multiple of 128: the Megatron side pads it to 384


def make_tokenizer(folder: Path, vocab: int = VOCAB) -> None:
    """A word-level tokenizer with ``vocab`` entries, saved as a local Hugging Face folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for k in range(3, vocab):
        words[f"w{k}"] = k
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)


def make_hf_llama(folder: Path, *, vocab: int = VOCAB, layers: int = 2, hidden: int = 64, heads: int = 4,
                  groups: int = 2, ffn: int = 96, tie: bool = False, rope_theta: float = 5e5,
                  rope_scaling: dict | None = None, max_pos: int = 4096, seed: int = 0,
                  tokenizer: bool = True, bos: int = 1, eos: int | list[int] = 2, **extra):
    """Save a random LlamaForCausalLM (every weight random, norms too) and return it (eval, float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=groups, max_position_embeddings=max_pos,
        rope_theta=rope_theta, rope_scaling=rope_scaling, tie_word_embeddings=tie, rms_norm_eps=1e-5,
        bos_token_id=bos, eos_token_id=eos, torch_dtype="float32", attn_implementation="eager", **extra,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer:
        make_tokenizer(folder, vocab)
    return model


def hf_logprobs(model, tokens: list[int]) -> torch.Tensor:
    """log p(token_j | tokens_<j) for j >= 1 of one document scored alone."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].double()
    lp = torch.log_softmax(logits, dim=-1)
    return lp[:-1].gather(1, torch.tensor(tokens[1:])[:, None])[:, 0]


def megatron_logits(ckpt: Path, tokens: list[int]) -> torch.Tensor:
    """Full forward of the converted checkpoint's Megatron model on one document: [s, vocab] (real vocab)."""
    from megatron_prolong.attention.layout import DocumentLayout
    from megatron_prolong.config import ParallelConfig
    from megatron_prolong.inference import load_model, megatron_session
    from megatron_prolong.model.packed import DocumentPackedSeqParams

    with megatron_session():
        gpt, meta = load_model(ckpt, ParallelConfig())
        s = len(tokens)
        packed = DocumentPackedSeqParams(qkv_format="sbhd", layout=DocumentLayout.single_document(1, s),
                                         positions=torch.arange(s)[:, None])
        with torch.no_grad():
            logits = gpt(torch.tensor([tokens]), None, None, packed_seq_params=packed)
        return logits[0, :, : meta["vocab_size"]].float()


def hf_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out

