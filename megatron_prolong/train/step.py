"""One micro-batch: move it to the device, take this CP rank's share, run the model, sum the loss."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from megatron_prolong.attention.context_parallel import zigzag_indices
from megatron_prolong.attention.layout import DocumentLayout
from megatron_prolong.model.packed import DocumentPackedSeqParams, rope_positions


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [b, s_local]
    labels: torch.Tensor
    loss_mask: torch.Tensor
    domain: torch.Tensor  # [b]
    packed: DocumentPackedSeqParams


def prepare_micro_batch(
    mb: dict[str, torch.Tensor], *, rope_mode: str, cp_size: int, cp_rank: int, device: torch.device
) -> MicroBatch:
    tokens = mb["tokens"].to(device, non_blocking=True)
    cu = mb["cu_seqlens"].to(device, non_blocking=True)
    seq_len = tokens.shape[1]
    layout = DocumentLayout.from_cu_seqlens(cu, seq_len)
    positions = rope_positions(cu, seq_len, rope_mode)
    labels = mb["labels"].to(device, non_blocking=True)
    loss_mask = mb["loss_mask"].to(device, non_blocking=True)
    if cp_size > 1:
        idx = zigzag_indices(seq_len, cp_size, cp_rank, device=device)
        tokens, labels, loss_mask, positions = (t[:, idx] for t in (tokens, labels, loss_mask, positions))
    packed = DocumentPackedSeqParams(qkv_format="sbhd", layout=layout, positions=positions.t().contiguous())
    return MicroBatch(tokens, labels, loss_mask, mb["domain"], packed)


@dataclass
class LossStats:
    """Per-sample sums of one micro-batch, for the step's loss and the per-domain metrics."""

    loss_sum: torch.Tensor  # [b]
    tokens: torch.Tensor  # [b]
    domain: torch.Tensor  # [b]


def _loss_func(mb: MicroBatch, output: torch.Tensor):
    per_sample = (output.float() * mb.loss_mask).sum(dim=1)
    count = mb.loss_mask.sum(dim=1)
    loss = per_sample.sum()
    stats = LossStats(per_sample.detach(), count.detach(), mb.domain)
    # Megatron's per-token mode: sum here, divide by the global token count in finalize_model_grads.
    return loss, count.sum().to(torch.int), {"stats": stats}


def forward_step(data_iterator, model, output_processor=None):
    """Megatron's forward_step_func (bind ``output_processor`` with functools.partial)."""
    mb: MicroBatch = next(data_iterator)
    output = model(mb.tokens, None, None, labels=mb.labels, packed_seq_params=mb.packed,
                   output_processor=output_processor)
    return output, partial(_loss_func, mb)
