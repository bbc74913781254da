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
    spread_split,
    zigzag_split,
)
from megatron_prolong.attention.backends import cudnn_thd
from megatron_prolong.attention.backends import cached_plan
from megatron_prolong.attention.backends.cudnn import CudnnBackend
from megatron_prolong.attention.dispatch import BACKENDS
from megatron_prolong.attention.ring import ring_plan
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
    m = plan.kernel.sequences(plan.part, hq, hkv, d, "cpu")
    assert (m.nb, m.sbq, m.sbk, m.total_q, m.alloc_q, m.mask) == (8, 128, 128, 128, 128, "causal")
    cu = torch.tensor([0, 3, 4, 64, 128, 128, 128, 128, 128])
    assert m.seq_q.view(-1).tolist() == [3, 1, 60, 64, 0, 0, 0, 0] == m.seq_kv.view(-1).tolist()
    assert m.seq_q.dtype == torch.int32 and tuple(m.seq_q.shape) == (8, 1, 1, 1)
    assert torch.equal(m.off_q.view(-1), cu * hq * d)
    assert torch.equal(m.off_kv.view(-1), cu * hkv * d)
    assert torch.equal(m.off_s.view(-1), cu * hq)
    assert plan.kernel.sequences(plan.part, hq, hkv, d, "cpu") is m  # cached
    other_lay = DocumentLayout.from_lengths([[10, 50, 4], [30, 34]])
    other_plan = CudnnBackend().plan(other_lay, zigzag_split(other_lay, 1), 0, CFG)
    other = other_plan.kernel.sequences(other_plan.part, hq, hkv, d, "cpu")
    key = lambda x: cudnn_thd.graph_key(x, hq, hkv, d, torch.bfloat16, 0.1, torch.device("cuda", 0))
    assert key(other) == key(m)
    odd_lay = DocumentLayout.from_lengths([[7, 93]])
    odd_plan = CudnnBackend().plan(odd_lay, zigzag_split(odd_lay, 1), 0, CFG)
    odd = odd_plan.kernel.sequences(odd_plan.part, hq, hkv, d, "cpu")
    assert (odd.total_q, odd.alloc_q) == (100, 128)  # padded to TOKEN_ALIGN


def test_graph_keys_bucket_the_key_totals():
    """Under CP the rectangles' key count changes with nearly every batch: the graph key holds
    it rounded up to a power of two, so a stream of different rows shares a few graphs."""
    seq = lambda total_k: cudnn_thd.sequences([64, 64], [total_k - 10, 10], 4, 2, 8, "cpu",
                                              doc_min=8, seq_min=128, mask="none")
    key = lambda x: cudnn_thd.graph_key(x, 4, 2, 8, torch.bfloat16, 0.1, torch.device("cuda", 0))
    assert len({key(seq(t)) for t in range(1100, 2049, 37)}) == 1  # all within (1024, 2048]
    assert key(seq(2100)) != key(seq(2000))
    with pytest.raises(ValueError, match="as many keys as queries"):
        cudnn_thd.sequences([4], [8], 1, 1, 1, "cpu", doc_min=1, seq_min=1, mask="causal")


def test_graph_cache_is_bounded(monkeypatch):
    """Least recently used graphs go first beyond ``cudnn_graph_cache``."""
    built = []

    class FakeGraphs:
        def __init__(self, key, device):
            built.append(key)

    monkeypatch.setattr(cudnn_thd, "_Graphs", FakeGraphs)
    monkeypatch.setattr(cudnn_thd, "_GRAPHS", cudnn_thd.OrderedDict())
    dev = torch.device("cuda", 0)
    seqs = [cudnn_thd.sequences([n], [n], 1, 1, 8, "cpu", doc_min=1, seq_min=1)
            for n in (100, 200, 400, 800)]
    get = lambda i: cudnn_thd.graphs_for(seqs[i], 1, 1, 8, torch.bfloat16, 0.1, dev, cache_size=2)
    get(0), get(1), get(0), get(2)  # 1 is the least recently used when 2 arrives
    assert len(cudnn_thd._GRAPHS) == 2 and len(built) == 3
    get(0)
    assert len(built) == 3  # still cached
    get(1)
    assert len(built) == 4  # was evicted, built again


@pytest.mark.parametrize("rows", [[[64]], [[10, 54], [30, 1, 33]], [[1] * 5 + [40, 19]]])
@pytest.mark.parametrize("cp,kind", [(2, "zigzag"), (4, "zigzag"), (2, "balanced"), (4, "balanced"),
                                     (2, "spread"), (4, "spread")])
def test_cp_square_and_rectangle_calls_follow_the_rule(rows, cp, kind):
    """Under CP, what cuDNN is told in the two calls, read back position by position, is the rule
    itself: every local query (row, position p) sees, in the causal square on the rank's own
    tokens (top-left aligned) plus the unmasked rectangle against the gathered keys, exactly the
    keys of its document up to p, each once."""
    lay = DocumentLayout.from_lengths(rows)
    s = lay.seq_len
    split = {"zigzag": lambda: zigzag_split(lay, cp), "balanced": lambda: balanced_split(lay, cp),
             "spread": lambda: spread_split(lay, cp, min_chunk=2)}[kind]()
    kernel = CudnnBackend()
    for r in range(cp):
        plan = ring_plan(lay, split, r)
        local = split.indices(r)  # [b, s_local] global positions
        flat_q = [(row, int(p)) for row in range(lay.batch) for p in local[row]]
        seen = {q: [] for q in flat_q}
        sq = kernel.sequences(plan.square, 1, 1, 1, "cpu")  # one head of dim 1: token offsets
        assert sq.mask == "causal"
        for i in range(len(plan.square.q_lengths)):
            n, q0, k0 = int(sq.seq_q[i]), int(sq.off_q[i]), int(sq.off_kv[i])
            assert int(sq.seq_kv[i]) == n and q0 == k0  # the rank's own tokens
            for j in range(n):
                row, p = flat_q[q0 + j]
                seen[(row, p)] += [row * s + flat_q[k0 + t][1] for t in range(j + 1)]
        if plan.rect is not None:
            rc = kernel.sequences(plan.rect, 1, 1, 1, "cpu")
            assert rc.mask == "none"
            keys = plan.rect_natural.tolist()
            for i in range(len(plan.rect.q_lengths)):
                n, L = int(rc.seq_q[i]), int(rc.seq_kv[i])
                q0, k0 = int(rc.off_q[i]), int(rc.off_kv[i])
                for j in range(n):
                    seen[flat_q[q0 + j]] += keys[k0:k0 + L]
            assert int(rc.off_kv[-1]) == len(keys) == plan.rect_gathered.numel()
        for (row, p), visible in seen.items():
            mask = dense_mask(rows[row])[p]
            assert sorted(visible) == [row * s + j for j in range(s) if mask[j]], (row, p)
        # the gathered stream is rank-major: the position of (row, p) there holds that token
        gathered = torch.cat([split.indices(o) + torch.arange(lay.batch).unsqueeze(1) * s
                              for o in range(cp)], dim=0).reshape(-1)
        assert torch.equal(gathered[plan.rect_gathered], plan.rect_natural)


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
    split = zigzag_split(lay, 1)
    be = CudnnBackend()
    p = cached_plan(be, lay, split, 0, CFG)
    assert cached_plan(be, lay, split, 0, AttentionConfig()) is p
    assert cached_plan(be, lay, split, 0, AttentionConfig(cudnn_seq_bucket_min=256)) is not p
    cp2 = zigzag_split(lay, 2)
    assert ring_plan(lay, cp2, 0) is ring_plan(lay, cp2, 0) is not ring_plan(lay, cp2, 1)


def test_supports():
    assert cudnn_thd.supports(torch.bfloat16, 128)
    assert cudnn_thd.supports(torch.float16, 64)
    assert not cudnn_thd.supports(torch.float32, 128)
    assert not cudnn_thd.supports(torch.bfloat16, 100)
