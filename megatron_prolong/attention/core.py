"""Causal attention restricted to documents, with optional context parallelism.

Token ``i`` attends to token ``j`` iff both are in the same document and ``j <= i`` (positions
global in the packed row). Tensors use Megatron's ``sbhd`` layout.

With a context-parallel group of size ``C > 1`` each rank holds its zigzag share of the queries
(chunks ``r`` and ``2C-1-r`` of ``2C``); K and V are all-gathered over the group
(:func:`~megatron_prolong.attention.context_parallel.gather_kv_zigzag`, backward reduce-scatter)
and the local queries attend to the gathered keys with their global positions. No per-document
padding is needed and documents may cross chunk and rank boundaries.

Every backend works on the same decomposition: this rank's queries form one or two contiguous
runs of global positions (:func:`zigzag_segments`); each run intersected with a document is a
*piece* whose queries ``[qa, qb)`` see the keys ``[doc_start, qb)`` causally, aligned bottom-right
(the last query sees the last key).

Backends:
- ``reference``: exact blocked math (a custom autograd function that keeps only the log-sum-exp
  between passes and recomputes scores in the backward, so memory stays bounded); any device.
- ``sdpa``: ``F.scaled_dot_product_attention`` per piece (one batched causal call when the rows
  are single documents); lower-right causal alignment for pieces whose keys start before their
  queries (CP). GQA through ``enable_gqa``.
- ``flex``: ``flex_attention`` with a document block mask built exactly from the boundaries
  (full blocks skip the mask function), cached on the layout, compiled once per process.
- ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2 varlen) with
  cumulative lengths per piece; CUDA only.
- ``hybrid`` (CP = 1): documents of at least :data:`HYBRID_MIN_DOC` tokens get one causal
  SDPA call each (cuDNN first, :data:`SDPA_PRIORITY`), optionally over
  :data:`HYBRID_STREAMS` side streams; the shorter ones are packed into one
  :data:`HYBRID_SHORT_BACKEND` call (``varlen``; ``reference`` off CUDA). Tokens are split per
  document with ``torch.split`` and re-joined with one ``cat``. Under CP it runs ``flex``.
- ``cudnn`` (CP = 1): cuDNN's fused attention on the packed documents (THD, ragged offsets),
  one forward and one backward launch per call, through cudnn-frontend's Python graph API
  (:mod:`.cudnn_thd`; optional package ``nvidia-cudnn-frontend``, a clear error without it).
  Graphs depend only on the bucketed document count and maximum length (powers of two), so new
  layouts mostly reuse them. Under CP it runs ``flex``.
- ``auto``: the fastest path measured per layout (H100, docs/benchmarks.md, 2026-11-24):
  CPU -> ``reference``; CUDA, CP = 1, one document per row -> ``sdpa`` (one causal cuDNN call,
  540 TFLOP/s vs TE 524, dense cuDNN 553); CUDA, CP = 1, several documents ->
  :data:`AUTO_MULTI_DOC_BACKEND` = ``cudnn`` (495 / 449 TFLOP/s at mean 8K / 2K documents, vs
  ``hybrid`` 472 / 382 in the same run and TE THD 469 / 418 in the earlier one), or
  :data:`AUTO_MULTI_DOC_FALLBACK` = ``hybrid`` where cudnn-frontend is missing or the inputs are
  not fp16/bf16 with head dim <= 128 (per-document cuDNN SDPA; its first call on new document
  lengths costs 0.5-4 s at 64K, against 15-30 ms for ``cudnn`` on a seen bucket and ~0.2 s on a
  new one); CUDA with CP -> ``flex`` (pieces need lower-right masks, which SDPA serves only
  through FlashAttention-2).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import cudnn_thd
from .context_parallel import gather_kv_zigzag, zigzag_indices, zigzag_segments
from .layout import DocumentLayout

BACKENDS = ("auto", "reference", "flex", "varlen", "sdpa", "hybrid", "cudnn")

#: backend ``auto`` uses on CUDA for layouts with more than one document (``hybrid`` itself
#: runs flex under CP). ``cudnn`` falls back to :data:`AUTO_MULTI_DOC_FALLBACK` where
#: cudnn-frontend is missing or the inputs are not fp16/bf16 with head dim <= 128
AUTO_MULTI_DOC_BACKEND = "cudnn"
#: what ``auto`` uses for multi-document rows when AUTO_MULTI_DOC_BACKEND is ``cudnn`` and that
#: cannot run
AUTO_MULTI_DOC_FALLBACK = "hybrid"
#: block sizes of the flex block mask (queries, keys)
FLEX_BLOCK_SIZE: tuple[int, int] = (128, 128)
#: kernel_options passed to flex_attention (None: PyTorch's defaults / autotuning)
FLEX_KERNEL_OPTIONS: dict | None = None
#: SDPA kernels to prefer on CUDA, in priority order (names of torch.nn.attention.SDPBackend);
#: None keeps PyTorch's own order. cuDNN first: PyTorch 2.11 picks cuDNN by default on H100, but
#: once Transformer Engine is imported its default falls to FlashAttention-2 (measured: 330 vs
#: 553 TFLOP/s dense), so the order is stated rather than left to PyTorch
SDPA_PRIORITY: tuple[str, ...] | None = (
    "CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH",
)
#: hybrid: documents of at least this many tokens get their own causal SDPA call (cuDNN)
HYBRID_MIN_DOC = 2048
#: hybrid: backend for the documents shorter than HYBRID_MIN_DOC, packed into one call
#: (CUDA; on other devices ``reference`` is used). ``varlen`` needs no recompilation when the
#: packed length changes (flex would compile once per length)
HYBRID_SHORT_BACKEND = "varlen"
#: hybrid: number of side CUDA streams the per-document SDPA calls are spread over (0: none)
HYBRID_STREAMS = 0
#: element budget of one score block in the reference backend
REFERENCE_BLOCK_ELEMENTS = 1 << 24

Piece = tuple[int, int, int, int, int]  # (row, local_q_start, local_q_end, key_start, key_end)


# ---------------------------------------------------------------------- public entry
def document_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: DocumentLayout,
    *,
    cp_group=None,
    backend: str = "auto",
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Document-masked causal attention.

    q: ``[s_local, b, hq, d]``; k, v: ``[s_local, b, hkv, d]`` (``hq % hkv == 0``). With a CP
    group of size C > 1, ``s_local = s / C`` and the local tokens are this rank's zigzag share.
    Returns ``[s_local, b, hq * d]``.
    """
    cp_size = dist.get_world_size(cp_group) if cp_group is not None else 1
    cp_rank = dist.get_rank(cp_group) if cp_group is not None else 0
    if cp_size > 1:
        k, v = gather_kv_zigzag(k, v, cp_group)
    return attend_gathered(
        q, k, v, layout, cp_size=cp_size, cp_rank=cp_rank, backend=backend,
        softmax_scale=softmax_scale,
    )


def attend_gathered(
    q: torch.Tensor,
    k_full: torch.Tensor,
    v_full: torch.Tensor,
    layout: DocumentLayout,
    *,
    cp_size: int = 1,
    cp_rank: int = 0,
    backend: str = "auto",
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """The compute part of :func:`document_attention`: this rank's zigzag queries against the
    full, natural-order K/V (no communication; also used to time one CP rank on one GPU)."""
    if q.dim() != 4 or k_full.dim() != 4 or v_full.dim() != 4:
        raise ValueError("q, k, v must be [s, b, heads, dim]")
    s_local, b, hq, d = q.shape
    s, bk, hkv, dk = k_full.shape
    if v_full.shape != k_full.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k_full.shape)} vs {tuple(v_full.shape)}")
    if bk != b or dk != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k_full.shape)} do not match")
    if hq % hkv != 0:
        raise ValueError(f"query heads {hq} not divisible by key/value heads {hkv}")
    if layout.doc_ids.shape != (b, s):
        raise ValueError(
            f"layout is {tuple(layout.doc_ids.shape)} but the batch is b={b}, s={s} (full length)"
        )
    if s_local * cp_size != s:
        raise ValueError(f"local length {s_local} x cp_size {cp_size} != sequence length {s}")
    layout = _on_device(layout, q.device)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    name = resolve_backend(backend, q.device, layout, cp_size, dtype=q.dtype, head_dim=d)
    try:
        out = _IMPLS[name](q, k_full, v_full, layout, cp_size, cp_rank, scale)
    except cudnn_thd.GraphBuildError as e:
        if backend != "auto":
            raise
        # auto picked cudnn but cuDNN cannot build the graphs here: switch it off for this
        # process (nothing ran yet, so nothing to undo) and use the fallback
        warnings.warn(f"{e}; attention backend auto uses {AUTO_MULTI_DOC_FALLBACK!r} from now on")
        cudnn_thd.disable(str(e))
        out = _IMPLS[AUTO_MULTI_DOC_FALLBACK](q, k_full, v_full, layout, cp_size, cp_rank, scale)
    return out.reshape(s_local, b, hq * d)


def resolve_backend(
    backend: str, device: torch.device, layout: DocumentLayout, cp_size: int = 1, *,
    dtype: torch.dtype | None = None, head_dim: int | None = None,
) -> str:
    """The backend ``auto`` stands for (others are returned as given, after a name check).

    Rule (fastest measured per layout; H100, docs/benchmarks.md, 2026-11-24):
    CPU -> ``reference``. CUDA with CP > 1 -> ``flex`` (a rank's pieces need a lower-right causal
    mask, which SDPA only has through FlashAttention-2: 11.2 vs flex's 9.5 us/token). CUDA,
    CP = 1: single-document rows -> ``sdpa`` (one causal cuDNN call: 540 TFLOP/s; TE THD 524,
    dense cuDNN SDPA 553); several documents -> :data:`AUTO_MULTI_DOC_BACKEND` = ``cudnn``
    (packed THD cuDNN attention: 495 / 449 TFLOP/s at mean 8K / 2K vs ``hybrid`` 472 / 382 in
    the same run, TE THD 469 / 418 in an earlier one) when cudnn-frontend imports and
    ``dtype`` / ``head_dim`` (when given) suit it, else :data:`AUTO_MULTI_DOC_FALLBACK` =
    ``hybrid``. Multi-document rows in float32 (e.g. the CPU-sized demo on a GPU) -> ``flex``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend != "auto":
        return backend
    if torch.device(device).type != "cuda":
        return "reference"
    if cp_size > 1:
        return "flex"
    if layout.is_single_document():
        return "sdpa"
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return "flex"  # cuDNN's and FlashAttention's packed kernels take 16-bit inputs only
    if AUTO_MULTI_DOC_BACKEND == "cudnn":
        ok = cudnn_thd.DISABLED is None and cudnn_thd.available() and (
            dtype is None or head_dim is None or cudnn_thd.supports(dtype, head_dim))
        return "cudnn" if ok else AUTO_MULTI_DOC_FALLBACK
    return AUTO_MULTI_DOC_BACKEND


def _on_device(layout: DocumentLayout, device: torch.device) -> DocumentLayout:
    if layout.device == device:
        return layout
    key = ("on", str(device))
    if key not in layout._cache:
        layout._cache[key] = layout.to(device)
    return layout._cache[key]


def pieces(layout: DocumentLayout, cp_size: int, cp_rank: int) -> tuple[Piece, ...]:
    """This rank's (row, local query range, key range) pieces, in local token order (cached)."""
    key = ("pieces", cp_size, cp_rank)
    if key not in layout._cache:
        out: list[Piece] = []
        segs = zigzag_segments(layout.seq_len, cp_size, cp_rank)
        for row, bounds in enumerate(layout.boundaries()):
            for ls, le, gs in segs:
                ge = gs + (le - ls)
                for i in range(len(bounds) - 1):
                    d0, d1 = bounds[i], bounds[i + 1]
                    qa, qb = max(d0, gs), min(d1, ge)
                    if qa < qb:
                        out.append((row, ls + qa - gs, ls + qb - gs, d0, qb))
        layout._cache[key] = tuple(out)
    return layout._cache[key]


# ---------------------------------------------------------------------- reference
class _ReferenceAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, piece_list, scale):
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        s_local, b, hq, d = q.shape
        hkv = k.shape[2]
        g = hq // hkv
        out = torch.zeros(s_local, b, hq, d, dtype=cdt, device=q.device)
        lse = torch.zeros(s_local, b, hq, dtype=cdt, device=q.device)
        for row, i0, i1, j0, j1, qg0 in _blocks(piece_list, hq):
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
        ctx.piece_list = piece_list
        ctx.scale = scale
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
        for row, i0, i1, j0, j1, qg0 in _blocks(ctx.piece_list, hq):
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


def _blocks(piece_list, hq):
    """Split pieces into query blocks whose score tensor stays within the element budget.
    Yields (row, local q start, local q end, key start, key end, global q start)."""
    for row, lq0, lq1, k0, k1 in piece_list:
        qg_first = k1 - (lq1 - lq0)
        n_max = max(1, REFERENCE_BLOCK_ELEMENTS // max(1, (k1 - k0) * hq))
        for i0 in range(lq0, lq1, n_max):
            i1 = min(i0 + n_max, lq1)
            qg0 = qg_first + (i0 - lq0)
            yield row, i0, i1, k0, qg0 + (i1 - i0), qg0


def _reference(q, k, v, layout, cp_size, cp_rank, scale):
    return _ReferenceAttention.apply(q, k, v, pieces(layout, cp_size, cp_rank), scale)


# ---------------------------------------------------------------------- sdpa
def _sdpa_piece(qp, kp, vp, scale):
    """qp [b, hq, n, d], kp/vp [b, hkv, L, d]; causal aligned bottom-right."""
    if SDPA_PRIORITY and qp.device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        order = [getattr(SDPBackend, n) for n in SDPA_PRIORITY]
        with sdpa_kernel(order, set_priority=True):
            return _sdpa_piece_call(qp, kp, vp, scale)
    return _sdpa_piece_call(qp, kp, vp, scale)


def _sdpa_piece_call(qp, kp, vp, scale):
    n, L = qp.shape[2], kp.shape[2]
    gqa = qp.shape[1] != kp.shape[1]
    if n == L:
        return F.scaled_dot_product_attention(
            qp, kp, vp, is_causal=True, scale=scale, enable_gqa=gqa
        )
    from torch.nn.attention.bias import causal_lower_right

    return F.scaled_dot_product_attention(
        qp, kp, vp, attn_mask=causal_lower_right(n, L), scale=scale, enable_gqa=gqa
    )


def _sdpa(q, k, v, layout, cp_size, cp_rank, scale):
    s_local, b, hq, d = q.shape
    if layout.is_single_document():
        # every row is one document: one batched call per contiguous query run
        outs = []
        for ls, le, gs in zigzag_segments(layout.seq_len, cp_size, cp_rank):
            ge = gs + (le - ls)
            o = _sdpa_piece(
                q[ls:le].permute(1, 2, 0, 3), k[:ge].permute(1, 2, 0, 3),
                v[:ge].permute(1, 2, 0, 3), scale,
            )
            outs.append(o.permute(2, 0, 1, 3))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
    if cp_size == 1:
        # one causal call per document over torch.split views (one split/cat in the autograd
        # graph instead of a full-size zero-filled gradient per slice)
        return _per_document(q, k, v, layout, scale, min_doc=0, short_backend=None, streams=0)
    rows: list[list[torch.Tensor]] = [[] for _ in range(b)]
    for row, lq0, lq1, k0, k1 in pieces(layout, cp_size, cp_rank):
        o = _sdpa_piece(
            q[lq0:lq1, row].transpose(0, 1).unsqueeze(0),
            k[k0:k1, row].transpose(0, 1).unsqueeze(0),
            v[k0:k1, row].transpose(0, 1).unsqueeze(0),
            scale,
        )
        rows[row].append(o[0].transpose(0, 1))  # [n, hq, d]
    return torch.stack([torch.cat(r, dim=0) for r in rows], dim=1)


# ---------------------------------------------------------------------- hybrid
def _hybrid_plan(layout: DocumentLayout, min_doc: int):
    """(document lengths in THD order, indices of long documents, indices of short ones,
    one-row layout of the short documents packed back to back or None) (cached)."""
    key = ("hybrid", min_doc)
    if key not in layout._cache:
        sizes = [
            bnd[i + 1] - bnd[i] for bnd in layout.boundaries() for i in range(len(bnd) - 1)
        ]
        long_idx = [i for i, n in enumerate(sizes) if n >= min_doc]
        short_idx = [i for i, n in enumerate(sizes) if n < min_doc]
        short_layout = None
        if short_idx:
            short_layout = DocumentLayout.from_lengths(
                [[sizes[i] for i in short_idx]], device=layout.device
            )
        layout._cache[key] = (sizes, long_idx, short_idx, short_layout)
    return layout._cache[key]


_SIDE_STREAMS: list = []


def _per_document(q, k, v, layout, scale, *, min_doc, short_backend, streams):
    """CP = 1. Documents of ``min_doc`` tokens or more: one causal SDPA call each (cuDNN on
    Hopper), optionally spread over ``streams`` side CUDA streams; the shorter ones packed into
    one ``short_backend`` call. Tokens are split per document with ``torch.split`` and the
    outputs concatenated back, so autograd sees one split and one cat per tensor."""
    s, b, hq, d = q.shape
    hkv = k.shape[2]
    sizes, long_idx, short_idx, short_layout = _hybrid_plan(layout, min_doc)
    flat = lambda t: t.transpose(0, 1).reshape(b * s, t.shape[2], d)  # a view when b == 1
    qs, ks, vs = (torch.split(flat(t), sizes, dim=0) for t in (q, k, v))
    outs: list[torch.Tensor | None] = [None] * len(sizes)
    use_streams = streams > 0 and q.device.type == "cuda" and len(long_idx) > 1
    if use_streams:
        while len(_SIDE_STREAMS) < streams:
            _SIDE_STREAMS.append(torch.cuda.Stream(device=q.device))
        main = torch.cuda.current_stream(q.device)
    for j, i in enumerate(long_idx):
        args = [t[i].transpose(0, 1).unsqueeze(0) for t in (qs, ks, vs)]
        if use_streams:
            st = _SIDE_STREAMS[j % streams]
            st.wait_stream(main)
            with torch.cuda.stream(st):
                o = _sdpa_piece(*args, scale)
            o.record_stream(main)
        else:
            o = _sdpa_piece(*args, scale)
        outs[i] = o[0].transpose(0, 1)  # [L, hq, d]
    if use_streams:
        for st in _SIDE_STREAMS[:streams]:
            main.wait_stream(st)
    if short_idx:
        if len(short_idx) == len(sizes):
            qc, kc, vc = (flat(t).unsqueeze(1) for t in (q, k, v))
        else:
            qc, kc, vc = (torch.cat([t[i] for i in short_idx]).unsqueeze(1) for t in (qs, ks, vs))
        sb = short_backend if q.device.type == "cuda" else "reference"
        oc = _IMPLS[sb](qc, kc, vc, _on_device(short_layout, q.device), 1, 0, scale)
        oc = oc.reshape(-1, hq, d)
        if len(short_idx) == len(sizes):
            return oc.view(b, s, hq, d).transpose(0, 1)
        for i, o in zip(short_idx, torch.split(oc, [sizes[i] for i in short_idx], dim=0)):
            outs[i] = o
    out = torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]
    return out.view(b, s, hq, d).transpose(0, 1)


def _hybrid(q, k, v, layout, cp_size, cp_rank, scale):
    if cp_size > 1:
        # a rank's pieces need lower-right causal masks and overlapping key ranges: flex there
        # (CUDA), the reference elsewhere
        impl = _flex if q.device.type == "cuda" else _reference
        return impl(q, k, v, layout, cp_size, cp_rank, scale)
    return _per_document(
        q, k, v, layout, scale, min_doc=HYBRID_MIN_DOC, short_backend=HYBRID_SHORT_BACKEND,
        streams=HYBRID_STREAMS,
    )


# ---------------------------------------------------------------------- varlen
def _varlen_plan(layout: DocumentLayout, cp_size: int, cp_rank: int):
    key = ("varlen", cp_size, cp_rank)
    if key not in layout._cache:
        s = layout.seq_len
        dev = layout.device
        if cp_size == 1:
            cu = layout.cu_seqlens_flat()
            m = layout.max_doc_len()
            layout._cache[key] = (cu, cu, m, m, None)
        else:
            pl = pieces(layout, cp_size, cp_rank)
            cq, ck, idx = [0], [0], []
            for row, lq0, lq1, k0, k1 in pl:
                cq.append(cq[-1] + lq1 - lq0)
                ck.append(ck[-1] + k1 - k0)
                idx.append((row * s + k0, row * s + k1))
            index = torch.cat([torch.arange(a, c, device=dev) for a, c in idx])
            layout._cache[key] = (
                torch.tensor(cq, dtype=torch.int32, device=dev),
                torch.tensor(ck, dtype=torch.int32, device=dev),
                max(p[2] - p[1] for p in pl),
                max(p[4] - p[3] for p in pl),
                index,
            )
    return layout._cache[key]


def _varlen(q, k, v, layout, cp_size, cp_rank, scale):
    if q.device.type != "cuda":
        raise RuntimeError(
            "attention backend 'varlen' (torch.nn.attention.varlen.varlen_attn, FlashAttention-2) "
            "runs on CUDA only; use 'reference' or 'auto' on CPU"
        )
    from torch.nn.attention.varlen import varlen_attn

    s_local, b, hq, d = q.shape
    s, _, hkv, _ = k.shape
    cu_q, cu_k, max_q, max_k, index = _varlen_plan(layout, cp_size, cp_rank)
    qf = q.transpose(0, 1).reshape(b * s_local, hq, d)
    kf = k.transpose(0, 1).reshape(b * s, hkv, d)
    vf = v.transpose(0, 1).reshape(b * s, hkv, d)
    if index is not None:
        kf = kf.index_select(0, index)
        vf = vf.index_select(0, index)
    out = varlen_attn(qf, kf, vf, cu_q, cu_k, max_q, max_k, scale=scale, window_size=(-1, 0))
    return out.view(b, s_local, hq, d).transpose(0, 1)


# ---------------------------------------------------------------------- flex
_FLEX_COMPILED: Callable | None = None


def _flex_fn(device: torch.device) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        # eager (math) path, forward only on CPU: fine for small checks
        def eager(*args, **kwargs):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
                return flex_attention(*args, **kwargs)

        return eager
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED


def flex_block_mask(
    layout: DocumentLayout,
    cp_size: int = 1,
    cp_rank: int = 0,
    block_size: tuple[int, int] | None = None,
):
    """The flex BlockMask of this rank's queries (global positions) vs all keys (cached).

    Built from the boundaries, not by evaluating the mask function densely: for a query block
    and a key block ``[kl, kr]``, with each query ``i`` seeing the interval ``[lo_i, hi_i]``
    (its document start and itself), the block is non-empty iff some query has
    ``lo_i <= kr and hi_i >= kl``, and full iff every query has ``lo_i <= kl and hi_i >= kr``.
    """
    from torch.nn.attention.flex_attention import BlockMask

    bq, bk = block_size or FLEX_BLOCK_SIZE
    key = ("flex", cp_size, cp_rank, bq, bk)
    if key in layout._cache:
        return layout._cache[key]
    dev = layout.device
    b, s = layout.batch, layout.seq_len
    s_local = s // cp_size
    qpos = zigzag_indices(s, cp_size, cp_rank, device=dev)
    lo = layout.doc_start()[:, qpos]  # [b, s_local]
    nq, nk = -(-s_local // bq), -(-s // bk)
    pad = nq * bq - s_local
    # tensors the mask function reads (padded query rows see nothing)
    q_lo = F.pad(lo, (0, pad), value=0)
    q_hi = F.pad(qpos, (0, pad), value=-1)

    def mask_mod(bi, hi, q_idx, kv_idx):
        return (kv_idx >= q_lo[bi, q_idx]) & (kv_idx <= q_hi[q_idx])

    kl = torch.arange(nk, device=dev) * bk
    kr = torch.clamp(kl + bk - 1, max=s - 1)
    k_complete = (kl + bk) <= s  # key block has no padding
    big = torch.iinfo(torch.int64).max // 4
    lo_any = F.pad(lo, (0, pad), value=big).view(b, nq, bq)
    hi_any = F.pad(qpos, (0, pad), value=-1).view(nq, bq)
    # a query block with padding rows is never "full" (as create_block_mask does)
    lo_all = F.pad(lo, (0, pad), value=big).view(b, nq, bq)
    hi_all = F.pad(qpos, (0, pad), value=-1).view(nq, bq)
    any_blocks, all_blocks = [], []
    step = max(1, (1 << 26) // max(1, bq * nk))
    for i in range(0, nq, step):
        j = min(nq, i + step)
        la, ha = lo_any[:, i:j, :, None], hi_any[None, i:j, :, None]
        any_blocks.append(((la <= kr) & (ha >= kl)).any(dim=2))
        lf, hf = lo_all[:, i:j, :, None], hi_all[None, i:j, :, None]
        all_blocks.append(((lf <= kl) & (hf >= kr)).all(dim=2))
    nonempty = torch.cat(any_blocks, dim=1)  # [b, nq, nk]
    full = torch.cat(all_blocks, dim=1) & k_complete & nonempty  # padded key blocks: partial
    partial = nonempty & ~full

    def ordered(dense):
        num = dense.sum(dim=-1, dtype=torch.int32)
        idx = torch.argsort(~dense, dim=-1, stable=True).to(torch.int32)
        return num[:, None], idx[:, None]

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    bm = BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(bq, bk), mask_mod=mask_mod,
        seq_lengths=(s_local, s),
    )
    layout._cache[key] = bm
    return bm


def _flex(q, k, v, layout, cp_size, cp_rank, scale):
    hq, hkv = q.shape[2], k.shape[2]
    bm = flex_block_mask(layout, cp_size, cp_rank)
    kwargs = {}
    if FLEX_KERNEL_OPTIONS and q.device.type == "cuda":
        kwargs["kernel_options"] = dict(FLEX_KERNEL_OPTIONS)
    out = _flex_fn(q.device)(
        q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3),
        block_mask=bm, scale=scale, enable_gqa=hq != hkv, **kwargs,
    )
    return out.permute(2, 0, 1, 3)


# ---------------------------------------------------------------------- cudnn (THD)
def _cudnn(q, k, v, layout, cp_size, cp_rank, scale):
    if cp_size > 1:
        # pieces of a CP rank need lower-right masks and overlapping key ranges: flex there
        impl = _flex if q.device.type == "cuda" else _reference
        return impl(q, k, v, layout, cp_size, cp_rank, scale)
    if q.device.type != "cuda":
        raise RuntimeError("attention backend 'cudnn' runs on CUDA only; use 'reference' or "
                           "'auto' on CPU")
    if not cudnn_thd.available():
        raise RuntimeError(cudnn_thd.MISSING)
    return cudnn_thd.thd_attention(q, k, v, layout, scale)


_IMPLS = {
    "reference": _reference, "sdpa": _sdpa, "varlen": _varlen, "flex": _flex, "hybrid": _hybrid,
    "cudnn": _cudnn,
}
