"""Attention of one new query per row against a long KV cache, split over the keys (flash-decoding).

A decode step's attention reads the whole cache and does little arithmetic, so its speed is the
speed of reading K and V once. One program per (row, KV head) would use a handful of the GPU's
SMs; here each (row, KV head) is split into ``splits`` key ranges, each program keeps a running
maximum, sum and output for the group of query heads sharing that KV head (online softmax, all
in fp32, so no [heads x keys] score tensor goes through memory), and a second kernel merges the
splits by log-sum-exp. Slots whose ``valid`` flag is off (other documents, padding, empty
slots) count as masked keys. Returns the output and the log-sum-exp, so context-parallel ranks
can merge their shards as before; a shard with no visible key gives output 0, lse -inf.

``torch_attend`` is the same computation in PyTorch (the CPU path and the reference of the tests).
"""

from __future__ import annotations

import torch

from megatron_prolong.model.cross_entropy import triton_available

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _split_kernel(q_ptr, k_ptr, v_ptr, valid_ptr, acc_ptr, m_ptr, l_ptr, hkv, cap, per_split, scale,
                      G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                      PRECISION: tl.constexpr):
        bh = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        splits = tl.num_programs(1)
        row = bh // hkv
        gi = tl.arange(0, G_PAD)
        di = tl.arange(0, D)
        q = tl.load(q_ptr + bh * G * D + gi[:, None] * D + di[None, :], mask=(gi < G)[:, None], other=0.0)
        m = tl.full((G_PAD,), -1.0e30, tl.float32)  # finite: a block of masked keys must not give nan
        s_sum = tl.zeros((G_PAD,), tl.float32)
        acc = tl.zeros((G_PAD, D), tl.float32)
        start = split * per_split
        for n0 in range(start, start + per_split, BLOCK_N):
            ni = n0 + tl.arange(0, BLOCK_N)
            live = ni < cap
            ok = tl.load(valid_ptr + row * cap + ni, mask=live, other=0).to(tl.int1)
            kv = bh * cap * D + ni[:, None] * D + di[None, :]
            k = tl.load(k_ptr + kv, mask=live[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [G_PAD, BLOCK_N] fp32
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            s_sum = s_sum * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + kv, mask=live[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
        part = bh * splits + split
        tl.store(acc_ptr + part * G * D + gi[:, None] * D + di[None, :], acc, mask=(gi < G)[:, None])
        tl.store(m_ptr + part * G + gi, m, mask=gi < G)
        tl.store(l_ptr + part * G + gi, s_sum, mask=gi < G)

    @triton.jit
    def _merge_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, lse_ptr, splits, G: tl.constexpr, D: tl.constexpr,
                      CHUNK: tl.constexpr):
        # Splits are summed a fixed-size chunk at a time, in order: splits past a row's keys add exact
        # zeros, so a row gives the same bits whatever the capacity (the batch's longest prompt) adds.
        bh = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        di = tl.arange(0, D)
        top = tl.full((), -1.0e30, tl.float32)
        for s0 in range(0, splits, CHUNK):
            si = s0 + tl.arange(0, CHUNK)
            m = tl.load(m_ptr + (bh * splits + si) * G + g, mask=si < splits, other=-1.0e30)
            top = tl.maximum(top, tl.max(m, axis=0))
        total = tl.zeros((), tl.float32)
        out = tl.zeros((D,), tl.float32)
        for s0 in range(0, splits, CHUNK):
            si = s0 + tl.arange(0, CHUNK)
            live = si < splits
            w = tl.exp(tl.load(m_ptr + (bh * splits + si) * G + g, mask=live, other=-1.0e30) - top)
            total += tl.sum(w * tl.load(l_ptr + (bh * splits + si) * G + g, mask=live, other=0.0), axis=0)
            acc = tl.load(acc_ptr + ((bh * splits + si) * G + g)[:, None] * D + di[None, :], mask=live[:, None],
                          other=0.0)
            out += tl.sum(acc * w[:, None], axis=0)
        tl.store(out_ptr + (bh * G + g) * D + di, out / tl.maximum(total, 1.0e-30))
        lse = tl.where(total > 0, top + tl.log(tl.maximum(total, 1.0e-30)), float("-inf"))
        tl.store(lse_ptr + bh * G + g, lse)


def triton_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scale: float,
                  block_n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """q [b, hq, d]; k, v [b, hkv, cap, d] (contiguous); valid [b, cap] -> (out [b, hq, d], lse [b, hq]), fp32."""
    b, hq, d = q.shape
    _, hkv, cap, _ = k.shape
    g = hq // hkv
    # enough programs for every SM a few times over at one row, each reading at least one block of
    # keys. Chosen by the capacity, not the row count: a row's sums run in the same order in any
    # batch of the same capacity, and at any capacity up to 4 x SMs / hkv blocks (a block a split).
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 8
    splits = max(1, min(-(-4 * sms // hkv), -(-cap // block_n)))
    per_split = -(-cap // (splits * block_n)) * block_n
    splits = -(-cap // per_split)
    qs = q.reshape(b * hkv, g, d).contiguous()
    acc = torch.empty(b * hkv, splits, g, d, dtype=torch.float32, device=q.device)
    m = torch.empty(b * hkv, splits, g, dtype=torch.float32, device=q.device)
    l_ = torch.empty_like(m)
    _split_kernel[(b * hkv, splits)](qs, k, v, valid.view(torch.uint8), acc, m, l_, hkv, cap, per_split, scale,
                                     G=g, G_PAD=max(16, triton.next_power_of_2(g)), D=d, BLOCK_N=block_n,
                                     PRECISION="ieee" if k.dtype == torch.float32 else "tf32")
    out = torch.empty(b * hkv, g, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b * hkv, g, dtype=torch.float32, device=q.device)
    _merge_kernel[(b * hkv, g)](acc, m, l_, out, lse, splits, G=g, D=d, CHUNK=32)
    return out.view(b, hq, d), lse.view(b, hq)


def torch_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same as :func:`triton_attend` in PyTorch: q [b, hq, d]; k, v [b, hkv, cap, d]; valid [b, cap]."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qg = q.float().reshape(b, hkv, g, d)
    scores = torch.matmul(qg, k.float().transpose(-1, -2)) * scale  # [b, hkv, g, cap]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf where this shard holds no visible key
    p = torch.exp(scores - lse.nan_to_num(neginf=0.0)[..., None])
    out = torch.matmul(p.to(v.dtype).float(), v.float())
    return out.reshape(b, hq, d), lse.reshape(b, hq)
