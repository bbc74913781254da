"""``flex``: ``flex_attention`` with a document block mask built exactly from the boundaries
(full blocks skip the mask function), compiled once per process. ``auto`` uses it on GPUs for
float32 multi-document rows (the fused packed kernels take 16-bit inputs only) and where
cudnn-frontend is missing.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..config import AttentionConfig
from ..layout import DocumentLayout
from ..split import CPSplit


@dataclass(frozen=True)
class FlexPlan:
    block_mask: Any  # torch.nn.attention.flex_attention.BlockMask


class FlexBackend:
    name = "flex"

    def plan_key(self, cfg: AttentionConfig) -> tuple:
        return (cfg.flex_block_size,)

    def plan(self, layout: DocumentLayout, split: CPSplit, rank: int, cfg: AttentionConfig) -> FlexPlan:
        bs = int(cfg.flex_block_size)
        return FlexPlan(block_mask(layout, split, rank, (bs, bs)))

    def run(self, plan: FlexPlan, q, k, v, scale: float) -> torch.Tensor:
        out = _flex_fn(q.device)(
            q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3),
            block_mask=plan.block_mask, scale=scale, enable_gqa=q.shape[2] != k.shape[2],
        )
        return out.permute(2, 0, 1, 3)


_COMPILED: Callable | None = None


def _flex_fn(device: torch.device) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        # eager (math) path, forward only on CPU: fine for small checks
        def eager(*args, **kwargs):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
                return flex_attention(*args, **kwargs)

        return eager
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(flex_attention, dynamic=False)
    return _COMPILED


def block_mask(layout: DocumentLayout, split: CPSplit, rank: int, block_size: tuple[int, int]):
    """The BlockMask of this rank's queries (global positions) vs all keys.

    Built from the boundaries, not by evaluating the mask function densely: for a query block
    and a key block ``[kl, kr]``, with each query ``i`` seeing the interval ``[lo_i, hi_i]``
    (its document start and itself), the block is non-empty iff some query has
    ``lo_i <= kr and hi_i >= kl``, and full iff every query has ``lo_i <= kl and hi_i >= kr``.
    """
    from torch.nn.attention.flex_attention import BlockMask

    bq, bk = block_size
    dev = layout.device
    b, s = layout.batch, layout.seq_len
    qpos = split.indices(rank, dev)  # [b, s_local]
    s_local = qpos.shape[1]
    lo = torch.gather(layout.doc_start(), 1, qpos)  # [b, s_local]
    nq, nk = -(-s_local // bq), -(-s // bk)
    pad = nq * bq - s_local
    big = torch.iinfo(torch.int64).max // 4
    # padded query rows see nothing (lo beyond every key, hi before every key)
    q_lo = F.pad(lo, (0, pad), value=big)
    q_hi = F.pad(qpos, (0, pad), value=-1)

    def mask_mod(bi, hi, q_idx, kv_idx):
        return (kv_idx >= q_lo[bi, q_idx]) & (kv_idx <= q_hi[bi, q_idx])

    kl = torch.arange(nk, device=dev) * bk
    kr = torch.clamp(kl + bk - 1, max=s - 1)
    k_complete = (kl + bk) <= s  # key block has no padding
    lo_b, hi_b = q_lo.view(b, nq, bq), q_hi.view(b, nq, bq)
    any_blocks, all_blocks = [], []
    step = max(1, (1 << 26) // max(1, bq * nk * b))
    for i in range(0, nq, step):
        j = min(nq, i + step)
        la, ha = lo_b[:, i:j, :, None], hi_b[:, i:j, :, None]
        any_blocks.append(((la <= kr) & (ha >= kl)).any(dim=2))
        # a query block with padding rows is never "full" (as create_block_mask does)
        all_blocks.append(((la <= kl) & (ha >= kr)).all(dim=2))
    nonempty = torch.cat(any_blocks, dim=1)  # [b, nq, nk]
    full = torch.cat(all_blocks, dim=1) & k_complete & nonempty  # padded key blocks: partial
    partial = nonempty & ~full

    def ordered(dense):
        num = dense.sum(dim=-1, dtype=torch.int32)
        idx = torch.argsort(~dense, dim=-1, stable=True).to(torch.int32)
        return num[:, None], idx[:, None]

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(bq, bk), mask_mod=mask_mod,
        seq_lengths=(s_local, s),
    )
