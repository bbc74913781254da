"""Backend ``cudnn`` (cuDNN THD attention through cudnn-frontend): the CPU-testable parts.

The kernels themselves need a GPU and the package; tools/bench_attention.py checks them against
the reference backend on the GPU machine (docs/benchmarks.md).
"""

import sys

import pytest
import torch

from megatron_prolong.attention import DocumentLayout, document_attention, resolve_backend
from megatron_prolong.attention import core, cudnn_thd


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
    nb, sb, padded, cu = cudnn_thd.padded_lengths([64] * 9)
    assert (nb, sb, len(padded), len(cu)) == (16, 128, 16, 17)
    with pytest.raises(ValueError):
        cudnn_thd.padded_lengths([])


def test_layout_meta_offsets_and_graph_reuse_key():
    """Ragged offsets are the cumulative lengths in elements of each tensor (THD: tokens x heads
    x dim; stats: tokens x heads); two layouts with the same (count, maximum) buckets share
    their graph key."""
    hq, hkv, d = 4, 2, 8
    lay = DocumentLayout.from_lengths([[3, 1, 60], [64]])  # b = 2: rows flattened
    m = cudnn_thd.layout_meta(lay, hq, hkv, d, torch.device("cpu"))
    assert (m.nb, m.sb, m.total, m.total_alloc) == (8, 128, 128, 128)
    cu = torch.tensor([0, 3, 4, 64, 128, 128, 128, 128, 128])
    assert m.seq.view(-1).tolist() == [3, 1, 60, 64, 0, 0, 0, 0]
    assert m.seq.dtype == torch.int32 and tuple(m.seq.shape) == (8, 1, 1, 1)
    assert torch.equal(m.off_q.view(-1), cu * hq * d)
    assert torch.equal(m.off_kv.view(-1), cu * hkv * d)
    assert torch.equal(m.off_s.view(-1), cu * hq)
    assert m.off_q.dtype == torch.int64 and tuple(m.off_q.shape) == (9, 1, 1, 1)
    assert cudnn_thd.layout_meta(lay, hq, hkv, d, torch.device("cpu")) is m  # cached
    other = cudnn_thd.layout_meta(DocumentLayout.from_lengths([[10, 50, 4], [30, 34]]), hq, hkv,
                                  d, torch.device("cpu"))
    assert (other.nb, other.sb, other.total_alloc) == (m.nb, m.sb, m.total_alloc)
    odd = cudnn_thd.layout_meta(DocumentLayout.from_lengths([[7, 93]]), hq, hkv, d,
                                torch.device("cpu"))
    assert (odd.total, odd.total_alloc) == (100, 128)  # padded to TOKEN_ALIGN


def test_auto_picks_cudnn_when_available(monkeypatch):
    cuda = torch.device("cuda")  # only the device type is looked at
    multi = DocumentLayout.from_lengths([[10, 54]])
    one = DocumentLayout.single_document(1, 64)
    monkeypatch.setattr(cudnn_thd, "DISABLED", None)
    monkeypatch.setattr(cudnn_thd, "_AVAILABLE", True)
    assert core.AUTO_MULTI_DOC_BACKEND == "cudnn"
    assert resolve_backend("auto", cuda, multi) == "cudnn"
    assert resolve_backend("auto", cuda, multi, dtype=torch.bfloat16, head_dim=128) == "cudnn"
    assert resolve_backend("auto", cuda, one) == "sdpa"  # one document: per-row SDPA
    assert resolve_backend("auto", cuda, multi, cp_size=2) == "flex"
    # inputs cuDNN's THD attention does not take: the fallback
    # float32 (the demo on a GPU): flex, since the fused packed kernels take 16-bit inputs only
    assert resolve_backend("auto", cuda, multi, dtype=torch.float32, head_dim=128) == "flex"
    assert resolve_backend("auto", cuda, multi, dtype=torch.bfloat16, head_dim=256) == "hybrid"
    assert resolve_backend("auto", torch.device("cpu"), multi) == "reference"
    monkeypatch.setattr(cudnn_thd, "_AVAILABLE", False)
    assert resolve_backend("auto", cuda, multi) == "hybrid"
    monkeypatch.setattr(cudnn_thd, "_AVAILABLE", True)
    monkeypatch.setattr(cudnn_thd, "DISABLED", "a graph failed to build")
    assert resolve_backend("auto", cuda, multi) == "hybrid"
    assert resolve_backend("cudnn", cuda, multi) == "cudnn"  # by name: as asked


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


def test_cp_runs_the_cp_path():
    """Under CP the backend runs flex on CUDA, the reference off it (as hybrid does)."""
    from megatron_prolong.attention import attend_gathered, shard_zigzag

    lay = DocumentLayout.from_lengths([[10, 54]])
    g = torch.Generator().manual_seed(3)
    q = torch.randn(64, 1, 4, 8, dtype=torch.float64, generator=g)
    k = torch.randn(64, 1, 2, 8, dtype=torch.float64, generator=g)
    v = torch.randn(64, 1, 2, 8, dtype=torch.float64, generator=g)
    for r in range(2):
        ql = shard_zigzag(q, 0, 2, r)
        got = attend_gathered(ql, k, v, lay, cp_size=2, cp_rank=r, backend="cudnn")
        want = attend_gathered(ql, k, v, lay, cp_size=2, cp_rank=r, backend="reference")
        assert torch.equal(got, want)


def test_supports():
    assert cudnn_thd.supports(torch.bfloat16, 128)
    assert cudnn_thd.supports(torch.float16, 64)
    assert not cudnn_thd.supports(torch.float32, 128)
    assert not cudnn_thd.supports(torch.bfloat16, 100)
