"""``cudnn``: cuDNN's fused THD attention (:mod:`.cudnn_thd`), one forward and one backward
launch per call: at CP = 1 the documents, under CP the square and rectangle calls of
:mod:`..ring`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import cudnn_thd
from ..config import AttentionConfig
from ..layout import DocumentLayout
from ..ring import Part
from ..split import CPSplit, pieces


@dataclass(frozen=True)
class CudnnPlan:
    part: Part  # the documents (CP = 1), causal, over the flat stream
    kernel: "CudnnBackend"


class CudnnBackend:
    name = "cudnn"
    #: rows the ring's rectangle K/V buffers are rounded up to (no padding copy here)
    key_align = cudnn_thd.TOKEN_ALIGN

    def __init__(self, doc_min: int = AttentionConfig.cudnn_doc_bucket_min,
                 seq_min: int = AttentionConfig.cudnn_seq_bucket_min,
                 cache_size: int = AttentionConfig.cudnn_graph_cache):
        self.doc_min, self.seq_min, self.cache_size = int(doc_min), int(seq_min), int(cache_size)

    def plan_key(self, cfg: AttentionConfig) -> tuple:
        return (cfg.cudnn_doc_bucket_min, cfg.cudnn_seq_bucket_min, cfg.cudnn_graph_cache)

    def for_config(self, cfg: AttentionConfig) -> "CudnnBackend":
        return CudnnBackend(cfg.cudnn_doc_bucket_min, cfg.cudnn_seq_bucket_min, cfg.cudnn_graph_cache)

    def plan(self, layout: DocumentLayout, split: CPSplit, rank: int, cfg: AttentionConfig) -> CudnnPlan:
        if split.cp_size > 1:
            raise ValueError("under CP the cudnn kernel runs as the square and rectangle calls "
                             "of attention/ring.py")
        n = tuple(p.q1 - p.q0 for p in pieces(layout, split, rank))
        return CudnnPlan(Part(n, n, n, True), self.for_config(cfg))

    def run(self, plan: CudnnPlan, q, k, v, scale: float) -> torch.Tensor:
        self.check(q, k)
        s_local, b, hq, d = q.shape
        flat = lambda t: t.transpose(0, 1).reshape(-1, t.shape[2], d)
        qf, kf, vf = flat(q), flat(k), flat(v)
        seqs, graphs = plan.kernel.graphs(plan.part, qf, kf, scale)
        qf, kf, vf = (_pad(t.contiguous(), seqs.alloc_q) for t in (qf, kf, vf))
        out = cudnn_thd.ThdAttention.apply(qf, kf, vf, seqs, graphs)[: seqs.total_q]
        return out.view(b, s_local, hq, d).transpose(0, 1)

    @staticmethod
    def check(q: torch.Tensor, k: torch.Tensor) -> None:
        if q.device.type != "cuda":
            raise RuntimeError("attention kernel 'cudnn' runs on CUDA only; use 'reference' or "
                               "'auto' on CPU")
        if not cudnn_thd.available():
            raise RuntimeError(cudnn_thd.MISSING)
        if not cudnn_thd.supports(q.dtype, q.shape[-1]):
            raise ValueError(f"attention kernel 'cudnn' needs fp16/bf16 and head dim <= 128, "
                             f"a multiple of 8; got {q.dtype}, {q.shape[-1]}")

    def sequences(self, part: Part, hq: int, hkv: int, d: int, device) -> cudnn_thd.Sequences:
        """The call's ragged batch (cached on the part)."""
        key = (hq, hkv, d, str(device), self.doc_min, self.seq_min)
        if key not in part._cache:
            part._cache[key] = cudnn_thd.sequences(
                part.q_lengths, part.k_lengths, hq, hkv, d, device, doc_min=self.doc_min,
                seq_min=self.seq_min, mask="causal" if part.causal else "none",
                q_spans=part.q_spans)
        return part._cache[key]

    def graphs(self, part: Part, q: torch.Tensor, k: torch.Tensor, scale: float):
        """The call's ragged batch and its graphs (built on first use; GraphBuildError)."""
        hq, d, hkv = q.shape[1], q.shape[2], k.shape[1]
        seqs = self.sequences(part, hq, hkv, d, q.device)
        return seqs, cudnn_thd.graphs_for(seqs, hq, hkv, d, q.dtype, scale, q.device,
                                          cache_size=self.cache_size)

    # ------------------------------------------------------------------ partial calls (ring)
    def partial_forward(self, part: Part, q, k, v, scale: float):
        seqs, graphs = self.graphs(part, q, k, scale)
        n = q.shape[0]
        o, stats = graphs.forward(seqs, _pad(q, seqs.alloc_q), *(_pad(t, seqs.alloc_k) for t in (k, v)))
        return o[:n], stats.view(stats.shape[0], -1)[:n]

    def partial_backward(self, part: Part, q, k, v, o, lse, do, scale: float):
        seqs, graphs = self.graphs(part, q, k, scale)
        n, m = q.shape[0], k.shape[0]
        pq = lambda t: _pad(t, seqs.alloc_q)
        dq, dk, dv = graphs.backward(seqs, pq(q), _pad(k, seqs.alloc_k), _pad(v, seqs.alloc_k),
                                     pq(o), pq(lse.unsqueeze(-1)), pq(do))
        return dq[:n], dk[:m], dv[:m]


def _pad(t: torch.Tensor, n: int) -> torch.Tensor:
    return t if t.shape[0] == n else torch.cat([t, t.new_zeros((n - t.shape[0],) + t.shape[1:])])
