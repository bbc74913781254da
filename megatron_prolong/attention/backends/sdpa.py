"""``sdpa``: ``F.scaled_dot_product_attention``, one causal call per piece (GQA through
``enable_gqa``); rows that are one document each take one batched call per query run.

Pieces whose keys start before their queries (CP) use a lower-right causal mask, which SDPA
serves only through FlashAttention-2. ``auto`` picks this backend for single-document rows at
CP = 1 (one cuDNN call per run).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import AttentionConfig
from ..layout import DocumentLayout
from ..split import CPSplit, Piece, pieces

#: SDPA kernels in priority order on CUDA. cuDNN first, stated rather than left to PyTorch:
#: once Transformer Engine is imported PyTorch's default falls to FlashAttention-2, which is
#: much slower on H100 (docs/benchmarks.md)
PRIORITY = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


@dataclass(frozen=True)
class SdpaPlan:
    pieces: tuple[Piece, ...]
    #: every row one document, split alike: (local start, local end, global start) runs
    batched_runs: tuple[tuple[int, int, int], ...] | None
    #: per row, the piece lengths (queries) when the pieces tile the keys too (CP = 1)
    split_sizes: tuple[tuple[int, ...], ...] | None


class SdpaBackend:
    name = "sdpa"

    def plan_key(self, cfg: AttentionConfig) -> tuple:
        return ()

    def plan(self, layout: DocumentLayout, split: CPSplit, rank: int, cfg: AttentionConfig) -> SdpaPlan:
        ps = pieces(layout, split, rank)
        batched = None
        if layout.is_single_document() and split.uniform:
            batched = tuple(split.segments(rank, 0))
        sizes = None
        if split.cp_size == 1:
            sizes = tuple(tuple(p.q1 - p.q0 for p in ps if p.row == r) for r in range(layout.batch))
        return SdpaPlan(ps, batched, sizes)

    def run(self, plan: SdpaPlan, q, k, v, scale: float) -> torch.Tensor:
        if plan.batched_runs is not None:
            outs = []
            for ls, le, gs in plan.batched_runs:
                ge = gs + (le - ls)
                o = attend_piece(q[ls:le].permute(1, 2, 0, 3), k[:ge].permute(1, 2, 0, 3),
                                 v[:ge].permute(1, 2, 0, 3), scale)
                outs.append(o.permute(2, 0, 1, 3))
            return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        b = q.shape[1]
        if plan.split_sizes is not None:
            # CP = 1: torch.split views per document (one split and one cat in the autograd
            # graph instead of a full-size zero-filled gradient per slice)
            rows = []
            for r in range(b):
                parts = zip(*(torch.split(t[:, r], plan.split_sizes[r]) for t in (q, k, v)))
                rows.append(torch.cat([_one(qp, kp, vp, scale) for qp, kp, vp in parts]))
            return torch.stack(rows, dim=1)
        rows = [[] for _ in range(b)]
        for row, q0, q1, k0, k1 in plan.pieces:
            rows[row].append(_one(q[q0:q1, row], k[k0:k1, row], v[k0:k1, row], scale))
        return torch.stack([torch.cat(r) for r in rows], dim=1)


def _one(qp, kp, vp, scale):
    """[n, h, d] tensors -> [n, hq, d]."""
    o = attend_piece(*(t.transpose(0, 1).unsqueeze(0) for t in (qp, kp, vp)), scale)
    return o[0].transpose(0, 1)


def attend_piece(qp: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, scale: float) -> torch.Tensor:
    """qp ``[b, hq, n, d]``, kp/vp ``[b, hkv, L, d]`` (``n <= L``): causal attention aligned
    bottom-right (query i sees keys ``<= L - n + i``). Also the decode step of a KV cache:
    ``n`` new tokens against the cache plus themselves."""
    if qp.device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([getattr(SDPBackend, n) for n in PRIORITY], set_priority=True):
            return _call(qp, kp, vp, scale)
    return _call(qp, kp, vp, scale)


def _call(qp, kp, vp, scale):
    n, L = qp.shape[2], kp.shape[2]
    gqa = qp.shape[1] != kp.shape[1]
    if n == L:
        return F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=gqa)
    from torch.nn.attention.bias import causal_lower_right

    return F.scaled_dot_product_attention(
        qp, kp, vp, attn_mask=causal_lower_right(n, L), scale=scale, enable_gqa=gqa)
