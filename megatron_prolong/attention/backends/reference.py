"""``reference``: exact blocked attention in plain PyTorch, any device.

Only the log-sum-exp is kept between passes and the scores are recomputed in the backward, so
memory stays bounded by ``reference_block_elements`` per score block. Math in float32 (float64
for float64 inputs): the float64 oracle tests and the CPU path use it. At CP = 1 one call covers
the documents; under CP the same two entry points serve the square and rectangle calls of
:mod:`..ring`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import AttentionConfig
from ..layout import DocumentLayout
from ..ring import Part, _flat, _unflat
from ..split import CPSplit, pieces


@dataclass(frozen=True)
class ReferencePlan:
    part: Part  # the documents, causal, over the flat local stream
    block_elements: int


class ReferenceBackend:
    name = "reference"

    def __init__(self, block_elements: int = AttentionConfig.reference_block_elements):
        self.block_elements = block_elements

    def plan_key(self, cfg: AttentionConfig) -> tuple:
        return (cfg.reference_block_elements,)

    def plan(self, layout: DocumentLayout, split: CPSplit, rank: int,
             cfg: AttentionConfig) -> ReferencePlan:
        n = tuple(p.q1 - p.q0 for p in pieces(layout, split, rank))
        return ReferencePlan(Part(n, n, n, True), int(cfg.reference_block_elements))

    def run(self, plan: ReferencePlan, q, k, v, scale: float) -> torch.Tensor:
        kernel = ReferenceBackend(plan.block_elements)
        return _ReferenceAttention.apply(q, k, v, plan.part, kernel, scale)

    def for_config(self, cfg: AttentionConfig) -> "ReferenceBackend":
        return ReferenceBackend(int(cfg.reference_block_elements))

    # ------------------------------------------------------------------ partial calls
    def partial_forward(self, part: Part, q, k, v, scale: float):
        cdt = _compute_dtype(q)
        hq, d, hkv = q.shape[1], q.shape[2], k.shape[1]
        g = hq // hkv
        out = torch.zeros(q.shape, dtype=cdt, device=q.device)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=cdt, device=q.device)
        for i0, i1, j0, j1, causal_at in _blocks(part, hq, self.block_elements):
            qb = q[i0:i1].to(cdt).view(i1 - i0, hkv, g, d)
            s_ = torch.einsum("nhgd,lhd->hgnl", qb, k[j0:j1].to(cdt)) * scale
            if causal_at is not None:
                s_ = s_.masked_fill(~_causal(causal_at, i1 - i0, j1 - j0, q.device), float("-inf"))
            m = s_.amax(dim=-1, keepdim=True)
            p = torch.exp(s_ - m)
            l_ = p.sum(dim=-1, keepdim=True)
            out[i0:i1] = torch.einsum("hgnl,lhd->nhgd", p / l_, v[j0:j1].to(cdt)).reshape(i1 - i0, hq, d)
            lse[i0:i1] = (m + torch.log(l_)).squeeze(-1).permute(2, 0, 1).reshape(i1 - i0, hq)
        return out.to(q.dtype), lse

    def partial_backward(self, part: Part, q, k, v, o, lse, do, scale: float):
        cdt = _compute_dtype(q)
        hq, d, hkv = q.shape[1], q.shape[2], k.shape[1]
        g = hq // hkv
        delta = (do.to(cdt) * o.to(cdt)).sum(-1)  # [T, hq]
        dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
        dk = torch.zeros(k.shape, dtype=cdt, device=k.device)
        dv = torch.zeros(v.shape, dtype=cdt, device=v.device)
        for i0, i1, j0, j1, causal_at in _blocks(part, hq, self.block_elements):
            n = i1 - i0
            qb = q[i0:i1].to(cdt).view(n, hkv, g, d)
            kb, vb = k[j0:j1].to(cdt), v[j0:j1].to(cdt)
            dob = do[i0:i1].to(cdt).view(n, hkv, g, d)
            s_ = torch.einsum("nhgd,lhd->hgnl", qb, kb) * scale
            if causal_at is not None:
                s_ = s_.masked_fill(~_causal(causal_at, n, j1 - j0, q.device), float("-inf"))
            lb = lse[i0:i1].to(cdt).view(n, hkv, g).permute(1, 2, 0).unsqueeze(-1)
            p = torch.exp(s_ - lb)
            dv[j0:j1] += torch.einsum("hgnl,nhgd->lhd", p, dob)
            dp = torch.einsum("nhgd,lhd->hgnl", dob, vb)
            db = delta[i0:i1].view(n, hkv, g).permute(1, 2, 0).unsqueeze(-1)
            ds = p * (dp - db) * scale
            dq[i0:i1] = torch.einsum("hgnl,lhd->nhgd", ds, kb).reshape(n, hq, d)
            dk[j0:j1] += torch.einsum("hgnl,nhgd->lhd", ds, qb)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _ReferenceAttention(torch.autograd.Function):
    """CP = 1 (or one rank against the gathered keys at CP = 1): the documents in one call."""

    @staticmethod
    def forward(ctx, q, k, v, part, kernel, scale):
        qf, kf, vf = _flat(q), _flat(k), _flat(v)
        o, lse = kernel.partial_forward(part, qf, kf, vf, scale)
        ctx.save_for_backward(qf, kf, vf, o, lse)
        ctx.part, ctx.kernel, ctx.scale, ctx.b = part, kernel, scale, q.shape[1]
        return _unflat(o, ctx.b)

    @staticmethod
    def backward(ctx, do):
        qf, kf, vf, o, lse = ctx.saved_tensors
        grads = ctx.kernel.partial_backward(ctx.part, qf, kf, vf, o, lse, _flat(do), ctx.scale)
        return tuple(_unflat(x, ctx.b) for x in grads) + (None, None, None)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _causal(first: int, n: int, length: int, device) -> torch.Tensor:
    """Queries ``first .. first + n - 1`` of a causal square of ``length`` keys: key j is
    visible to query i iff j <= i."""
    qpos = torch.arange(first, first + n, device=device)
    return torch.arange(length, device=device)[None, :] <= qpos[:, None]  # [n, L]


def _blocks(part: Part, hq: int, block_elements: int):
    """Each sequence's queries cut into blocks whose score tensor stays within the element
    budget. Yields (q start, q end, k start, k end, causal offset of the first query or None);
    for a causal block only the keys up to its last query are visited."""
    q_at = k_at = 0
    for nq, nk, span in zip(part.q_lengths, part.k_lengths, part.q_spans):
        rows = max(1, block_elements // max(1, nk * hq))
        for i0 in range(0, nq, rows):
            i1 = min(i0 + rows, nq)
            k_end = i1 if part.causal else nk
            yield q_at + i0, q_at + i1, k_at, k_at + k_end, (i0 if part.causal else None)
        q_at += span
        k_at += nk
