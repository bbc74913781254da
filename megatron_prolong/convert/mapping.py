"""Declarative parameter mapping between Megatron-Core's GPTModel and Hugging Face Llama.

One table, read in both directions (Megatron-Bridge style). Each entry names

- ``param``: the GPTModel parameter (``{i}`` is the layer index), the converters' canonical name;
- ``ckpt_key``: the key of that tensor in a Megatron distributed checkpoint, where the layers of
  a block are stacked on a leading axis and the norms carry Transformer Engine's names (Megatron's
  local spec maps them so that both specs share one checkpoint format);
- ``hf``: the Hugging Face tensor name(s) it is made from;
- ``transform``: a named transform with a ``to_mcore`` and a ``to_hf`` direction.

Canonical tensors are full (TP=1) and vocabulary tensors carry exactly ``vocab_size`` rows; the
Megatron writer pads them to the padded vocabulary and the readers slice the padding off.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from megatron_prolong.config import ModelConfig
from megatron_prolong.inference import CheckpointError


# Input that cannot be converted is the same error as a checkpoint that cannot be loaded.
ConversionError = CheckpointError


@dataclass(frozen=True)
class Shapes:
    """What the fused transforms need to know about the model."""

    hidden: int
    heads: int
    groups: int
    head_dim: int
    ffn: int
    vocab: int

    @classmethod
    def of(cls, model: ModelConfig, vocab_size: int) -> "Shapes":
        return cls(model.hidden_size, model.num_attention_heads, model.num_query_groups,
                   model.hidden_size // model.num_attention_heads, model.ffn_hidden_size, vocab_size)


# ---------------------------------------------------------------------------- transforms
def _copy_to_mcore(ts: list[torch.Tensor], s: Shapes) -> torch.Tensor:
    return ts[0]


def _copy_to_hf(t: torch.Tensor, s: Shapes) -> list[torch.Tensor]:
    return [t]


def _qkv_to_mcore(ts: list[torch.Tensor], s: Shapes) -> torch.Tensor:
    """q [hq*d, h], k [ng*d, h], v [ng*d, h] -> Megatron's per-group [ng*(hq/ng+2)*d, h]."""
    q, k, v = ts
    per = s.heads // s.groups
    q = q.reshape(s.groups, per * s.head_dim, -1)
    k = k.reshape(s.groups, s.head_dim, -1)
    v = v.reshape(s.groups, s.head_dim, -1)
    return torch.cat([q, k, v], dim=1).reshape(s.groups * (per + 2) * s.head_dim, -1)


def _qkv_to_hf(t: torch.Tensor, s: Shapes) -> list[torch.Tensor]:
    per = s.heads // s.groups
    g = t.reshape(s.groups, (per + 2) * s.head_dim, -1)
    q, k, v = torch.split(g, [per * s.head_dim, s.head_dim, s.head_dim], dim=1)
    h = t.shape[-1]
    return [q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)]


def _gate_up_to_mcore(ts: list[torch.Tensor], s: Shapes) -> torch.Tensor:
    return torch.cat(ts, dim=0)


def _gate_up_to_hf(t: torch.Tensor, s: Shapes) -> list[torch.Tensor]:
    gate, up = torch.split(t, [s.ffn, s.ffn], dim=0)
    return [gate, up]


@dataclass(frozen=True)
class Transform:
    name: str
    to_mcore: Callable[[list[torch.Tensor], Shapes], torch.Tensor]
    to_hf: Callable[[torch.Tensor, Shapes], list[torch.Tensor]]


COPY = Transform("copy", _copy_to_mcore, _copy_to_hf)
QKV = Transform("qkv", _qkv_to_mcore, _qkv_to_hf)
GATE_UP = Transform("gate_up", _gate_up_to_mcore, _gate_up_to_hf)


@dataclass(frozen=True)
class Entry:
    param: str
    ckpt_key: str
    hf: tuple[str, ...]
    transform: Transform = COPY
    per_layer: bool = False
    vocab: bool = False  # rows are the vocabulary (padded in Megatron)
    untied_only: bool = False  # present only when embeddings are untied


LLAMA: tuple[Entry, ...] = (
    Entry("embedding.word_embeddings.weight", "embedding.word_embeddings.weight",
          ("model.embed_tokens.weight",), vocab=True),
    Entry("decoder.layers.{i}.input_layernorm.weight", "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
          ("model.layers.{i}.input_layernorm.weight",), per_layer=True),
    Entry("decoder.layers.{i}.self_attention.linear_qkv.weight", "decoder.layers.self_attention.linear_qkv.weight",
          ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
           "model.layers.{i}.self_attn.v_proj.weight"), QKV, per_layer=True),
    Entry("decoder.layers.{i}.self_attention.linear_proj.weight", "decoder.layers.self_attention.linear_proj.weight",
          ("model.layers.{i}.self_attn.o_proj.weight",), per_layer=True),
    Entry("decoder.layers.{i}.pre_mlp_layernorm.weight", "decoder.layers.mlp.linear_fc1.layer_norm_weight",
          ("model.layers.{i}.post_attention_layernorm.weight",), per_layer=True),
    Entry("decoder.layers.{i}.mlp.linear_fc1.weight", "decoder.layers.mlp.linear_fc1.weight",
          ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"), GATE_UP,
          per_layer=True),
    Entry("decoder.layers.{i}.mlp.linear_fc2.weight", "decoder.layers.mlp.linear_fc2.weight",
          ("model.layers.{i}.mlp.down_proj.weight",), per_layer=True),
    Entry("decoder.final_layernorm.weight", "decoder.final_layernorm.weight", ("model.norm.weight",)),
    Entry("output_layer.weight", "output_layer.weight", ("lm_head.weight",), vocab=True, untied_only=True),
)

# Older/local-spec spellings of per-layer keys in unstacked state dicts (NeMo 1 .ckpt files).
PARAM_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def entries(model: ModelConfig) -> list[Entry]:
    return [e for e in LLAMA if not (e.untied_only and not model.untie_embeddings)]


def expand(model: ModelConfig) -> Iterator[tuple[Entry, int | None]]:
    """Every (entry, layer) pair in the order a streaming converter visits them: layer by layer."""
    es = entries(model)
    for e in es:
        if not e.per_layer and e.param.startswith("embedding"):
            yield e, None
    for i in range(model.num_layers):
        for e in es:
            if e.per_layer:
                yield e, i
    for e in es:
        if not e.per_layer and not e.param.startswith("embedding"):
            yield e, None


def fmt(name: str, layer: int | None) -> str:
    return name.format(i=layer) if layer is not None else name


def param_names(model: ModelConfig) -> list[str]:
    return [fmt(e.param, i) for e, i in expand(model)]


def expected_shape(entry: Entry, s: Shapes) -> tuple[int, ...]:
    """Canonical (TP=1, unpadded vocabulary) shape of one Megatron tensor."""
    qkv_rows = (s.heads + 2 * s.groups) * s.head_dim
    return {
        "embedding.word_embeddings.weight": (s.vocab, s.hidden),
        "decoder.layers.{i}.input_layernorm.weight": (s.hidden,),
        "decoder.layers.{i}.self_attention.linear_qkv.weight": (qkv_rows, s.hidden),
        "decoder.layers.{i}.self_attention.linear_proj.weight": (s.hidden, s.heads * s.head_dim),
        "decoder.layers.{i}.pre_mlp_layernorm.weight": (s.hidden,),
        "decoder.layers.{i}.mlp.linear_fc1.weight": (2 * s.ffn, s.hidden),
        "decoder.layers.{i}.mlp.linear_fc2.weight": (s.hidden, s.ffn),
        "decoder.final_layernorm.weight": (s.hidden,),
        "output_layer.weight": (s.vocab, s.hidden),
    }[entry.param]


_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def canonical_param(name: str) -> str:
    """A per-layer state-dict key in any known spelling -> the GPTModel parameter name."""
    m = _LAYER_RE.match(name)
    if m and m.group(2) in PARAM_ALIASES:
        return f"decoder.layers.{m.group(1)}.{PARAM_ALIASES[m.group(2)]}"
    return name
