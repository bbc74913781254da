"""Megatron indexed datasets packed online: every token and boundary kept, ProLong's long rule."""

import numpy as np
import pytest
import torch

from megatron_prolong.data.config import DataConfig, DomainConfig
from megatron_prolong.data.loader import MixtureLoader
from megatron_prolong.data.sources import DataError, IndexedSource

S = 64


def write_indexed(prefix, docs, dtype=np.int32):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for d in docs:
        b.add_item(torch.tensor(d))
        b.end_document()
    b.finalize(prefix + ".idx")
    return prefix


def distinct_docs(lengths):
    """Document k holds tokens k*1000 .. k*1000+len-1 so every token is identifiable."""
    return [np.arange(k * 1000, k * 1000 + n, dtype=np.int64) for k, n in enumerate(lengths)]


def unpack(src):
    """Rebuild the stream of pieces from the packed sequences, joining a piece cut at a
    sequence boundary with its continuation."""
    pieces = []
    for j in range(len(src)):
        s = src.get(j)
        assert s.input_ids.shape == (S,)
        assert s.indices[0, 0] == 0 and s.indices[-1, 1] == S
        assert np.all(s.indices[1:, 0] == s.indices[:-1, 1])  # boundaries tile the sequence
        for a, b in s.indices:
            seg = s.input_ids[a:b].astype(np.int64)
            if pieces and a == 0 and pieces[-1][-1] + 1 == seg[0] and pieces[-1][-1] // 1000 == seg[0] // 1000:
                pieces[-1] = np.concatenate([pieces[-1], seg])  # continued from the last sequence
            else:
                pieces.append(seg)
    return pieces


def test_short_domain_keeps_every_token_and_boundary(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 150, size=60)
    docs = distinct_docs(lengths)
    prefix = write_indexed(str(tmp_path / "short"), docs)
    src = IndexedSource("short", prefix, seq_length=S, seed=3)
    total = int(lengths.sum())
    assert len(src) == total // S
    pieces = unpack(src)
    # Docs longer than S are cut into S-token pieces; join consecutive pieces of one doc.
    by_doc = {}
    for p in pieces:
        by_doc.setdefault(int(p[0] // 1000), []).append(p)
    joined = {k: np.concatenate(v) for k, v in by_doc.items()}
    # Every document appears complete and in order, except the one cut by the dropped tail.
    kept = sum(len(v) for v in joined.values())
    assert kept == len(src) * S and total - kept < S
    incomplete = [k for k, v in joined.items() if not np.array_equal(v, docs[k])]
    assert len(incomplete) <= 1
    for k in incomplete:
        assert np.array_equal(joined[k], docs[k][: len(joined[k])])
    missing = set(range(len(docs))) - set(joined)
    assert sum(lengths[k] for k in missing) + sum(len(docs[k]) - len(joined[k]) for k in incomplete) == total - kept
    # The boundaries are exactly the document (and piece) boundaries: each segment is one piece.
    for p in pieces:
        assert np.all(np.diff(p) == 1) and len(p) <= max(S, 150)


def test_packing_is_deterministic_for_a_seed(tmp_path):
    docs = distinct_docs(np.random.default_rng(1).integers(1, 90, size=40))
    prefix = write_indexed(str(tmp_path / "x"), docs)
    a, b = IndexedSource("x", prefix, seq_length=S, seed=5), IndexedSource("x", prefix, seq_length=S, seed=5)
    c = IndexedSource("x", prefix, seq_length=S, seed=6)
    assert all(np.array_equal(a.get(j).input_ids, b.get(j).input_ids) for j in range(len(a)))
    assert any(not np.array_equal(a.get(j).input_ids, c.get(j).input_ids) for j in range(len(a)))


def test_long_domain_rule_one_piece_per_sequence(tmp_path):
    lengths = [10, 63, 64, 65, 130, 200, 20, 256]
    docs = distinct_docs(lengths)
    prefix = write_indexed(str(tmp_path / "long"), docs)
    src = IndexedSource("long", prefix, seq_length=S, seed=0, min_doc_length=S)
    # Docs < 64 skipped; others cut into 64-token pieces, remainders < 64 dropped.
    expected = sorted((k, i) for k, n in enumerate(lengths) if n >= S for i in range(n // S))
    assert len(src) == len(expected) == 1 + 1 + 2 + 3 + 4
    got = []
    for j in range(len(src)):
        s = src.get(j)
        assert s.indices.tolist() == [[0, S]]
        k, off = int(s.input_ids[0] // 1000), int(s.input_ids[0] % 1000)
        assert off % S == 0 and np.array_equal(s.input_ids, docs[k][off : off + S])
        got.append((k, off // S))
    assert sorted(got) == expected


def test_long_pieces_packed_several_per_sequence(tmp_path):
    # Stage 2's "64K documents packed 8 per 512K sequence", at S/4.
    q = S // 4
    lengths = [q - 1, q, 3 * q + 5, 5 * q, 2 * q]
    docs = distinct_docs(lengths)
    prefix = write_indexed(str(tmp_path / "l"), docs)
    src = IndexedSource("l", prefix, seq_length=S, seed=0, min_doc_length=q, max_doc_length=q)
    n_pieces = 1 + 3 + 5 + 2
    assert len(src) == n_pieces // 4
    for j in range(len(src)):
        s = src.get(j)
        assert s.indices.tolist() == [[0, q], [q, 2 * q], [2 * q, 3 * q], [3 * q, 4 * q]]
        for a, b in s.indices:
            k, off = int(s.input_ids[a] // 1000), int(s.input_ids[a] % 1000)
            assert off % q == 0 and np.array_equal(s.input_ids[a:b], docs[k][off : off + q])


def test_indexed_domain_in_a_mixture(tmp_path, mds):
    from data_helpers import packed_samples

    mds("m", packed_samples(10, S, tag=7))
    write_indexed(str(tmp_path / "ix"), [np.full(n, 5, dtype=np.int64) for n in [30, 50, 70, 90, 40]])
    cfg = DataConfig(root=str(tmp_path), seq_length=S, synthetic=False, mixture=[
        DomainConfig(name="m", path="m", share=0.5),
        DomainConfig(name="ix", path="ix", share=0.5, format="indexed"),
    ])
    ld = MixtureLoader(cfg, vocab_size=258, seed=0, dp_rank=0, dp_size=1, micro_batch_size=2, num_micro_batches=2)
    doms = []
    for _ in range(5):
        for mb in ld.next_step():
            for i in range(2):
                d = int(mb["domain"][i])
                doms.append(d)
                if d == 1:
                    assert (mb["tokens"][i] == 5).all()
                    cu = mb["cu_seqlens"][i]
                    starts = cu[(cu > 0) & (cu < S)]
                    assert (mb["loss_mask"][i][starts.long() - 1] == 0).all()
    assert doms.count(0) == doms.count(1) == 10


def test_indexed_errors(tmp_path):
    with pytest.raises(DataError, match=r"nothere.bin does not exist"):
        IndexedSource("x", str(tmp_path / "nothere"), seq_length=S, seed=0)
    prefix = write_indexed(str(tmp_path / "big"), [np.full(100, 70000, dtype=np.int64)])
    cfg = DataConfig(root=str(tmp_path), seq_length=S, synthetic=False,
                     mixture=[DomainConfig(name="big", path="big", format="indexed")])
    with pytest.raises(DataError, match=r"big.bin: packed sequence 0 .*token id 70000 at position 0"):
        MixtureLoader(cfg, vocab_size=65536, seed=0, dp_rank=0, dp_size=1, micro_batch_size=1, num_micro_batches=1)
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match=r"big.bin: has 100 bytes, the index needs 400"):
        IndexedSource("big", prefix, seq_length=S, seed=0)
