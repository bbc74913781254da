"""TE THD packing rules (checked against a plain statement of TE's documented behaviour) and
up-front validation of context-parallel settings."""

import pytest
import torch

from megatron_prolong.te.thd import (
    padded_length,
    te_thd_packing,
    te_thd_partitioned_indices,
    validate_context_parallel,
    validate_cp_comm_type,
)

ROWS = {
    "one_doc": [[0, 64]],
    "odd_docs": [[0, 3, 16, 17, 40, 64]],
    "two_rows": [[0, 1, 2, 64], [0, 33, 64]],
    "tiny": [[0] + list(range(1, 65))],
}


def _plain_padding(rows, cp):
    """Each document padded at its end to the next multiple of 2*cp (no padding at cp == 1)."""
    lens = [b - a for row in rows for a, b in zip(row[:-1], row[1:])]
    m = 2 * cp if cp > 1 else 1
    plens = [((n + m - 1) // m) * m for n in lens]
    cu, cup = [0], [0]
    for n, p in zip(lens, plens):
        cu.append(cu[-1] + n)
        cup.append(cup[-1] + p)
    stream = []  # source token (flattened b*s index) or -1
    s = rows[0][-1]
    for r, row in enumerate(rows):
        for a, b in zip(row[:-1], row[1:]):
            p = ((b - a + m - 1) // m) * m
            stream += [r * s + t for t in range(a, b)] + [-1] * (p - (b - a))
    return cu, cup, stream


def _plain_te_partition(cup, cp, rank):
    """TE's thd_partition_indices_kernel, token by token: local token t lies in document i
    (local cu = cu_padded / cp); offset o inside it; half = local length / 2; the global index is
    cu_padded[i] + o + half * (rank if o < half else 2*cp - 2 - rank)."""
    local_cu = [c // cp for c in cup]
    out = []
    for t in range(cup[-1] // cp):
        i = max(j for j in range(len(local_cu) - 1) if local_cu[j] <= t)
        n = local_cu[i + 1] - local_cu[i]
        o = t - local_cu[i]
        off = rank if o < n // 2 else 2 * cp - 2 - rank
        out.append(local_cu[i] * cp + n // 2 * off + o)
    return out


@pytest.mark.parametrize("name", sorted(ROWS))
@pytest.mark.parametrize("cp", [1, 2, 4])
def test_thd_packing_follows_te_rules(name, cp):
    rows = ROWS[name]
    pk = te_thd_packing(rows, cp)
    cu, cup, stream = _plain_padding(rows, cp)
    assert pk.cu_seqlens.tolist() == cu
    assert pk.cu_seqlens_padded.tolist() == cup
    assert pk.source_index.tolist() == stream
    assert pk.is_padding.tolist() == [x < 0 for x in stream]
    assert all((b - a) % (2 * cp) == 0 for a, b in zip(cup[:-1], cup[1:])) or cp == 1
    # pack / unpack a token tensor; padding carries the fill value (e.g. ignore label)
    s = rows[0][-1]
    tokens = torch.arange(len(rows) * s) + 1000
    packed = pk.pack(tokens, pad_value=-100)
    assert packed.tolist() == [1000 + x if x >= 0 else -100 for x in stream]
    assert torch.equal(pk.unpack(packed), tokens)
    # CP split: every rank's indices follow TE's kernel; together they cover the stream once
    seen = []
    for r in range(cp):
        idx = pk.partition_indices(r).tolist()
        assert idx == _plain_te_partition(cup, cp, r)
        assert te_thd_partitioned_indices(pk.cu_seqlens_padded, cp, r).tolist() == idx
        seen += idx
        assert pk.shard(packed, r).tolist() == [packed[i].item() for i in idx]
    assert sorted(seen) == list(range(cup[-1]))


def test_partition_is_per_document_zigzag():
    # one padded doc of 8 tokens at cp=2: chunks of 2; rank 0 holds chunks 0,3; rank 1 holds 1,2
    assert te_thd_partitioned_indices([0, 8], 2, 0).tolist() == [0, 1, 6, 7]
    assert te_thd_partitioned_indices([0, 8], 2, 1).tolist() == [2, 3, 4, 5]
    assert padded_length(5, 2) == 8 and padded_length(8, 2) == 8 and padded_length(5, 1) == 5


def test_validate_context_parallel():
    validate_context_parallel(65536, 8)
    with pytest.raises(ValueError, match="not divisible by 2 x context_parallel_size"):
        validate_context_parallel(65536 + 4, 8)


@pytest.mark.parametrize("kind", ["p2p", "all_gather", "a2a", ["p2p", "all_gather"]])
def test_valid_cp_comm_types(kind):
    validate_cp_comm_type(kind, 4, 32, 8)


def test_allgather_misspelling():
    with pytest.raises(ValueError, match="'all_gather', with an underscore"):
        validate_cp_comm_type("allgather", 2, 32, 8)
    with pytest.raises(ValueError, match="not valid"):
        validate_cp_comm_type(["p2p", "ring2"], 2, 32, 8)


def test_a2a_p2p_needs_hierarchical_sizes():
    with pytest.raises(ValueError, match="hierarchical_context_parallel_sizes"):
        validate_cp_comm_type("a2a+p2p", 4, 32, 8)
    with pytest.raises(ValueError, match="product"):
        validate_cp_comm_type("a2a+p2p", 8, 32, 8, [2, 2])
    validate_cp_comm_type("a2a+p2p", 8, 32, 8, [2, 4])
    with pytest.raises(ValueError, match="not divisible by 16"):
        validate_cp_comm_type("a2a+p2p", 32, 32, 8, [16, 2])


def test_a2a_heads_divisible():
    validate_cp_comm_type("a2a", 8, 32, 8)
    with pytest.raises(ValueError, match="key/value heads=8"):
        validate_cp_comm_type("a2a", 16, 32, 8)
    with pytest.raises(ValueError, match="query heads=6"):
        validate_cp_comm_type("a2a", 4, 6, 6)
    validate_cp_comm_type("a2a", 1, 6, 6)  # no CP: nothing to scatter
