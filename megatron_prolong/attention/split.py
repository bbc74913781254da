"""Which query tokens each context-parallel rank holds, and the attention pieces that follow.

K and V are all-gathered over the CP group, so any assignment of query tokens to ranks is exact,
provided positions, labels and the loss follow the tokens. Each rank holds ``s / C`` tokens of
every row (equal counts: the model's tensors stay ``[s / C, b, ...]`` and sequence parallelism
under TP splits them as before), as contiguous *runs* of global positions in local order.

Two assignments:
- :func:`zigzag_split`: chunks ``r`` and ``2C-1-r`` of ``2C`` equal chunks of the whole row.
  Balanced for one document, not for packed ones (the ranks whose chunks hold long documents do
  more work).
- :func:`balanced_split` (the default): every document long enough (``>= 2C x cp_min_chunk``
  tokens, or carrying more than ``cp_split_work_fraction`` of one rank's work) is split over all
  ranks zigzag-wise (rank r gets a front and a back part of it, ``L / C`` tokens, so every rank
  gets the same work from it); the other documents go whole, longest first, to the rank with the
  least work that has room; what does not fit whole fills the remaining room, cut where needed.
  Measured balance (max / mean per-rank causal work) in docs/benchmarks.md.

A *piece* is one run intersected with one document: local queries ``[q0, q1)`` of row ``row``
see the keys ``[k0, k1)`` (the document start up to the last query), causal, aligned
bottom-right (the last query sees the last key).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

import torch

from .layout import DocumentLayout

Run = tuple[int, int]  # [global start, global end)


class Piece(NamedTuple):
    row: int
    q0: int  # local query range [q0, q1)
    q1: int
    k0: int  # global key range [k0, k1): document start .. last query + 1
    k1: int


@dataclass(frozen=True, eq=False)
class CPSplit:
    """``runs[rank][row]``: the runs of global positions ``rank`` holds in ``row``, in local
    order. Identity equality (used as a cache key next to the layout)."""

    seq_len: int
    runs: tuple[tuple[tuple[Run, ...], ...], ...]
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def cp_size(self) -> int:
        return len(self.runs)

    @property
    def local_len(self) -> int:
        return self.seq_len // self.cp_size

    @cached_property
    def uniform(self) -> bool:
        """Every row split alike (one index serves all rows)."""
        return all(len(set(rank_runs)) == 1 for rank_runs in self.runs)

    def segments(self, rank: int, row: int) -> list[tuple[int, int, int]]:
        """``(local start, local end, global start)`` of each run."""
        out, at = [], 0
        for a, b in self.runs[rank][row]:
            out.append((at, at + b - a, a))
            at += b - a
        return out

    def _cached(self, key, make) -> torch.Tensor:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def indices(self, rank: int, device=None) -> torch.Tensor:
        """int64 ``[b, s / C]``: the global position of each local token (cached per device)."""
        def make():
            rows = [torch.cat([torch.arange(a, b) for a, b in runs]) for runs in self.runs[rank]]
            return torch.stack(rows).to(device)
        return self._cached(("indices", rank, str(device)), make)

    def rank_major(self, device=None) -> torch.Tensor:
        """int64 ``[b, s]``: global positions in the order an all-gather returns the shares."""
        return self._cached(("rank_major", str(device)), lambda: torch.cat(
            [self.indices(r) for r in range(self.cp_size)], dim=1).to(device))

    def natural(self, device=None) -> torch.Tensor:
        """int64 ``[b, s]``: for each global position, its index in the rank-major order."""
        def make():
            rm = self.rank_major()
            out = torch.empty_like(rm)
            out.scatter_(1, rm, torch.arange(self.seq_len).expand_as(rm).contiguous())
            return out.to(device)
        return self._cached(("natural", str(device)), make)

    def shard(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        """This rank's tokens of a ``[b, s, ...]`` tensor (tokens, labels, positions)."""
        idx = self.indices(rank, x.device)
        if self.uniform:
            return x[:, idx[0]]
        idx = idx.view(idx.shape + (1,) * (x.dim() - 2)).expand((-1, -1) + x.shape[2:])
        return torch.gather(x, 1, idx)


def zigzag_split(layout: DocumentLayout, cp_size: int) -> CPSplit:
    s = layout.seq_len
    _check(s, cp_size)
    if cp_size == 1:
        return CPSplit(s, ((((0, s),),) * layout.batch,))
    n = s // (2 * cp_size)
    runs = tuple(
        (((r * n, (r + 1) * n), ((2 * cp_size - 1 - r) * n, (2 * cp_size - r) * n)),) * layout.batch
        for r in range(cp_size)
    )
    return CPSplit(s, runs)


def balanced_split(
    layout: DocumentLayout, cp_size: int, *, min_chunk: int = 128, work_fraction: float = 0.1
) -> CPSplit:
    s = layout.seq_len
    _check(s, cp_size)
    per_row = [_balance_row(bounds, cp_size, min_chunk, work_fraction)
               for bounds in layout.boundaries()]
    runs = tuple(tuple(per_row[row][r] for row in range(layout.batch)) for r in range(cp_size))
    return CPSplit(s, runs)


def run_work(a: int, b: int, doc_start: int) -> int:
    """Causal work of queries ``[a, b)`` of a document starting at ``doc_start``: the keys they
    see, summed (query at offset o sees o + 1 keys)."""
    x, y = a - doc_start, b - doc_start
    return (y * (y + 1) - x * (x + 1)) // 2


def _balance_row(bounds, cp: int, min_chunk: int, work_fraction: float) -> list[list[Run]]:
    cap = bounds[-1] // cp
    docs = [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    target = sum(run_work(a, b, a) for a, b in docs) / cp
    runs: list[list[Run]] = [[] for _ in range(cp)]
    tokens, work = [0] * cp, [0] * cp

    def give(r: int, a: int, b: int, d0: int) -> None:
        runs[r].append((a, b))
        tokens[r] += b - a
        work[r] += run_work(a, b, d0)

    whole = []
    for d0, d1 in docs:
        n = d1 - d0
        if cp > 1 and (n >= 2 * cp * min_chunk or (n >= 2 * cp and run_work(d0, d1, d0) > work_fraction * target)):
            # every rank gets L // C or L // C + 1 tokens (the extra ones to the ranks with the
            # fewest so far, so counts stay within one of each other and never pass cap), half
            # from the front of the document in rank order, half from the back in reverse order
            q, rem = divmod(n, cp)
            extra = set(sorted(range(cp), key=lambda r: (tokens[r], r))[:rem])
            share = [q + (r in extra) for r in range(cp)]
            at = d0
            for r in range(cp):
                give(r, at, at + share[r] // 2, d0)
                at += share[r] // 2
            for r in reversed(range(cp)):
                give(r, at, at + share[r] - share[r] // 2, d0)
                at += share[r] - share[r] // 2
        else:
            whole.append((d0, d1))
    rest = []
    for d0, d1 in sorted(whole, key=lambda d: (d[0] - d[1], d[0])):  # longest first
        room = [r for r in range(cp) if tokens[r] + d1 - d0 <= cap]
        if room:
            give(min(room, key=lambda r: (work[r], r)), d0, d1, d0)
        else:
            rest.append((d0, d1))
    for d0, d1 in rest:  # fill the remaining room, cutting documents where needed
        at = d0
        while at < d1:
            r = min((r for r in range(cp) if tokens[r] < cap), key=lambda r: (work[r], r))
            b = min(d1, at + cap - tokens[r])
            give(r, at, b, d0)
            at = b
    assert tokens == [cap] * cp, (tokens, cap)
    return [tuple(_merge(sorted(rr))) for rr in runs]


def _merge(runs: list[Run]) -> list[Run]:
    """Adjacent runs joined (fewer pieces); runs sorted by position."""
    out: list[Run] = []
    for a, b in runs:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _check(seq_len: int, cp_size: int) -> None:
    if cp_size < 1:
        raise ValueError(f"cp_size must be >= 1, got {cp_size}")
    if seq_len % (2 * cp_size) and cp_size > 1:
        raise ValueError(
            f"sequence length {seq_len} is not divisible by 2 x context_parallel_size = "
            f"{2 * cp_size}; pad or choose another CP size")


def split_for(layout: DocumentLayout, cp_size: int, method: str = "balanced", *,
              min_chunk: int = 128, work_fraction: float = 0.1) -> CPSplit:
    """The split of ``layout`` over ``cp_size`` ranks (cached on the layout)."""
    key = (CPSplit, cp_size, method, min_chunk, work_fraction)
    if key not in layout._cache:
        if method == "zigzag" or cp_size == 1:
            layout._cache[key] = zigzag_split(layout, cp_size)
        elif method == "balanced":
            layout._cache[key] = balanced_split(layout, cp_size, min_chunk=min_chunk,
                                                work_fraction=work_fraction)
        else:
            raise ValueError(f"unknown CP split {method!r}; use 'balanced' or 'zigzag'")
    return layout._cache[key]


def pieces(layout: DocumentLayout, split: CPSplit, rank: int) -> tuple[Piece, ...]:
    """This rank's pieces, in local token order (row-major), cached on the layout."""
    key = (Piece, split, rank)
    if key not in layout._cache:
        out = []
        for row, bounds in enumerate(layout.boundaries()):
            for ls, le, gs in split.segments(rank, row):
                ge = gs + (le - ls)
                for i in range(len(bounds) - 1):
                    d0, d1 = bounds[i], bounds[i + 1]
                    qa, qb = max(d0, gs), min(d1, ge)
                    if qa < qb:
                        out.append(Piece(row, ls + qa - gs, ls + qb - gs, d0, qb))
        layout._cache[key] = tuple(out)
    return layout._cache[key]


def rank_work(layout: DocumentLayout, split: CPSplit) -> list[int]:
    """Causal work (keys seen, summed over queries) of each rank."""
    return [sum(run_work(p.k1 - (p.q1 - p.q0), p.k1, p.k0) for p in pieces(layout, split, r))
            for r in range(split.cp_size)]


def balance(layout: DocumentLayout, split: CPSplit) -> float:
    """max / mean per-rank causal work (1.0: perfectly balanced)."""
    w = rank_work(layout, split)
    return max(w) * len(w) / sum(w)
