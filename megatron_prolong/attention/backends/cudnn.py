"""``cudnn``: cuDNN's fused THD attention (:mod:`..cudnn_thd`), one forward and one backward
launch per call, at CP = 1 (the documents) and under CP (the rank's pieces, bottom-right)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import cudnn_thd
from ..config import AttentionConfig
from ..layout import DocumentLayout
from ..split import CPSplit, pieces


@dataclass(frozen=True)
class CudnnPlan:
    q_lengths: tuple[int, ...]  # per sequence (document or piece), in local token order
    kv_lengths: tuple[int, ...]
    #: under CP, the flat ``[b * s]`` key positions of the pieces back to back (None at CP = 1:
    #: the documents' keys are the tokens themselves)
    key_index: torch.Tensor | None
    doc_min: int
    seq_min: int
    _sequences: dict = field(default_factory=dict, repr=False, compare=False)

    def sequences(self, hq: int, hkv: int, d: int, device) -> cudnn_thd.Sequences:
        key = (hq, hkv, d, str(device))
        if key not in self._sequences:
            self._sequences[key] = cudnn_thd.sequences(
                self.q_lengths, self.kv_lengths, hq, hkv, d, device, doc_min=self.doc_min,
                seq_min=self.seq_min)
        return self._sequences[key]


class CudnnBackend:
    name = "cudnn"

    def plan_key(self, cfg: AttentionConfig) -> tuple:
        return (cfg.cudnn_doc_bucket_min, cfg.cudnn_seq_bucket_min)

    def plan(self, layout: DocumentLayout, split: CPSplit, rank: int, cfg: AttentionConfig) -> CudnnPlan:
        ps = pieces(layout, split, rank)
        index = None
        if split.cp_size > 1:
            s = layout.seq_len
            index = torch.cat([torch.arange(p.row * s + p.k0, p.row * s + p.k1) for p in ps])
            index = index.to(layout.device)
        return CudnnPlan(tuple(p.q1 - p.q0 for p in ps), tuple(p.k1 - p.k0 for p in ps), index,
                         int(cfg.cudnn_doc_bucket_min), int(cfg.cudnn_seq_bucket_min))

    def run(self, plan: CudnnPlan, q, k, v, scale: float) -> torch.Tensor:
        if q.device.type != "cuda":
            raise RuntimeError("attention kernel 'cudnn' runs on CUDA only; use 'reference' or "
                               "'auto' on CPU")
        if not cudnn_thd.available():
            raise RuntimeError(cudnn_thd.MISSING)
        s_local, b, hq, d = q.shape
        hkv = k.shape[2]
        if not cudnn_thd.supports(q.dtype, d):
            raise ValueError(f"attention kernel 'cudnn' needs fp16/bf16 and head dim <= 128, "
                             f"a multiple of 8; got {q.dtype}, {d}")
        seqs = plan.sequences(hq, hkv, d, q.device)
        graphs = cudnn_thd.graphs_for(seqs, hq, hkv, d, q.dtype, scale, q.device)
        flat = lambda t: t.transpose(0, 1).reshape(-1, t.shape[2], d)
        qf, kf, vf = flat(q), flat(k), flat(v)
        if plan.key_index is not None:
            kf, vf = kf.index_select(0, plan.key_index), vf.index_select(0, plan.key_index)
        qf = _pad(qf.contiguous(), seqs.alloc_q)
        kf, vf = (_pad(t.contiguous(), seqs.alloc_k) for t in (kf, vf))
        out = cudnn_thd.ThdAttention.apply(qf, kf, vf, seqs, graphs)[: seqs.total_q]
        return out.view(b, s_local, hq, d).transpose(0, 1)


def _pad(t: torch.Tensor, n: int) -> torch.Tensor:
    return t if t.shape[0] == n else torch.cat([t, t.new_zeros((n - t.shape[0],) + t.shape[1:])])
