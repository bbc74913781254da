"""cuDNN fused attention on packed sequences (THD) through cudnn-frontend's Python graph API.

One forward and one backward cuDNN SDPA launch for all the sequences of a call: every sequence
is one entry of a ragged batch (ragged offsets into the packed Q/K/V/O, per-sequence query and
key lengths, causal mask within each sequence, padding mask beyond its lengths). This is the
kernel family Transformer Engine's THD path uses, without TE.

At CP = 1 the sequences are the documents (mask ``causal``). Under context parallelism a rank
makes two calls (attention/ring.py): the causal squares of its pieces on its own tokens, and the
unmasked rectangles of those pieces against earlier keys of their documents (mask ``none``).
A sequence's *span* (where the next one starts) may exceed its length: the rectangles read the
queries in place, with zero-length sequences for pieces that have no rectangle.

Graphs do not depend on the lengths, only on buckets: the number of sequences is padded up to a
power of two with zero-length sequences, the maximum query and key lengths to powers of two
(minimums ``cudnn_doc_bucket_min`` / ``cudnn_seq_bucket_min``), and the token totals the
backward graph is told (upper bounds) to powers of two, so real batches, whose totals differ
under CP, share few graphs. Built graphs are kept per process, least recently used first out
beyond ``cudnn_graph_cache`` (:data:`_GRAPHS`).

Needs the ``nvidia-cudnn-frontend`` package (it loads the cuDNN library PyTorch ships); CUDA
only, fp16/bf16. :func:`available` says whether it can be imported.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

#: packed token counts are padded (zeros, only when needed) to a multiple of this, so that
#: token totals fall into few graph buckets
TOKEN_ALIGN = 64

_GRAPHS: OrderedDict = OrderedDict()
_HANDLES: dict = {}
_LOCK = threading.Lock()
_AVAILABLE: bool | None = None
#: why the backend was switched off in this process (a graph failed to build), or None
DISABLED: str | None = None


class GraphBuildError(RuntimeError):
    """cuDNN could not build (or does not support) the THD attention graphs."""


MISSING = (
    "attention kernel 'cudnn' needs the cudnn-frontend Python package "
    "(pip install nvidia-cudnn-frontend; it uses the cuDNN library PyTorch ships); "
    "use kernel 'flex' or 'auto' without it"
)


def available() -> bool:
    """Whether ``import cudnn`` (cudnn-frontend) works in this process (cached)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            import cudnn  # noqa: F401

            _AVAILABLE = True
        except Exception:  # noqa: BLE001 - missing package, or its cuDNN library fails to load
            _AVAILABLE = False
    return _AVAILABLE


def disable(reason: str) -> None:
    """Keep ``auto`` off this backend for the rest of the process (it uses its fallback);
    asking for kernel ``cudnn`` by name still tries it."""
    global DISABLED
    DISABLED = reason


def _cudnn():
    try:
        import cudnn
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"{MISSING} (import failed: {type(e).__name__}: {e})") from e
    return cudnn


def bucket(n: int, minimum: int) -> int:
    """The smallest power of two >= max(n, minimum)."""
    n = max(int(n), int(minimum), 1)
    return 1 << (n - 1).bit_length()


def padded_lengths(lengths, *, doc_min: int, seq_min: int, spans=None):
    """(sequence count bucket B, max-length bucket S, lengths padded with zeros to B entries,
    cumulative spans of B + 1 entries: the trailing ones repeat the token total). ``spans``
    (default: the lengths) say where each sequence starts; each must be >= its length."""
    lengths = [int(n) for n in lengths]
    spans = lengths if spans is None else [int(n) for n in spans]
    if not lengths or min(lengths) < 0 or len(spans) != len(lengths) or any(
            a > b for a, b in zip(lengths, spans)):
        raise ValueError(f"sequence lengths must be non-empty, >= 0 and within their spans, got "
                         f"{lengths[:8]} / {spans[:8]}")
    nb = bucket(len(lengths), doc_min)
    sb = bucket(max(lengths), seq_min)
    padded = lengths + [0] * (nb - len(lengths))
    cu = [0]
    for n in spans + [0] * (nb - len(lengths)):
        cu.append(cu[-1] + n)
    return nb, sb, padded, cu


def supports(dtype: torch.dtype, head_dim: int) -> bool:
    return dtype in (torch.bfloat16, torch.float16) and head_dim % 8 == 0 and head_dim <= 128


@dataclass(frozen=True)
class Sequences:
    """One call's sequences as cuDNN's ragged batch: per-sequence query and key lengths,
    ragged offsets in elements (Q/O/dO share theirs, K/V theirs), buckets and token totals."""

    nb: int  # sequence count bucket
    sbq: int  # max query length bucket
    sbk: int  # max key length bucket
    total_q: int
    total_k: int
    mask: str  # "causal" (top-left: each query sees its own position and before) or "none"
    seq_q: torch.Tensor  # int32 [nb, 1, 1, 1]
    seq_kv: torch.Tensor
    off_q: torch.Tensor  # int64 [nb + 1, 1, 1, 1]
    off_kv: torch.Tensor
    off_s: torch.Tensor  # softmax stats (tokens x query heads)

    @property
    def alloc_q(self) -> int:
        return -(-self.total_q // TOKEN_ALIGN) * TOKEN_ALIGN

    @property
    def alloc_k(self) -> int:
        return -(-self.total_k // TOKEN_ALIGN) * TOKEN_ALIGN


MASKS = ("causal", "none")


def sequences(q_lengths, kv_lengths, hq: int, hkv: int, d: int, device, *, doc_min: int,
              seq_min: int, mask: str = "causal", q_spans=None) -> Sequences:
    """Sequences of the given query / key lengths; the key stream packed back to back, the
    query stream too unless ``q_spans`` says where each sequence's queries start."""
    if mask not in MASKS:
        raise ValueError(f"mask {mask!r} is not one of {MASKS}")
    if mask == "causal" and list(map(int, q_lengths)) != list(map(int, kv_lengths)):
        raise ValueError("a causal sequence has as many keys as queries")
    nb, sbq, pq, cq = padded_lengths(q_lengths, doc_min=doc_min, seq_min=seq_min, spans=q_spans)
    _, sbk, pk, ck = padded_lengths(kv_lengths, doc_min=doc_min, seq_min=seq_min)
    cq_t, ck_t = torch.tensor(cq, dtype=torch.int64), torch.tensor(ck, dtype=torch.int64)
    col = lambda t: t.view(-1, 1, 1, 1).to(device)
    return Sequences(
        nb, sbq, sbk, cq[-1], ck[-1], mask,
        col(torch.tensor(pq, dtype=torch.int32)), col(torch.tensor(pk, dtype=torch.int32)),
        col(cq_t * (hq * d)), col(ck_t * (hkv * d)), col(cq_t * hq),
    )


def _handle(cudnn, device: torch.device):
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _HANDLES:
        with torch.cuda.device(idx):
            _HANDLES[idx] = cudnn.create_handle()
    return _HANDLES[idx]


def _build_plans(g, cudnn):
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()


class _Graphs:
    """Forward and backward graphs of one bucket (see :func:`graphs_for` for the key)."""

    def __init__(self, key, device):
        _, nb, sbq, sbk, tq, tk, hq, hkv, d, dtype, scale, mask = key
        self.total_q, self.total_k = tq, tk
        cudnn = _cudnn()
        self.cudnn = cudnn
        self.handle = _handle(cudnn, device)
        io = {torch.bfloat16: cudnn.data_type.BFLOAT16, torch.float16: cudnn.data_type.HALF}[dtype]
        f32, i32, i64 = cudnn.data_type.FLOAT, cudnn.data_type.INT32, cudnn.data_type.INT64

        def graph():
            return cudnn.pygraph(io_data_type=io, intermediate_data_type=f32,
                                 compute_data_type=f32, handle=self.handle)

        def inputs(g, *, backward):
            ts = {}
            for name in ("seq_q", "seq_kv"):
                ts[name] = g.tensor(name=name, dim=[nb, 1, 1, 1], stride=[1, 1, 1, 1],
                                    data_type=i32)
            for name in ("off_q", "off_k", "off_v", "off_o", "off_s"):
                ts[name] = g.tensor(name=name, dim=[nb + 1, 1, 1, 1], stride=[1, 1, 1, 1],
                                    data_type=i64)
            for name, h, sb, off in (("q", hq, sbq, "off_q"), ("k", hkv, sbk, "off_k"),
                                     ("v", hkv, sbk, "off_v")) + (
                    (("o", hq, sbq, "off_o"), ("do", hq, sbq, "off_o")) if backward else ()):
                ts[name] = _ragged(g, name, nb, sb, h, d, io, ts[off])
            return ts

        stats_dim, stats_stride = [nb, hq, sbq, 1], [sbq * hq, 1, hq, 1]
        common = dict(attn_scale=scale, use_padding_mask=True, use_causal_mask=mask == "causal")

        g = graph()
        t = inputs(g, backward=False)
        o, st = g.sdpa(name="sdpa", q=t["q"], k=t["k"], v=t["v"], generate_stats=True,
                       seq_len_q=t["seq_q"], seq_len_kv=t["seq_kv"], **common)
        _output(o, nb, sbq, hq, d, t["off_o"])
        st.set_output(True).set_data_type(f32).set_dim(stats_dim).set_stride(stats_stride)
        st.set_ragged_offset(t["off_s"])
        _build_plans(g, cudnn)
        self.fwd, self.fwd_t = g, dict(t, o=o, stats=st)
        self.fwd_ws = g.get_workspace_size()

        g = graph()
        t = inputs(g, backward=True)
        st = g.tensor(name="stats", dim=stats_dim, stride=stats_stride, data_type=f32)
        st.set_ragged_offset(t["off_s"])
        dq, dk, dv = g.sdpa_backward(
            name="sdpa_bwd", q=t["q"], k=t["k"], v=t["v"], o=t["o"], dO=t["do"], stats=st,
            seq_len_q=t["seq_q"], seq_len_kv=t["seq_kv"],
            max_total_seq_len_q=tq, max_total_seq_len_kv=tk, **common,
        )
        for x, h, sb, off in ((dq, hq, sbq, "off_q"), (dk, hkv, sbk, "off_k"), (dv, hkv, sbk, "off_v")):
            _output(x, nb, sb, h, d, t[off])
        _build_plans(g, cudnn)
        self.bwd, self.bwd_t = g, dict(t, stats=st, dq=dq, dk=dk, dv=dv)
        self.bwd_ws = g.get_workspace_size()

    def _run(self, g, tensors, ws_size, bind, device):
        stream = torch.cuda.current_stream(device).cuda_stream
        self.cudnn.set_stream(handle=self.handle, stream=stream)
        ws = torch.empty(max(1, ws_size), dtype=torch.uint8, device=device)
        g.execute({tensors[n]: t for n, t in bind.items()}, ws, handle=self.handle)

    @staticmethod
    def _lengths(seqs: Sequences) -> dict:
        return dict(seq_q=seqs.seq_q, seq_kv=seqs.seq_kv, off_q=seqs.off_q, off_k=seqs.off_kv,
                    off_v=seqs.off_kv, off_o=seqs.off_q, off_s=seqs.off_s)

    def forward(self, seqs: Sequences, q, k, v):
        o = torch.empty_like(q)
        stats = torch.empty(q.shape[0], q.shape[1], 1, dtype=torch.float32, device=q.device)
        self._run(self.fwd, self.fwd_t, self.fwd_ws,
                  dict(q=q, k=k, v=v, o=o, stats=stats, **self._lengths(seqs)), q.device)
        return o, stats

    def backward(self, seqs: Sequences, q, k, v, o, stats, do):
        # room up to the bucketed totals the graph was told, should cuDNN write that far
        room = lambda t, n: t.new_empty((max(n, t.shape[0]),) + tuple(t.shape[1:]))[: t.shape[0]]
        dq, dk, dv = room(q, self.total_q), room(k, self.total_k), room(v, self.total_k)
        self._run(self.bwd, self.bwd_t, self.bwd_ws, dict(
            q=q, k=k, v=v, o=o, do=do, stats=stats, dq=dq, dk=dk, dv=dv, **self._lengths(seqs),
        ), q.device)
        return dq, dk, dv


def _ragged(g, name, nb, sb, h, d, dtype, off):
    t = g.tensor(name=name, dim=[nb, h, sb, d], stride=[sb * h * d, d, h * d, 1], data_type=dtype)
    t.set_ragged_offset(off)
    return t


def _output(t, nb, sb, h, d, off):
    t.set_output(True).set_dim([nb, h, sb, d]).set_stride([sb * h * d, d, h * d, 1])
    t.set_ragged_offset(off)


def graph_key(seqs: Sequences, hq, hkv, d, dtype, scale, device) -> tuple:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return (idx, seqs.nb, seqs.sbq, seqs.sbk, bucket(seqs.alloc_q, TOKEN_ALIGN),
            bucket(seqs.alloc_k, TOKEN_ALIGN), hq, hkv, d, dtype, float(scale), seqs.mask)


def graphs_for(seqs: Sequences, hq, hkv, d, dtype, scale, device, *,
               cache_size: int = 64) -> _Graphs:
    key = graph_key(seqs, hq, hkv, d, dtype, scale, device)
    with _LOCK:
        g = _GRAPHS.get(key)
        if g is not None:
            _GRAPHS.move_to_end(key)
            return g
        try:
            g = _Graphs(key, device)
        except RuntimeError as e:  # MISSING (import) stays as it is
            if str(e).startswith(MISSING):
                raise
            raise GraphBuildError(f"cuDNN THD attention graphs for {key[1:9]} failed to build: "
                                  f"{type(e).__name__}: {e}") from e
        except Exception as e:  # noqa: BLE001 - cudnnGraphNotSupportedError etc.
            raise GraphBuildError(f"cuDNN THD attention graphs for {key[1:9]} failed to build: "
                                  f"{type(e).__name__}: {e}") from e
        _GRAPHS[key] = g
        while len(_GRAPHS) > max(1, cache_size):
            _GRAPHS.popitem(last=False)
    return g


class ThdAttention(torch.autograd.Function):
    """Packed q ``[Tq, hq, d]``, k/v ``[Tk, hkv, d]`` (padded to the allocations)."""

    @staticmethod
    def forward(ctx, q, k, v, seqs, graphs):
        o, stats = graphs.forward(seqs, q, k, v)
        ctx.save_for_backward(q, k, v, o, stats)
        ctx.seqs, ctx.graphs = seqs, graphs
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, stats = ctx.saved_tensors
        dq, dk, dv = ctx.graphs.backward(ctx.seqs, q, k, v, o, stats, do.contiguous())
        return dq, dk, dv, None, None
