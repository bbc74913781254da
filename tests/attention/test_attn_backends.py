"""Backends vs the float64 dense-mask oracle on document layouts (single process; CP ranks
emulated by calling the compute step once per rank with the full K/V), with the zigzag and the
balanced CP split."""

import pytest
import torch

from attn_dense_ref import LAYOUTS, S, dense_attention, dense_mask, random_lengths
from megatron_prolong.attention import (
    AttentionConfig,
    DocumentLayout,
    attend_gathered,
    balanced_split,
    spread_split,
    document_attention,
    resolve_backend,
    zigzag_split,
)
from megatron_prolong.attention.backends.flex import block_mask

TOL = 1e-10
HEADS = [(4, 2), (2, 2), (4, 1)]  # (query heads, kv heads): GQA, MHA, MQA
D = 8


def _inputs(b, hq, hkv, seed, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(S, b, h, D, dtype=torch.float64, generator=g).requires_grad_(
        requires_grad
    )
    return mk(hq), mk(hkv), mk(hkv)


def _split(layout, cp, kind):
    # spread with min_chunk 2: the oracle's 64-token rows exercise documents cut over all ranks;
    # balanced (the default): whole documents, documents spread over a few ranks and cut ones
    if kind == "zigzag":
        return zigzag_split(layout, cp)
    return spread_split(layout, cp, min_chunk=2) if kind == "spread" else balanced_split(layout, cp)


def shard(x, split, rank):
    """This rank's tokens of an sbhd tensor."""
    return split.shard(x.transpose(0, 1), rank).transpose(0, 1)


def _run_cp(backend, q, k, v, layout, cp, kind="zigzag", config=None):
    """Every rank's compute with its query share; outputs re-assembled in natural order
    (differentiable: torch.cat of scattered shares)."""
    split = _split(layout, cp, kind)
    outs = [attend_gathered(shard(q, split, r), k, v, layout, split=split, cp_rank=r,
                            backend=backend, config=config) for r in range(cp)]
    full = torch.cat(outs)  # rank-major per row
    if split.uniform:
        return full[split.natural()[0]]
    nat = split.natural()
    return torch.stack([full[nat[row], row] for row in range(full.shape[1])], dim=1)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("backend,cp,kind", [
    ("reference", 1, "zigzag"), ("reference", 2, "zigzag"), ("reference", 4, "zigzag"),
    ("reference", 2, "balanced"), ("reference", 4, "balanced"), ("reference", 8, "balanced"),
    ("reference", 2, "spread"), ("reference", 4, "spread"), ("reference", 8, "spread"),
    ("sdpa", 1, "zigzag"), ("sdpa", 2, "zigzag"), ("sdpa", 4, "balanced"), ("sdpa", 4, "spread"),
])
def test_output_and_grads_match_dense(name, backend, cp, kind):
    rows = LAYOUTS[name]
    layout = DocumentLayout.from_lengths(rows)
    for i, (hq, hkv) in enumerate(HEADS):
        q, k, v = _inputs(len(rows), hq, hkv, seed=100 * cp + i)
        ref = dense_attention(q, k, v, rows)
        go = torch.randn_like(ref)
        gref = torch.autograd.grad(ref, (q, k, v), go)
        out = _run_cp(backend, q, k, v, layout, cp, kind)
        assert out.shape == ref.shape
        assert (out - ref).abs().max().item() < TOL
        got = torch.autograd.grad(out, (q, k, v), go)
        for a, b_, what in zip(got, gref, "qkv"):
            err = (a - b_).abs().max().item()
            assert err < TOL, f"d{what} off by {err}"


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("cp,kind", [(1, "zigzag"), (2, "zigzag"), (4, "zigzag"), (4, "balanced")])
def test_flex_forward_matches_dense(name, cp, kind):
    # flex_attention has no CPU backward in PyTorch 2.11: forward only here (GPU bench checks more)
    rows = LAYOUTS[name]
    layout = DocumentLayout.from_lengths(rows)
    q, k, v = _inputs(len(rows), 4, 2, seed=cp, requires_grad=False)
    ref = dense_attention(q, k, v, rows)
    out = _run_cp("flex", q, k, v, layout, cp, kind)
    assert (out - ref).abs().max().item() < TOL


def test_softmax_scale_and_bf16():
    rows = LAYOUTS["random"]
    layout = DocumentLayout.from_lengths(rows)
    q, k, v = _inputs(2, 4, 2, seed=3, requires_grad=False)
    ref = dense_attention(q, k, v, rows, scale=0.3)
    out = document_attention(q, k, v, layout, backend="reference", softmax_scale=0.3)
    assert (out - ref).abs().max().item() < TOL
    out16 = document_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), layout, softmax_scale=0.3)
    assert out16.dtype == torch.bfloat16
    rel = (out16.double() - ref).norm() / ref.norm()
    assert rel < 1e-2


def test_reference_blocks_bounded():
    """Tiny score budget forces one-query blocks: results unchanged."""
    rows = LAYOUTS["crossing_chunks"]
    layout = DocumentLayout.from_lengths(rows)
    q, k, v = _inputs(1, 4, 2, seed=5)
    ref = dense_attention(q, k, v, rows)
    out = _run_cp("reference", q, k, v, layout, 2, config=AttentionConfig(reference_block_elements=1))
    assert (out - ref).abs().max().item() < TOL
    g1 = torch.autograd.grad(out.sum(), (q, k, v))
    g2 = torch.autograd.grad(ref.sum(), (q, k, v))
    assert max((a - b).abs().max().item() for a, b in zip(g1, g2)) < TOL


@pytest.mark.parametrize("backend", ["reference", "sdpa", "flex"])
def test_no_leakage_between_documents(backend):
    rows = [[5, 20, 3, 36], [30, 34]]
    layout = DocumentLayout.from_lengths(rows)
    q, k, v = _inputs(2, 4, 2, seed=11, requires_grad=False)
    base = _run_cp(backend, q, k, v, layout, 2)
    # change every q, k, v row of document 1 of row 0 (tokens 5..24)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[5:25, 0] = torch.randn_like(t[5:25, 0]) * 5
    out = _run_cp(backend, q2, k2, v2, layout, 2)
    changed = torch.zeros(S, 2, dtype=torch.bool)
    changed[5:25, 0] = True
    assert torch.equal(out[~changed], base[~changed])  # bit-identical elsewhere
    assert (out[changed] - base[changed]).abs().min() > 0  # and the test can see a change


def test_auto_and_errors(monkeypatch):
    from megatron_prolong.attention.backends import cudnn_thd

    monkeypatch.setattr(cudnn_thd, "_AVAILABLE", False)  # without cudnn-frontend
    layout = DocumentLayout.from_lengths([[10, 54]])
    assert resolve_backend("auto", torch.device("cpu"), layout) == "reference"
    one = DocumentLayout.single_document(1, S)
    cuda = torch.device("cuda")  # only the device type is looked at
    assert resolve_backend("auto", cuda, one) == "sdpa"
    assert resolve_backend("auto", cuda, one, cp_size=2) == "flex"  # no cudnn-frontend
    assert resolve_backend("auto", cuda, layout) == "flex"
    assert resolve_backend("cudnn", torch.device("cpu"), layout) == "cudnn"
    q, k, v = _inputs(1, 4, 2, seed=0, requires_grad=False)
    with pytest.raises(ValueError, match="unknown attention kernel"):
        document_attention(q, k, v, layout, backend="flash")
    with pytest.raises(RuntimeError, match="CUDA only"):
        document_attention(q, k, v, layout, backend="cudnn")
    with pytest.raises(ValueError, match="layout"):
        document_attention(q, k, v, DocumentLayout.from_lengths([[32, 32], [64]]))
    q3 = torch.randn(S, 1, 3, D, dtype=torch.float64)
    with pytest.raises(ValueError, match="divisible"):
        document_attention(q3, k, v, layout)


@pytest.mark.parametrize("block", [(8, 8), (8, 16), (16, 8), (32, 32)])
@pytest.mark.parametrize("cp,kind", [(1, "zigzag"), (2, "zigzag"), (4, "zigzag"), (4, "balanced")])
def test_flex_block_mask_is_exact(block, cp, kind):
    """Each block is empty / full / partial exactly as the dense mask says (full blocks skip the
    mask function in the kernel, so a wrong 'full' would leak)."""
    import random

    s = 96
    rng = random.Random(block[0] * 10 + cp)
    rows = [random_lengths(rng, s, 10), [1] * 10 + [86], [s]]
    layout = DocumentLayout.from_lengths(rows)
    bq, bk = block
    split = _split(layout, cp, kind)
    for r in range(cp):
        bm = block_mask(layout, split, r, block)
        nq, nk = bm.kv_num_blocks.shape[-1], -(-s // bk)
        for b, lengths in enumerate(rows):
            m = dense_mask(lengths)[split.indices(r)[b]]  # [s_local, s]
            for i in range(nq):
                n_p = int(bm.kv_num_blocks[b, 0, i])
                n_f = int(bm.full_kv_num_blocks[b, 0, i])
                partial = set(bm.kv_indices[b, 0, i, :n_p].tolist())
                full = set(bm.full_kv_indices[b, 0, i, :n_f].tolist())
                assert not partial & full
                for j in range(nk):
                    blk = m[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
                    complete = blk.shape == (bq, bk)
                    if complete and blk.all():
                        assert j in full, (b, i, j)
                    elif blk.any():
                        assert j in partial, (b, i, j)
                    else:
                        assert j not in partial and j not in full, (b, i, j)


def test_ring_key_buffers_rounded_up_give_the_same_result():
    """The rectangles' K/V in buffers rounded up to the kernel's packing unit (cuDNN's 64 rows,
    zeros after the keys, so it needs no padded copy): output and gradients equal the exact-size
    buffers' bit for bit on every rank."""
    from megatron_prolong.attention.backends.reference import ReferenceBackend
    from megatron_prolong.attention.ring import ring_attention, ring_plan

    class Aligned(ReferenceBackend):
        key_align = 64

    layout = DocumentLayout.from_lengths([[10, 54], [30, 1, 33]])
    split = spread_split(layout, 4, min_chunk=2)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(64, 2, h, 8, dtype=torch.float64, generator=g) for h in (4, 2, 2))
    rects = 0
    for r in range(4):
        results = []
        for kernel in (ReferenceBackend(), Aligned()):
            qr = split.shard(q.transpose(0, 1), r).transpose(0, 1).requires_grad_()
            kk, vv = k.clone().requires_grad_(), v.clone().requires_grad_()
            out = ring_attention(qr, kk, vv, layout, split, r, kernel, 0.35)
            results.append((out, *torch.autograd.grad(out.square().sum(), (qr, kk, vv))))
        for a, b in zip(*results):
            assert torch.equal(a, b)
        rects += ring_plan(layout, split, r).rect is not None
    assert rects >= 3  # the rows cut documents over the ranks: rectangles ran
