"""What one micro-batch tells the attention layers: document layout and RoPE positions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_prolong.attention.layout import DocumentLayout
from megatron_prolong.attention.split import CPSplit


@dataclass
class DocumentPackedSeqParams(PackedSeqParams):
    """Rides through Megatron's ``packed_seq_params`` argument to the plugin's core attention.

    ``qkv_format='sbhd'`` keeps Megatron's own THD handling (and THD RoPE) out of the way.
    ``positions`` are the RoPE positions of this rank's tokens, [s_local, b]; ``split`` says
    which tokens each CP rank holds (None: zigzag). ``positions`` is never changed in place: the
    model's RoPE angles are cached per positions tensor (:class:`~megatron_prolong.model.rope.RopeAngles`).
    """

    layout: DocumentLayout | None = None
    positions: torch.Tensor | None = None
    split: CPSplit | None = None


def rope_positions(layout: DocumentLayout, mode: str) -> torch.Tensor:
    """Full-sequence RoPE positions [b, s]: running across the pack, or restarting per document."""
    pos = torch.arange(layout.seq_len, device=layout.device).expand(layout.batch, layout.seq_len)
    return pos if mode == "continuous" else pos - layout.doc_start()
