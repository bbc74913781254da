"""``reference``: exact blocked attention in plain PyTorch, any device.

A custom autograd function keeps only the log-sum-exp between passes and recomputes the scores
in the backward, so memory stays bounded by ``reference_block_elements`` per score block. Math
in float32 (float64 for float64 inputs): the float64 oracle tests and the CPU path use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import AttentionConfig
from ..layout import DocumentLayout
from ..split import CPSplit, Piece, pieces


@dataclass(frozen=True)
class ReferencePlan:
    pieces: tuple[Piece, ...]
    block_elements: int


class ReferenceBackend:
    name = "reference"

    def plan_key(self, cfg: AttentionConfig) -> tuple:
        return (cfg.reference_block_elements,)

    def plan(self, layout: DocumentLayout, split: CPSplit, rank: int,
             cfg: AttentionConfig) -> ReferencePlan:
        return ReferencePlan(pieces(layout, split, rank), int(cfg.reference_block_elements))

    def run(self, plan: ReferencePlan, q, k, v, scale: float) -> torch.Tensor:
        return _ReferenceAttention.apply(q, k, v, plan, scale)


class _ReferenceAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, scale):
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        s_local, b, hq, d = q.shape
        hkv = k.shape[2]
        g = hq // hkv
        out = torch.zeros(s_local, b, hq, d, dtype=cdt, device=q.device)
        lse = torch.zeros(s_local, b, hq, dtype=cdt, device=q.device)
        for row, i0, i1, j0, j1, qg0 in _blocks(plan, hq):
            qb = q[i0:i1, row].to(cdt).view(i1 - i0, hkv, g, d)
            kb = k[j0:j1, row].to(cdt)
            vb = v[j0:j1, row].to(cdt)
            s_ = torch.einsum("nhgd,lhd->hgnl", qb, kb) * scale
            s_ = s_.masked_fill(~_causal(qg0, i1 - i0, j0, j1, q.device), float("-inf"))
            m = s_.amax(dim=-1, keepdim=True)
            p = torch.exp(s_ - m)
            l_ = p.sum(dim=-1, keepdim=True)
            o = torch.einsum("hgnl,lhd->nhgd", p / l_, vb)
            out[i0:i1, row] = o.reshape(i1 - i0, hq, d)
            lse[i0:i1, row] = (m + torch.log(l_)).squeeze(-1).permute(2, 0, 1).reshape(i1 - i0, hq)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale = plan, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        scale = ctx.scale
        cdt = out.dtype
        s_local, b, hq, d = q.shape
        hkv = k.shape[2]
        g = hq // hkv
        dout = dout.to(cdt)
        delta = (dout * out).sum(-1)  # [s_local, b, hq]
        dq = torch.zeros_like(out)
        dk = torch.zeros(k.shape, dtype=cdt, device=k.device)
        dv = torch.zeros(v.shape, dtype=cdt, device=v.device)
        for row, i0, i1, j0, j1, qg0 in _blocks(ctx.plan, hq):
            n = i1 - i0
            qb = q[i0:i1, row].to(cdt).view(n, hkv, g, d)
            kb = k[j0:j1, row].to(cdt)
            vb = v[j0:j1, row].to(cdt)
            dob = dout[i0:i1, row].view(n, hkv, g, d)
            s_ = torch.einsum("nhgd,lhd->hgnl", qb, kb) * scale
            s_ = s_.masked_fill(~_causal(qg0, n, j0, j1, q.device), float("-inf"))
            lb = lse[i0:i1, row].view(n, hkv, g).permute(1, 2, 0).unsqueeze(-1)
            p = torch.exp(s_ - lb)
            dv[j0:j1, row] += torch.einsum("hgnl,nhgd->lhd", p, dob)
            dp = torch.einsum("nhgd,lhd->hgnl", dob, vb)
            db = delta[i0:i1, row].view(n, hkv, g).permute(1, 2, 0).unsqueeze(-1)
            ds = p * (dp - db) * scale
            dq[i0:i1, row] = torch.einsum("hgnl,lhd->nhgd", ds, kb).reshape(n, hq, d)
            dk[j0:j1, row] += torch.einsum("hgnl,nhgd->lhd", ds, qb)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def _causal(qg0: int, n: int, j0: int, j1: int, device) -> torch.Tensor:
    qpos = torch.arange(qg0, qg0 + n, device=device)
    kpos = torch.arange(j0, j1, device=device)
    return kpos[None, :] <= qpos[:, None]  # [n, L]


def _blocks(plan: ReferencePlan, hq: int):
    """Pieces cut into query blocks whose score tensor stays within the element budget.
    Yields (row, local q start, local q end, key start, key end, global q start)."""
    for row, lq0, lq1, k0, k1 in plan.pieces:
        qg_first = k1 - (lq1 - lq0)
        n_max = max(1, plan.block_elements // max(1, (k1 - k0) * hq))
        for i0 in range(lq0, lq1, n_max):
            i1 = min(i0 + n_max, lq1)
            qg0 = qg_first + (i0 - lq0)
            yield row, i0, i1, k0, qg0 + (i1 - i0), qg0
