"""Kernel ``cudnn`` (cuDNN THD attention through cudnn-frontend): the CPU-testable parts, i.e.
the bookkeeping of the sequences it hands to cuDNN, checked against a plain statement of the
rule. The kernel itself: tests/gpu/test_cudnn_attention.py."""

import sys

import pytest
import torch

from megatron_prolong.attention import (
    AttentionConfig,
    DocumentLayout,
    balanced_split,
    document_attention,
    resolve_backend,
    zigzag_split,
)
from megatron_prolong.attention import cudnn_thd
from megatron_prolong.attention.backends import cached_plan
from megatron_prolong.attention.backends.cudnn import CudnnBackend
from megatron_prolong.attention.dispatch import BACKENDS
from attn_dense_ref import dense_mask

CFG = AttentionConfig()


@pytest.mark.parametrize("n,minimum,want", [
    (1, 8, 8), (8, 8, 8), (9, 8, 16), (31, 8, 32), (32, 8, 32), (33, 8, 64),
    (0, 1, 1), (1, 1, 1), (65536, 128, 65536), (12000, 128, 16384), (100, 128, 128),
])
def test_bucket(n, minimum, want):
    assert cudnn_thd.bucket(n, minimum) == want


def test_padded_lengths():
    nb, sb, padded, cu = cudnn_thd.padded_lengths([5, 1, 300, 2], doc_min=8, seq_min=128)
    assert (nb, sb) == (8, 512)
    assert padded == [5, 1, 300, 2, 0, 0, 0, 0]  # zero-length sequences fill the bucket
    assert cu == [0, 5, 6, 306, 308, 308, 308, 308, 308]  # trailing offsets = token total
    with pytest.raises(ValueError):
        cudnn_thd.padded_lengths([], doc_min=8, seq_min=128)


def test_cp1_sequences_are_the_documents():
    """Ragged offsets are the cumulative lengths in elements of each tensor (THD: tokens x heads
    x dim; stats: tokens x heads); two layouts with the same buckets share their graph key."""
    hq, hkv, d = 4, 2, 8
    lay = DocumentLayout.from_lengths([[3, 1, 60], [64]])  # b = 2: rows flattened
    plan = CudnnBackend().plan(lay, zigzag_split(lay, 1), 0, CFG)
    assert plan.key_index is None  # the documents' keys are the tokens themselves
    m = plan.sequences(hq, hkv, d, "cpu")
    assert (m.nb, m.sbq, m.sbk, m.total_q, m.alloc_q, m.bottom_right) == (8, 128, 128, 128, 128, False)
    cu = torch.tensor([0, 3, 4, 64, 128, 128, 128, 128, 128])
    assert m.seq_q.view(-1).tolist() == [3, 1, 60, 64, 0, 0, 0, 0] == m.seq_kv.view(-1).tolist()
    assert m.seq_q.dtype == torch.int32 and tuple(m.seq_q.shape) == (8, 1, 1, 1)
    assert torch.equal(m.off_q.view(-1), cu * hq * d)
    assert torch.equal(m.off_kv.view(-1), cu * hkv * d)
    assert torch.equal(m.off_s.view(-1), cu * hq)
    assert plan.sequences(hq, hkv, d, "cpu") is m  # cached
    other = CudnnBackend().plan(DocumentLayout.from_lengths([[10, 50, 4], [30, 34]]),
                                zigzag_split(lay, 1), 0, CFG).sequences(hq, hkv, d, "cpu")
    key = lambda x: cudnn_thd.graph_key(x, hq, hkv, d, torch.bfloat16, 0.1, torch.device("cuda", 0))
    assert key(other) == key(m)
    odd = CudnnBackend().plan(DocumentLayout.from_lengths([[7, 93]]), zigzag_split(
        DocumentLayout.from_lengths([[7, 93]]), 1), 0, CFG).sequences(hq, hkv, d, "cpu")
    assert (odd.total_q, odd.alloc_q) == (100, 128)  # padded to TOKEN_ALIGN


@pytest.mark.parametrize("rows", [[[64]], [[10, 54], [30, 1, 33]], [[1] * 5 + [40, 19]]])
@pytest.mark.parametrize("cp,kind", [(2, "zigzag"), (4, "zigzag"), (2, "balanced"), (4, "balanced")])
def test_cp_sequences_follow_the_rule(rows, cp, kind):
    """Under CP, what cuDNN is told, read back position by position, is the rule itself: every
    local query (row, position p) attends, with bottom-right alignment inside its sequence,
    exactly to the keys of its document up to p -- and each sequence's queries and keys are
    where the packed streams say."""
    lay = DocumentLayout.from_lengths(rows)
    s = lay.seq_len
    split = zigzag_split(lay, cp) if kind == "zigzag" else balanced_split(lay, cp, min_chunk=2)
    for r in range(cp):
        plan = CudnnBackend().plan(lay, split, r, CFG)
        m = plan.sequences(1, 1, 1, "cpu")  # one head of dim 1: offsets are token counts
        assert m.bottom_right
        local = split.indices(r)  # [b, s_local] global positions
        flat_q = [(row, int(p)) for row in range(lay.batch) for p in local[row]]
        keys = plan.key_index.tolist()  # flat b * s positions of the packed key stream
        seen = {}
        for i in range(len(plan.q_lengths)):
            n, L = int(m.seq_q[i]), int(m.seq_kv[i])
            q0, k0 = int(m.off_q[i]), int(m.off_kv[i])
            for j in range(n):
                row, p = flat_q[q0 + j]
                visible = [keys[k0 + t] for t in range(L) if t <= L - n + j]  # bottom-right
                seen[(row, p)] = visible
        assert len(seen) == lay.batch * (s // cp) == m.total_q
        for (row, p), visible in seen.items():
            mask = dense_mask(rows[row])[p]
            assert visible == [row * s + j for j in range(s) if mask[j]], (row, p)
        assert m.total_k == len(keys) and int(m.off_kv[-1]) == len(keys)


def test_auto_table(monkeypatch):
    cuda = torch.device("cuda")  # only the device type is looked at
    multi = DocumentLayout.from_lengths([[10, 54]])
    one = DocumentLayout.single_document(1, 64)
    monkeypatch.setattr(cudnn_thd, "DISABLED", None)
    monkeypatch.setattr(cudnn_thd, "_AVAILABLE", True)
    bf16 = dict(dtype=torch.bfloat16, head_dim=128)
    assert resolve_backend("auto", cuda, multi, **bf16) == "cudnn"
    assert resolve_backend("auto", cuda, one, **bf16) == "sdpa"  # one document: one SDPA call
    assert resolve_backend("auto", cuda, multi, cp_size=2, **bf16) == "cudnn"
    assert resolve_backend("auto", cuda, one, cp_size=8, **bf16) == "cudnn"
    # float32 (the demo on a GPU): the fused packed kernels take 16-bit inputs only
    assert resolve_backend("auto", cuda, multi, dtype=torch.float32, head_dim=128) == "flex"
    assert resolve_backend("auto", cuda, multi, dtype=torch.bfloat16, head_dim=256) == "flex"
    assert resolve_backend("auto", torch.device("cpu"), multi, cp_size=2) == "reference"
    monkeypatch.setattr(cudnn_thd, "_AVAILABLE", False)
    assert resolve_backend("auto", cuda, multi, cp_size=2, **bf16) == "flex"
    monkeypatch.setattr(cudnn_thd, "_AVAILABLE", True)
    monkeypatch.setattr(cudnn_thd, "DISABLED", "a graph failed to build")
    assert resolve_backend("auto", cuda, multi, **bf16) == "flex"
    assert resolve_backend("cudnn", cuda, multi) == "cudnn"  # by name: as asked
    assert set(BACKENDS) == {"reference", "sdpa", "flex", "cudnn"}


def test_errors_without_gpu_or_package(monkeypatch):
    lay = DocumentLayout.from_lengths([[10, 54]])
    q = torch.randn(64, 1, 4, 8, dtype=torch.bfloat16)
    k = torch.randn(64, 1, 2, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="CUDA only"):
        document_attention(q, k, k, lay, backend="cudnn")
    monkeypatch.setitem(sys.modules, "cudnn", None)  # `import cudnn` raises ImportError
    with pytest.raises(RuntimeError, match="nvidia-cudnn-frontend"):
        cudnn_thd._cudnn()
    monkeypatch.setattr(cudnn_thd, "_AVAILABLE", None)
    assert cudnn_thd.available() is False


def test_plans_are_cached_per_layout_split_and_config():
    lay = DocumentLayout.from_lengths([[10, 54]])
    split = zigzag_split(lay, 2)
    be = CudnnBackend()
    p = cached_plan(be, lay, split, 0, CFG)
    assert cached_plan(be, lay, split, 0, AttentionConfig()) is p
    assert cached_plan(be, lay, split, 1, CFG) is not p
    assert cached_plan(be, lay, split, 0, AttentionConfig(cudnn_seq_bucket_min=256)) is not p


def test_supports():
    assert cudnn_thd.supports(torch.bfloat16, 128)
    assert cudnn_thd.supports(torch.float16, 64)
    assert not cudnn_thd.supports(torch.float32, 128)
    assert not cudnn_thd.supports(torch.bfloat16, 100)
