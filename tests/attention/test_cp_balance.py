"""The work-balanced CP split: <= 1.05 max/mean per-rank causal work on ProLong's layouts and
random ones (tools/cp_balance.py prints the table in docs/benchmarks.md), exact token counts,
every token held by exactly one rank."""

import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from cp_balance import table  # noqa: E402

from megatron_prolong.attention import (
    DocumentLayout, balanced_split, pieces, rank_work, spread_split, zigzag_split,
)


def test_balance_table():
    rows = table()
    for r in rows:
        print(f"{r['layout']:40s} CP={r['cp']} zigzag {r['zigzag']:.3f} balanced {r['balanced']:.3f}")
    assert all(r["balanced"] <= 1.05 for r in rows), [r for r in rows if r["balanced"] > 1.05]
    # the zigzag split is far off on packed rows (what the balanced split is for)
    assert max(r["zigzag"] for r in rows) > 1.5


@pytest.mark.parametrize("method", ["balanced", "spread"])
@pytest.mark.parametrize("seed", range(40))
def test_split_is_a_partition_with_equal_counts(seed, method):
    rng = random.Random(seed)
    cp = rng.choice([2, 3, 4, 8])
    s = 2 * cp * rng.randint(1, 40)
    rows = []
    for _ in range(rng.randint(1, 3)):
        cuts = sorted(rng.sample(range(1, s), rng.randint(0, min(12, s - 1))))
        rows.append([b - a for a, b in zip([0] + cuts, cuts + [s])])
    layout = DocumentLayout.from_lengths(rows)
    split = (balanced_split(layout, cp, balance_bound=rng.choice([1.0, 1.02, 1.5]))
             if method == "balanced" else spread_split(layout, cp, min_chunk=rng.choice([1, 2, 8])))
    held = torch.cat([split.indices(r) for r in range(cp)], dim=1)
    assert held.shape == (len(rows), s)  # s / C tokens per rank and row
    for row in held:
        assert sorted(row.tolist()) == list(range(s))  # each token on exactly one rank
    assert split.natural()[torch.arange(len(rows))[:, None], split.rank_major()].tolist() == \
        [list(range(s))] * len(rows)
    # the work per rank, summed, is the layout's unmasked pairs
    assert sum(rank_work(layout, split)) == layout.sum_squared_lengths()


def test_pieces_state_the_rule():
    """Pieces: each local query sees its document's keys from the document start to itself."""
    layout = DocumentLayout.from_lengths([[5, 20, 3, 36], [64]])
    for split in (zigzag_split(layout, 4), balanced_split(layout, 4), spread_split(layout, 4, min_chunk=2)):
        for r in range(4):
            idx = split.indices(r)
            starts = layout.doc_start()
            got = {}
            for row, q0, q1, k0, k1 in pieces(layout, split, r):
                for j in range(q0, q1):
                    got[(row, j)] = (k0, k1 - (q1 - j) + 1)
            assert len(got) == 2 * 16
            for (row, j), (k0, k_end) in got.items():
                p = int(idx[row, j])
                assert (k0, k_end) == (int(starts[row, p]), p + 1)
