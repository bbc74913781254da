"""Which query tokens each context-parallel rank holds, and the attention pieces that follow.

K and V are all-gathered over the CP group, so any assignment of query tokens to ranks is exact,
provided positions, labels and the loss follow the tokens. Each rank holds ``s / C`` tokens of
every row (equal counts: the model's tensors stay ``[s / C, b, ...]`` and sequence parallelism
under TP splits them as before), as contiguous *runs* of global positions in local order.

Two assignments:
- :func:`zigzag_split`: chunks ``r`` and ``2C-1-r`` of ``2C`` equal chunks of the whole row.
  Balanced for one document, not for packed ones (the ranks whose chunks hold long documents do
  more work).
- :func:`balanced_split` (the default): documents stay whole on one rank wherever the ranks'
  causal work stays within ``balance_bound`` (max / mean) of each other: a whole document is the
  CP = 1 problem on local keys (no rectangle, no gathered K/V; when no rank of a row needs remote
  keys the collectives are skipped). Only documents that cannot be placed whole (longer than a
  rank's share of the row, or with more work than one rank's share) are spread, zigzag-wise over
  as few ranks as they need; what does not fit whole fills the remaining room, cut where needed.
  If that assignment misses the bound, the spreading widens step by step (more ranks per large
  document, then the heaviest whole documents spread too), and as a last resort it is the
  ``spread`` split.
- :func:`spread_split`: every document long enough (``>= 2C x cp_min_chunk`` tokens, or carrying
  more than ``cp_split_work_fraction`` of one rank's work) is split over all ranks zigzag-wise
  (rank r gets a front and a back part of it, ``L / C`` tokens, so every rank gets the same work
  from it); the other documents go whole, longest first, to the rank with the least work that
  has room; what does not fit whole fills the remaining room, cut where needed. Balanced on
  every layout, but a short document spread over C ranks becomes 2C small pieces, each with a
  rectangle against gathered keys: many small kernel calls' worth of work per rank.
  Measured balance and per-rank rates of both in docs/benchmarks.md.

A *piece* is one run intersected with one document: local queries ``[q0, q1)`` of row ``row``
see the keys ``[k0, k1)`` (the document start up to the last query), causal, aligned
bottom-right (the last query sees the last key).
"""

from __future__ import annotations

import math
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
    layout: DocumentLayout, cp_size: int, *, balance_bound: float = 1.02, min_chunk: int = 128,
    work_fraction: float = 0.1,
) -> CPSplit:
    return _split(layout, cp_size, lambda bounds: _whole_first_row(
        bounds, cp_size, balance_bound, min_chunk, work_fraction))


def spread_split(
    layout: DocumentLayout, cp_size: int, *, min_chunk: int = 128, work_fraction: float = 0.1
) -> CPSplit:
    return _split(layout, cp_size, lambda bounds: _spread_row(bounds, cp_size, min_chunk, work_fraction))


def _split(layout: DocumentLayout, cp_size: int, row_fn) -> CPSplit:
    s = layout.seq_len
    _check(s, cp_size)
    if cp_size == 1:
        return zigzag_split(layout, 1)
    per_row = [row_fn(bounds) for bounds in layout.boundaries()]
    runs = tuple(tuple(per_row[row][r] for row in range(layout.batch)) for r in range(cp_size))
    return CPSplit(s, runs)


def run_work(a: int, b: int, doc_start: int) -> int:
    """Causal work of queries ``[a, b)`` of a document starting at ``doc_start``: the keys they
    see, summed (query at offset o sees o + 1 keys)."""
    x, y = a - doc_start, b - doc_start
    return (y * (y + 1) - x * (x + 1)) // 2


class _Assignment:
    """Runs, token counts and causal work per rank while a row is being assigned."""

    def __init__(self, cp: int, cap: int):
        self.cp, self.cap = cp, cap
        self.runs: list[list[Run]] = [[] for _ in range(cp)]
        self.tokens, self.work = [0] * cp, [0] * cp

    def give(self, r: int, a: int, b: int, d0: int) -> None:
        if b > a:
            self.runs[r].append((a, b))
            self.tokens[r] += b - a
            self.work[r] += run_work(a, b, d0)

    def spread(self, ranks: list[int], d0: int, d1: int, extra: set[int] | None = None) -> None:
        """Zigzag over ``ranks``: each gets ``L / m`` tokens (one more to the ``L % m`` ranks of
        ``extra``, by default the first ones), half from the front of the document in order,
        half from the back in reverse order, so every rank gets the same work from it."""
        q, rem = divmod(d1 - d0, len(ranks))
        extra = set(ranks[:rem]) if extra is None else extra
        share = [q + (r in extra) for r in ranks]
        at = d0
        for r, n in zip(ranks, share):
            self.give(r, at, at + n // 2, d0)
            at += n // 2
        for r, n in reversed(list(zip(ranks, share))):
            self.give(r, at, at + n - n // 2, d0)
            at += n - n // 2

    def place_whole(self, docs: list[Run]) -> list[Run]:
        """Longest first, each to the rank with the least work that has room; returns the ones
        that fit nowhere."""
        rest = []
        for d0, d1 in sorted(docs, key=lambda d: (d[0] - d[1], d[0])):
            room = [r for r in range(self.cp) if self.tokens[r] + d1 - d0 <= self.cap]
            if room:
                self.give(min(room, key=lambda r: (self.work[r], r)), d0, d1, d0)
            else:
                rest.append((d0, d1))
        return rest

    def fill(self, docs: list[Run], light_first: bool) -> None:
        """Fill the remaining room with ``docs`` in order, cut where needed. ``light_first``: a
        document's front (its lightest tokens: fewest keys each) goes to the rank with the most
        work that still has room, so its heavier back lands where work is missing."""
        for d0, d1 in docs:
            at = d0
            while at < d1:
                open_ = [r for r in range(self.cp) if self.tokens[r] < self.cap]
                r = (max(open_, key=lambda r: (self.work[r], -r)) if light_first
                     else min(open_, key=lambda r: (self.work[r], r)))
                b = min(d1, at + self.cap - self.tokens[r])
                self.give(r, at, b, d0)
                at = b

    def result(self) -> list[tuple[Run, ...]]:
        assert self.tokens == [self.cap] * self.cp, (self.tokens, self.cap)
        return [tuple(_merge(sorted(rr))) for rr in self.runs]

    def balance(self) -> float:
        return max(self.work) * self.cp / max(1, sum(self.work))


def _docs(bounds) -> list[Run]:
    return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def _whole_first_row(bounds, cp: int, bound: float, min_chunk: int, work_fraction: float):
    cap, docs = bounds[-1] // cp, _docs(bounds)
    target = sum(run_work(a, b, a) for a, b in docs) / cp
    need = {}  # documents that cannot go whole: the fewest ranks each must be spread over
    for d0, d1 in docs:
        m = max(math.ceil((d1 - d0) / cap), math.ceil(run_work(d0, d1, d0) / target))
        if m > 1 and d1 - d0 >= 2 * cp:
            need[(d0, d1)] = min(cp, m)
    heavy = sorted((d for d in docs if d not in need and d[1] - d[0] >= 2 * cp),
                   key=lambda d: (d[0] - d[1], d[0]))
    for widen in range(int(math.log2(cp)) + 1):  # ranks per large document: need x 2^widen
        wide = {d: min(cp, m << widen) for d, m in need.items()}
        k = 0
        while True:  # ... and the k heaviest whole documents spread over all ranks
            a = _assign(docs, cp, cap, {**wide, **{d: cp for d in heavy[:k]}})
            if a.balance() <= bound:
                return a.result()
            if k >= min(len(heavy), 8):
                break
            k = min(len(heavy), 2 * k if k else 1)
    return _spread_row(bounds, cp, min_chunk, work_fraction)


def _assign(docs: list[Run], cp: int, cap: int, groups: dict) -> _Assignment:
    a = _Assignment(cp, cap)
    whole = []
    for d0, d1 in sorted(docs, key=lambda d: (d[0] - d[1], d[0])):
        m = groups.get((d0, d1), 1)
        ranks = sorted((r for r in range(cp) if a.tokens[r] + (d1 - d0) // m + 1 <= cap),
                       key=lambda r: (a.work[r], a.tokens[r], r))[:m]
        if m > 1 and len(ranks) == m:
            a.spread(ranks, d0, d1)
        else:
            whole.append((d0, d1))
    a.fill(a.place_whole(whole), light_first=True)
    return a


def _spread_row(bounds, cp: int, min_chunk: int, work_fraction: float) -> list[tuple[Run, ...]]:
    cap, docs = bounds[-1] // cp, _docs(bounds)
    target = sum(run_work(a, b, a) for a, b in docs) / cp
    a = _Assignment(cp, cap)
    whole = []
    for d0, d1 in docs:
        n = d1 - d0
        if n >= 2 * cp * min_chunk or (n >= 2 * cp and run_work(d0, d1, d0) > work_fraction * target):
            # counts stay within one of each other and never pass cap: the extra tokens go to
            # the ranks with the fewest so far
            a.spread(list(range(cp)), d0, d1,
                     set(sorted(range(cp), key=lambda r: (a.tokens[r], r))[: n % cp]))
        else:
            whole.append((d0, d1))
    a.fill(a.place_whole(whole), light_first=False)
    return a.result()


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
              balance_bound: float = 1.02, min_chunk: int = 128,
              work_fraction: float = 0.1) -> CPSplit:
    """The split of ``layout`` over ``cp_size`` ranks (cached on the layout)."""
    key = (CPSplit, cp_size, method, balance_bound, min_chunk, work_fraction)
    if key not in layout._cache:
        if method == "zigzag" or cp_size == 1:
            layout._cache[key] = zigzag_split(layout, cp_size)
        elif method == "balanced":
            layout._cache[key] = balanced_split(layout, cp_size, balance_bound=balance_bound,
                                                min_chunk=min_chunk, work_fraction=work_fraction)
        elif method == "spread":
            layout._cache[key] = spread_split(layout, cp_size, min_chunk=min_chunk,
                                              work_fraction=work_fraction)
        else:
            raise ValueError(f"unknown CP split {method!r}; use 'balanced', 'spread' or 'zigzag'")
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
