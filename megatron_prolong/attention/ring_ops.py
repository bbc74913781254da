"""The elementwise steps of :mod:`.ring`: merging two partial attentions by log-sum-exp, adding
the rectangle's dQ rows, and summing dK/dV contributions into the gathered stream.

Each runs over the rows that need it only (one Triton pass on CUDA; plain PyTorch elsewhere),
so that a rank whose pieces are mostly whole documents pays for its few rectangles only. The
sum is a gather (each destination row reads its up to ``M`` sources and is written once, zeros
where it has none): no atomics, no separate zero fill of the gathered-size buffer.
"""

from __future__ import annotations

import importlib.util

import torch

_TRITON = importlib.util.find_spec("triton") is not None

if _TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _merge_kernel(o_ptr, lse_ptr, or_ptr, lser_ptr, rows_ptr, heads,
                      D: tl.constexpr, BLOCK_H: tl.constexpr):
        row = tl.load(rows_ptr + tl.program_id(0)).to(tl.int64)
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        hm = h < heads
        d = tl.arange(0, D)
        a = tl.load(lse_ptr + row * heads + h, mask=hm, other=0.0)
        b = tl.load(lser_ptr + row * heads + h, mask=hm, other=0.0)
        m = tl.maximum(a, b)
        wa = tl.exp(a - m)
        wb = tl.exp(b - m)
        tot = wa + wb
        off = row * heads * D + h[:, None] * D + d[None, :]
        oa = tl.load(o_ptr + off, mask=hm[:, None], other=0.0).to(tl.float32)
        ob = tl.load(or_ptr + off, mask=hm[:, None], other=0.0).to(tl.float32)
        out = (oa * (wa / tot)[:, None] + ob * (wb / tot)[:, None]).to(o_ptr.dtype.element_ty)
        tl.store(o_ptr + off, out, mask=hm[:, None])
        tl.store(lse_ptr + row * heads + h, m + tl.log(tot), mask=hm)

    @triton.jit
    def _add_rows_kernel(x_ptr, y_ptr, rows_ptr, width, BLOCK: tl.constexpr):
        row = tl.load(rows_ptr + tl.program_id(0)).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = c < width
        x = tl.load(x_ptr + row * width + c, mask=m).to(tl.float32)
        y = tl.load(y_ptr + row * width + c, mask=m).to(tl.float32)
        tl.store(x_ptr + row * width + c, (x + y).to(x_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _gather_sum_kernel(out_ptr, out_stride, src_ptr, table_ptr, width,
                           M: tl.constexpr, BLOCK: tl.constexpr):
        dst = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = c < width
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(M):
            src = tl.load(table_ptr + dst * M + j).to(tl.int64)
            acc += tl.load(src_ptr + src * width + c, mask=m & (src >= 0), other=0.0).to(tl.float32)
        tl.store(out_ptr + dst * out_stride + c, acc.to(out_ptr.dtype.element_ty), mask=m)


def _triton(t: torch.Tensor) -> bool:
    return _TRITON and t.is_cuda


def merge_(o: torch.Tensor, lse: torch.Tensor, o_r: torch.Tensor, lse_r: torch.Tensor,
           rows: torch.Tensor) -> None:
    """In place, on ``rows`` of ``o`` ``[T, h, d]`` / ``lse`` ``[T, h]`` (float32): the attention
    over the union of both key sets, from the two partial results and their log-sum-exps."""
    if rows.numel() == 0:
        return
    if _triton(o) and o.is_contiguous() and o_r.is_contiguous():
        heads, d = o.shape[1], o.shape[2]
        block_h = min(triton.next_power_of_2(heads), max(1, 4096 // d))
        _merge_kernel[(rows.numel(), triton.cdiv(heads, block_h))](
            o, lse, o_r, lse_r, rows, heads, D=d, BLOCK_H=block_h)
        return
    a, b = lse.index_select(0, rows), lse_r.index_select(0, rows)
    m = torch.logaddexp(a, b)
    wa, wb = torch.exp(a - m).unsqueeze(-1), torch.exp(b - m).unsqueeze(-1)
    merged = o.index_select(0, rows).to(wa.dtype) * wa + o_r.index_select(0, rows).to(wa.dtype) * wb
    o.index_copy_(0, rows, merged.to(o.dtype))
    lse.index_copy_(0, rows, m)


def add_rows_(x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> None:
    """``x[rows] += y[rows]`` in place (``[T, ...]``, contiguous)."""
    if rows.numel() == 0:
        return
    if _triton(x) and x.is_contiguous() and y.is_contiguous():
        width = x[0].numel()
        block = min(4096, triton.next_power_of_2(width))
        _add_rows_kernel[(rows.numel(), triton.cdiv(width, block))](x, y, rows, width, BLOCK=block)
        return
    x.index_add_(0, rows, y.index_select(0, rows))


def gather_sum(out: torch.Tensor, src: torch.Tensor, table: torch.Tensor) -> None:
    """``out[i] = sum of src[table[i, j]]`` over ``j`` with ``table[i, j] >= 0`` (zero where
    none). ``out`` ``[N, ...]`` (rows may be strided), ``src`` ``[Ns, ...]`` contiguous,
    ``table`` int32/int64 ``[N, M]``."""
    if _triton(out) and src.is_contiguous() and out[0].is_contiguous():
        width = src[0].numel() if src.shape[0] else out[0].numel()
        block = min(4096, triton.next_power_of_2(width))
        if src.shape[0] == 0:
            src = out.new_zeros((1,) + tuple(out.shape[1:]))
        _gather_sum_kernel[(out.shape[0], triton.cdiv(width, block))](
            out, out.stride(0), src, table, width, M=table.shape[1], BLOCK=block)
        return
    out.zero_()
    for j in range(table.shape[1]):
        sel = (table[:, j] >= 0).nonzero().squeeze(1)
        if sel.numel():
            out.index_add_(0, sel, src.index_select(0, table[sel, j].long()).to(out.dtype))
