"""One micro-batch: move it to the device, take this CP rank's share, run the model, sum the loss.

Two layouts of the same loader batch: the plugin's (rows of ``s`` tokens, document boundaries in
a ``DocumentLayout``, the CP split of ``model.attention.cp_split``: work-balanced by default) and Transformer Engine's THD (rows
concatenated into one packed stream, every document padded to a multiple of 2 x CP, TE's
per-document CP split). Padding carries no loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_prolong.attention.config import AttentionConfig
from megatron_prolong.attention.layout import DocumentLayout
from megatron_prolong.attention.split import split_for
from megatron_prolong.te.thd import te_thd_packing
from megatron_prolong.model.packed import DocumentPackedSeqParams, rope_positions


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [b, s_local] (plugin) or [1, t_local] (TE THD)
    labels: torch.Tensor
    loss_mask: torch.Tensor
    sample_ids: torch.Tensor  # which loader row each token comes from (same shape as tokens)
    domain: torch.Tensor  # [rows]
    packed: PackedSeqParams


def prepare_micro_batch(
    mb: dict[str, torch.Tensor], *, rope_mode: str, cp_size: int, cp_rank: int, device: torch.device,
    attention: AttentionConfig | None = None,
) -> MicroBatch:
    """The plugin backend's layout; under CP this rank's tokens, labels, loss mask and positions
    as the CP split assigns them (the attention layers read the same split)."""
    attention = attention or AttentionConfig()
    tokens = mb["tokens"].to(device, non_blocking=True)
    cu = mb["cu_seqlens"].to(device, non_blocking=True)
    b, seq_len = tokens.shape
    layout = DocumentLayout.from_cu_seqlens(cu, seq_len)
    positions = rope_positions(layout, rope_mode)
    labels = mb["labels"].to(device, non_blocking=True)
    loss_mask = mb["loss_mask"].to(device, non_blocking=True)
    split = None
    if cp_size > 1:
        split = split_for(layout, cp_size, attention.cp_split,
                          balance_bound=attention.cp_balance_bound,
                          min_chunk=attention.cp_min_chunk,
                          work_fraction=attention.cp_split_work_fraction)
        tokens, labels, loss_mask, positions = (split.shard(t, cp_rank) for t in (tokens, labels, loss_mask, positions))
    sample_ids = torch.arange(b, device=device)[:, None].expand_as(tokens)
    packed = DocumentPackedSeqParams(qkv_format="sbhd", layout=layout, positions=positions.t().contiguous(),
                                     split=split)
    return MicroBatch(tokens, labels, loss_mask, sample_ids, mb["domain"], packed)


def prepare_te_micro_batch(
    mb: dict[str, torch.Tensor], *, cp_size: int, cp_rank: int, device: torch.device
) -> MicroBatch:
    """Transformer Engine's THD layout (``model.attention_backend=te``)."""
    b, seq_len = mb["tokens"].shape
    packing = te_thd_packing(list(mb["cu_seqlens"]), cp_size)
    rows = torch.arange(b)[:, None].expand(b, seq_len)
    fields = [packing.pack(mb[k].reshape(-1)) for k in ("tokens", "labels")]
    fields.append(packing.pack(mb["loss_mask"].reshape(-1), pad_value=0.0))
    fields.append(packing.pack(rows.reshape(-1)))
    if cp_size > 1:
        fields = [packing.shard(f, cp_rank) for f in fields]
    tokens, labels, loss_mask, sample_ids = (f[None].to(device, non_blocking=True) for f in fields)
    cu = packing.cu_seqlens.to(device)
    cu_padded = packing.cu_seqlens_padded.to(device)
    packed = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_padded,
        cu_seqlens_kv_padded=cu_padded, max_seqlen_q=packing.max_seqlen_padded,
        max_seqlen_kv=packing.max_seqlen_padded,
    )
    return MicroBatch(tokens, labels, loss_mask, sample_ids, mb["domain"], packed)


@dataclass
class LossStats:
    """Per-sample sums of one micro-batch, for the step's loss and the per-domain metrics."""

    loss_sum: torch.Tensor  # [rows]
    tokens: torch.Tensor  # [rows]
    domain: torch.Tensor  # [rows]


def _loss_func(mb: MicroBatch, output: torch.Tensor):
    masked = output.float() * mb.loss_mask
    rows = mb.domain.numel()
    ids = mb.sample_ids.reshape(-1)
    per_sample = torch.zeros(rows, device=masked.device).index_add_(0, ids, masked.detach().reshape(-1))
    count = torch.zeros(rows, device=masked.device).index_add_(0, ids, mb.loss_mask.reshape(-1).float())
    stats = LossStats(per_sample, count, mb.domain)
    # Megatron's per-token mode: sum here, divide by the global token count in finalize_model_grads.
    return masked.sum(), count.sum().to(torch.int), {"stats": stats}


def forward_step(data_iterator, model, output_processor=None):
    """Megatron's forward_step_func (bind ``output_processor`` with functools.partial)."""
    mb: MicroBatch = next(data_iterator)
    output = model(mb.tokens, None, None, labels=mb.labels, packed_seq_params=mb.packed,
                   output_processor=output_processor)
    return output, partial(_loss_func, mb)
