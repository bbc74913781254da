"""The plugin's core attention for Megatron's layer spec: RoPE + document-masked attention with CP."""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from megatron_prolong.attention.dispatch import document_attention
from megatron_prolong.model.packed import DocumentPackedSeqParams
from megatron_prolong.model.rope import RopeAngles, apply_rope


class DocumentCoreAttention(MegatronModule):
    """Causal attention restricted to documents, for any context-parallel size.

    RoPE is applied here rather than by Megatron because the positions come from the document
    layout (continuous or per-document) and must be those of the tokens this CP rank holds.
    ``rope`` computes the angles once per micro-batch for all layers of the model (one object
    shared by every layer).
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        *,
        rope: RopeAngles,
    ) -> None:
        super().__init__(config=config)
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.cp_group = (
            pg_collection.cp if pg_collection is not None else parallel_state.get_context_parallel_group()
        )
        self.attention = config.attention
        self.rope = rope
        self.rope_kernel = getattr(config, "rope_kernel", "torch")

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: DocumentPackedSeqParams | None = None,
    ) -> torch.Tensor:
        if not isinstance(packed_seq_params, DocumentPackedSeqParams):
            raise TypeError(
                "DocumentCoreAttention needs DocumentPackedSeqParams (document layout and positions) "
                "from megatron_prolong.model.packed; got " + type(packed_seq_params).__name__
            )
        emb = self.rope(packed_seq_params.positions, query.device)
        query, key = apply_rope(query, key, emb, self.rope_kernel)
        cache = getattr(packed_seq_params, "kv_cache", None)  # generation (megatron_prolong.eval.kv_cache)
        if cache is not None and cache.decoding:
            return cache.decode(self.layer_number, query, key, value, self.softmax_scale)
        if value.untyped_storage().nbytes() > value.numel() * value.element_size():
            # V is a view of the fused QKV output; a kernel that saves it for backward would keep
            # that whole output (6x V for Llama-3's 32/8 heads) alive next to the rotated q and k
            value = value.contiguous()
        cp_group = self.cp_group if self.cp_group is not None and self.cp_group.size() > 1 else None
        out = document_attention(
            query, key, value, packed_seq_params.layout,
            cp_group=cp_group, split=packed_seq_params.split, config=self.attention,
            softmax_scale=self.softmax_scale,
        )
        if cache is not None:
            cache.store(self.layer_number, key, value)
        return out
