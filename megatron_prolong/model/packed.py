"""What one micro-batch tells the attention layers: document layout and RoPE positions."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_prolong.attention.layout import DocumentLayout
from megatron_prolong.attention.split import CPSplit


@dataclass
class DocumentPackedSeqParams(PackedSeqParams):
    """Rides through Megatron's ``packed_seq_params`` argument to the plugin's core attention.

    ``qkv_format='sbhd'`` keeps Megatron's own THD handling (and THD RoPE) out of the way.
    ``positions`` are the RoPE positions of this rank's tokens, [s_local, b]; ``split`` says
    which tokens each CP rank holds (None: zigzag).
    """

    layout: DocumentLayout | None = None
    positions: torch.Tensor | None = None
    split: CPSplit | None = None
    _rope_cache: dict = field(default_factory=dict, repr=False)

    def rope_emb(self, inv_freq: torch.Tensor, interpolation_factor: float | None) -> torch.Tensor:
        """[s_local, b, 1, dim] rotary angles, computed once per micro-batch for all layers."""
        key = (inv_freq.data_ptr(), interpolation_factor)
        if key not in self._rope_cache:
            pos = self.positions.to(device=inv_freq.device, dtype=torch.float32)
            if interpolation_factor is not None:
                pos = pos / interpolation_factor
            freqs = pos[..., None] * inv_freq
            self._rope_cache[key] = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        return self._rope_cache[key]


def rope_positions(layout: DocumentLayout, mode: str) -> torch.Tensor:
    """Full-sequence RoPE positions [b, s]: running across the pack, or restarting per document."""
    pos = torch.arange(layout.seq_len, device=layout.device).expand(layout.batch, layout.seq_len)
    return pos if mode == "continuous" else pos - layout.doc_start()
