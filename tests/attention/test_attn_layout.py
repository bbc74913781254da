import pytest
import torch

from megatron_prolong.attention import (
    DocumentLayout,
    reshard_zigzag,
    shard_zigzag,
    unshard_zigzag,
    zigzag_indices,
)


def test_from_cu_seqlens_forms_agree():
    rows = [[0, 3, 10, 16], [0, 16]]
    a = DocumentLayout.from_cu_seqlens([torch.tensor(r) for r in rows], 16)
    b = DocumentLayout.from_cu_seqlens(torch.tensor([[0, 3, 10, 16], [0, 0, 0, 16]]), 16)
    c = DocumentLayout.from_cu_seqlens(torch.tensor([0, 3, 10, 16, 32]), 16)  # flattened THD
    d = DocumentLayout.from_lengths([[3, 7, 6], [16]])
    expect = torch.tensor([[0] * 3 + [1] * 7 + [2] * 6, [0] * 16], dtype=torch.int32)
    for x in (a, b, c, d):
        assert torch.equal(x.doc_ids, expect)
        assert x.boundaries() == ((0, 3, 10, 16), (0, 16))
    assert a.cu_seqlens_flat().tolist() == [0, 3, 10, 16, 32]
    assert a.doc_start()[0].tolist() == [0] * 3 + [3] * 7 + [10] * 6
    assert not a.is_single_document()
    assert a.sum_squared_lengths() == 3 * 4 // 2 + 7 * 8 // 2 + 6 * 7 // 2 + 16 * 17 // 2
    # boundaries recomputed from doc_ids alone match
    assert DocumentLayout(a.doc_ids.clone()).boundaries() == a.boundaries()


def test_single_document():
    x = DocumentLayout.single_document(2, 8, "cpu")
    assert x.is_single_document() and x.boundaries() == ((0, 8), (0, 8))
    assert torch.equal(x.doc_start(), torch.zeros(2, 8, dtype=torch.long))


@pytest.mark.parametrize(
    "bad",
    [[[0, 5, 15]], [[1, 5, 16]], [[0, 9, 5, 16]]],
)
def test_from_cu_seqlens_rejects(bad):
    with pytest.raises(ValueError):
        DocumentLayout.from_cu_seqlens(bad, 16)


def test_flattened_needs_row_boundaries():
    with pytest.raises(ValueError, match="boundary"):
        DocumentLayout.from_cu_seqlens(torch.tensor([0, 10, 20, 32]), 16)


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_zigzag_roundtrip(cp):
    s = 32
    x = torch.arange(s * 3).view(s, 3)
    shares = [shard_zigzag(x, 0, cp, r) for r in range(cp)]
    n = s // (2 * cp)
    for r, sh in enumerate(shares):
        idx = zigzag_indices(s, cp, r)
        assert torch.equal(sh, x[idx])
        if cp > 1:
            assert idx.tolist() == list(range(r * n, (r + 1) * n)) + list(
                range((2 * cp - 1 - r) * n, (2 * cp - r) * n)
            )
    cat = torch.cat(shares)
    assert torch.equal(unshard_zigzag(cat, 0, cp), x)
    assert torch.equal(reshard_zigzag(x, 0, cp), cat)


def test_zigzag_needs_divisible():
    with pytest.raises(ValueError, match="2 x context_parallel_size"):
        zigzag_indices(30, 4, 0)
