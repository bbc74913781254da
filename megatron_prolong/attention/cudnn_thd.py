"""cuDNN fused attention on packed documents (THD) through cudnn-frontend's Python graph API.

One forward and one backward cuDNN SDPA launch for a whole packed row (all rows, flattened):
every document is one "sequence" of a ragged batch (ragged offsets into the packed Q/K/V/O,
per-sequence lengths, causal mask within each sequence, padding mask beyond its length). This is
the kernel family Transformer Engine's THD path uses, without TE.

Graphs do not depend on the document lengths, only on their bucketed count and maximum: the
number of documents is padded up to a power of two (:data:`DOC_BUCKET_MIN` at least) with
zero-length sequences, the maximum length to a power of two (:data:`SEQ_BUCKET_MIN` at least),
so layouts of the same token count reuse the graphs of a (count, maximum) bucket; built graphs
are cached per process (:data:`_GRAPHS`).

Needs the ``nvidia-cudnn-frontend`` package (it loads the cuDNN library PyTorch ships); CUDA
only, fp16/bf16, context-parallel size 1. :func:`available` says whether it can be imported.
"""

from __future__ import annotations

import threading

import torch

#: fewest sequences a graph is built for (the document count is padded up to a power of two)
DOC_BUCKET_MIN = 8
#: smallest maximum-length bucket (the longest document is padded up to a power of two)
SEQ_BUCKET_MIN = 128
#: packed token count is padded (zeros, only when needed) to a multiple of this
TOKEN_ALIGN = 64

_GRAPHS: dict = {}
_HANDLES: dict = {}
_LOCK = threading.Lock()
_AVAILABLE: bool | None = None
#: why the backend was switched off in this process (a graph failed to build), or None
DISABLED: str | None = None


class GraphBuildError(RuntimeError):
    """cuDNN could not build (or does not support) the THD attention graphs."""

MISSING = (
    "attention backend 'cudnn' needs the cudnn-frontend Python package "
    "(pip install nvidia-cudnn-frontend; it uses the cuDNN library PyTorch ships); "
    "use backend 'hybrid', 'flex' or 'auto' without it"
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
    asking for backend ``cudnn`` by name still tries it."""
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


def padded_lengths(doc_lengths, *, doc_min: int | None = None, seq_min: int | None = None):
    """(sequence count bucket B, max-length bucket S, lengths padded with zeros to B entries,
    cumulative lengths of B + 1 entries: the trailing ones repeat the token total)."""
    lengths = [int(n) for n in doc_lengths]
    if not lengths or min(lengths) < 0:
        raise ValueError(f"document lengths must be non-empty and >= 0, got {lengths[:8]}")
    nb = bucket(len(lengths), DOC_BUCKET_MIN if doc_min is None else doc_min)
    sb = bucket(max(lengths), SEQ_BUCKET_MIN if seq_min is None else seq_min)
    padded = lengths + [0] * (nb - len(lengths))
    cu = [0]
    for n in padded:
        cu.append(cu[-1] + n)
    return nb, sb, padded, cu


def supports(dtype: torch.dtype, head_dim: int) -> bool:
    return dtype in (torch.bfloat16, torch.float16) and head_dim % 8 == 0 and head_dim <= 128


class _Meta:
    """Device tensors of one layout for given heads: lengths and ragged offsets (in elements)."""

    def __init__(self, lengths, hq, hkv, d, device):
        nb, sb, padded, cu = padded_lengths(lengths)
        self.nb, self.sb = nb, sb
        self.total = cu[-1]
        self.total_alloc = -(-self.total // TOKEN_ALIGN) * TOKEN_ALIGN
        cu_t = torch.tensor(cu, dtype=torch.int64)
        host = {
            "seq": torch.tensor(padded, dtype=torch.int32).view(nb, 1, 1, 1),
            "off_q": (cu_t * (hq * d)).view(nb + 1, 1, 1, 1),
            "off_kv": (cu_t * (hkv * d)).view(nb + 1, 1, 1, 1),
            "off_s": (cu_t * hq).view(nb + 1, 1, 1, 1),
        }
        for name, t in host.items():
            setattr(self, name, t.to(device))


def layout_meta(layout, hq, hkv, d, device) -> _Meta:
    key = ("cudnn_thd", hq, hkv, d, str(device))
    if key not in layout._cache:
        lengths = [
            bnd[i + 1] - bnd[i] for bnd in layout.boundaries() for i in range(len(bnd) - 1)
        ]
        layout._cache[key] = _Meta(lengths, hq, hkv, d, device)
    return layout._cache[key]


def _handle(cudnn, device: torch.device):
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _HANDLES:
        with torch.cuda.device(idx):
            _HANDLES[idx] = cudnn.create_handle()
    return _HANDLES[idx]


def _ragged(g, cudnn, name, nb, sb, h, d, dtype, off):
    t = g.tensor(name=name, dim=[nb, h, sb, d], stride=[sb * h * d, d, h * d, 1], data_type=dtype)
    t.set_ragged_offset(off)
    return t


def _build_plans(g, cudnn):
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()


class _Graphs:
    """Forward and backward graphs of one (B, S, T, heads, dim, dtype, scale) bucket."""

    def __init__(self, nb, sb, total, hq, hkv, d, dtype, scale, device):
        cudnn = _cudnn()
        self.cudnn = cudnn
        self.handle = _handle(cudnn, device)
        io = {torch.bfloat16: cudnn.data_type.BFLOAT16, torch.float16: cudnn.data_type.HALF}[dtype]
        f32, i32, i64 = cudnn.data_type.FLOAT, cudnn.data_type.INT32, cudnn.data_type.INT64

        def graph():
            return cudnn.pygraph(io_data_type=io, intermediate_data_type=f32,
                                 compute_data_type=f32, handle=self.handle)

        def scalars(g):
            ts = {}
            for name in ("seq_q", "seq_kv"):
                ts[name] = g.tensor(name=name, dim=[nb, 1, 1, 1], stride=[1, 1, 1, 1],
                                    data_type=i32)
            for name in ("off_q", "off_k", "off_v", "off_o", "off_s"):
                ts[name] = g.tensor(name=name, dim=[nb + 1, 1, 1, 1], stride=[1, 1, 1, 1],
                                    data_type=i64)
            return ts

        stats_dim, stats_stride = [nb, hq, sb, 1], [sb * hq, 1, hq, 1]
        common = dict(attn_scale=scale, use_causal_mask=True, use_padding_mask=True)

        # forward
        g = graph()
        s = scalars(g)
        q = _ragged(g, cudnn, "q", nb, sb, hq, d, io, s["off_q"])
        k = _ragged(g, cudnn, "k", nb, sb, hkv, d, io, s["off_k"])
        v = _ragged(g, cudnn, "v", nb, sb, hkv, d, io, s["off_v"])
        o, st = g.sdpa(name="sdpa", q=q, k=k, v=v, generate_stats=True,
                       seq_len_q=s["seq_q"], seq_len_kv=s["seq_kv"], **common)
        o.set_output(True).set_dim([nb, hq, sb, d]).set_stride([sb * hq * d, d, hq * d, 1])
        o.set_ragged_offset(s["off_o"])
        st.set_output(True).set_data_type(f32).set_dim(stats_dim).set_stride(stats_stride)
        st.set_ragged_offset(s["off_s"])
        _build_plans(g, cudnn)
        self.fwd, self.fwd_t = g, dict(s, q=q, k=k, v=v, o=o, stats=st)
        self.fwd_ws = g.get_workspace_size()

        # backward
        g = graph()
        s = scalars(g)
        q = _ragged(g, cudnn, "q", nb, sb, hq, d, io, s["off_q"])
        k = _ragged(g, cudnn, "k", nb, sb, hkv, d, io, s["off_k"])
        v = _ragged(g, cudnn, "v", nb, sb, hkv, d, io, s["off_v"])
        o = _ragged(g, cudnn, "o", nb, sb, hq, d, io, s["off_o"])
        do = _ragged(g, cudnn, "do", nb, sb, hq, d, io, s["off_o"])
        st = g.tensor(name="stats", dim=stats_dim, stride=stats_stride, data_type=f32)
        st.set_ragged_offset(s["off_s"])
        dq, dk, dv = g.sdpa_backward(
            name="sdpa_bwd", q=q, k=k, v=v, o=o, dO=do, stats=st,
            seq_len_q=s["seq_q"], seq_len_kv=s["seq_kv"],
            max_total_seq_len_q=total, max_total_seq_len_kv=total, **common,
        )
        for t, h, off in ((dq, hq, "off_q"), (dk, hkv, "off_k"), (dv, hkv, "off_v")):
            t.set_output(True).set_dim([nb, h, sb, d]).set_stride([sb * h * d, d, h * d, 1])
            t.set_ragged_offset(s[off])
        _build_plans(g, cudnn)
        self.bwd, self.bwd_t = g, dict(s, q=q, k=k, v=v, o=o, do=do, stats=st, dq=dq, dk=dk,
                                       dv=dv)
        self.bwd_ws = g.get_workspace_size()

    def _run(self, g, tensors, ws_size, bind, device):
        stream = torch.cuda.current_stream(device).cuda_stream
        self.cudnn.set_stream(handle=self.handle, stream=stream)
        ws = torch.empty(max(1, ws_size), dtype=torch.uint8, device=device)
        g.execute({tensors[n]: t for n, t in bind.items()}, ws, handle=self.handle)

    def forward(self, meta, q, k, v):
        o = torch.empty_like(q)
        stats = torch.empty(q.shape[0], q.shape[1], 1, dtype=torch.float32, device=q.device)
        self._run(self.fwd, self.fwd_t, self.fwd_ws, dict(
            q=q, k=k, v=v, o=o, stats=stats, seq_q=meta.seq, seq_kv=meta.seq, off_q=meta.off_q,
            off_k=meta.off_kv, off_v=meta.off_kv, off_o=meta.off_q, off_s=meta.off_s,
        ), q.device)
        return o, stats

    def backward(self, meta, q, k, v, o, stats, do):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        self._run(self.bwd, self.bwd_t, self.bwd_ws, dict(
            q=q, k=k, v=v, o=o, do=do, stats=stats, dq=dq, dk=dk, dv=dv, seq_q=meta.seq,
            seq_kv=meta.seq, off_q=meta.off_q, off_k=meta.off_kv, off_v=meta.off_kv,
            off_o=meta.off_q, off_s=meta.off_s,
        ), q.device)
        return dq, dk, dv


def graphs_for(meta: _Meta, hq, hkv, d, dtype, scale, device) -> _Graphs:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    key = (idx, meta.nb, meta.sb, meta.total_alloc, hq, hkv, d, dtype, float(scale))
    g = _GRAPHS.get(key)
    if g is None:
        with _LOCK:
            g = _GRAPHS.get(key)
            if g is None:
                try:
                    g = _Graphs(meta.nb, meta.sb, meta.total_alloc, hq, hkv, d, dtype, scale,
                                device)
                except RuntimeError as e:  # MISSING (import) stays as it is
                    if str(e).startswith(MISSING):
                        raise
                    raise GraphBuildError(
                        f"cuDNN THD attention graphs for {key[1:7]} failed to build: "
                        f"{type(e).__name__}: {e}") from e
                except Exception as e:  # noqa: BLE001 - cudnnGraphNotSupportedError etc.
                    raise GraphBuildError(
                        f"cuDNN THD attention graphs for {key[1:7]} failed to build: "
                        f"{type(e).__name__}: {e}") from e
                _GRAPHS[key] = g
    return g


class _ThdAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, meta, graphs):
        o, stats = graphs.forward(meta, q, k, v)
        ctx.save_for_backward(q, k, v, o, stats)
        ctx.meta, ctx.graphs = meta, graphs
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, stats = ctx.saved_tensors
        dq, dk, dv = ctx.graphs.backward(ctx.meta, q, k, v, o, stats, do.contiguous())
        return dq, dk, dv, None, None


def thd_attention(q, k, v, layout, scale):
    """q ``[s, b, hq, d]``, k/v ``[s, b, hkv, d]`` (CP = 1): causal attention within each
    document of ``layout``; returns ``[s, b, hq, d]``."""
    if q.device.type != "cuda":
        raise RuntimeError("attention backend 'cudnn' runs on CUDA only; use 'reference' or "
                           "'auto' on CPU")
    s, b, hq, d = q.shape
    hkv = k.shape[2]
    if not supports(q.dtype, d):
        raise ValueError(f"attention backend 'cudnn' needs fp16/bf16 and head dim <= 128, "
                         f"a multiple of 8; got {q.dtype}, {d}")
    meta = layout_meta(layout, hq, hkv, d, q.device)
    graphs = graphs_for(meta, hq, hkv, d, q.dtype, scale, q.device)
    flat = lambda t: t.transpose(0, 1).reshape(b * s, t.shape[2], d).contiguous()
    qf, kf, vf = flat(q), flat(k), flat(v)
    pad = meta.total_alloc - meta.total
    if pad:
        qf, kf, vf = (torch.cat([t, t.new_zeros(pad, t.shape[1], d)]) for t in (qf, kf, vf))
    out = _ThdAttention.apply(qf, kf, vf, meta, graphs)
    if pad:
        out = out[: meta.total]
    return out.view(b, s, hq, d).transpose(0, 1)
