"""Document layout of one packed micro-batch.

A packed row of ``s`` tokens holds one or more documents, back to back. Token ``i`` may attend to
token ``j`` iff both lie in the same document and ``j <= i`` (positions global in the row). The
layout is the same Python object for every layer of a micro-batch, so anything derived from it
(cumulative lengths, per-rank pieces, flex block masks) is computed once and cached on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass(frozen=True, eq=False)
class DocumentLayout:
    """Document boundaries of one micro-batch, full (un-sharded) sequence.

    ``doc_ids``: int32 ``[b, s]``, non-decreasing per row, 0-based document index within the row.
    Equality and hashing are by identity (the object is used as a cache key).
    """

    doc_ids: torch.Tensor
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.doc_ids.dim() != 2:
            raise ValueError(f"doc_ids must be [batch, seq], got shape {tuple(self.doc_ids.shape)}")
        if self.doc_ids.dtype != torch.int32:
            object.__setattr__(self, "doc_ids", self.doc_ids.to(torch.int32))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_cu_seqlens(
        cls, cu_seqlens: Sequence[torch.Tensor | Sequence[int]] | torch.Tensor, seq_len: int
    ) -> "DocumentLayout":
        """Build from cumulative document lengths ``0 = c_0 < c_1 < ... < c_n = seq_len``.

        Accepted forms:
        - a list with one 1-D tensor (or list of ints) per row;
        - a 2-D tensor ``[b, n+1]`` (one row each);
        - a 1-D tensor: one row if it ends at ``seq_len``; if it ends at ``k * seq_len`` it is
          Megatron's flattened THD form of ``k`` rows (every multiple of ``seq_len`` must be a
          boundary) and is split into rows.
        Repeated values (zero-length documents, padding of the cu_seqlens tensor) are dropped.
        """
        if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dim() == 1:
            flat = [int(x) for x in cu_seqlens.tolist()]
            total = flat[-1]
            if total % seq_len != 0 or total == 0:
                raise ValueError(
                    f"cu_seqlens ends at {total}, which is not a multiple of seq_len={seq_len}"
                )
            rows = []
            bset = set(flat)
            for r in range(total // seq_len):
                lo, hi = r * seq_len, (r + 1) * seq_len
                if lo not in bset or hi not in bset:
                    raise ValueError(
                        f"flattened cu_seqlens must have a boundary at every multiple of "
                        f"seq_len={seq_len}; missing at row {r}"
                    )
                rows.append([x - lo for x in flat if lo <= x <= hi])
            device = cu_seqlens.device
        else:
            if isinstance(cu_seqlens, torch.Tensor):
                device = cu_seqlens.device
                rows = [[int(x) for x in row] for row in cu_seqlens.tolist()]
            else:
                device = None
                rows = []
                for row in cu_seqlens:
                    if isinstance(row, torch.Tensor):
                        device = device or row.device
                        row = row.tolist()
                    rows.append([int(x) for x in row])
        device = device or torch.device("cpu")
        ids = torch.empty(len(rows), seq_len, dtype=torch.int32)
        bounds: list[tuple[int, ...]] = []
        for r, row in enumerate(rows):
            b = sorted(set(row))
            if b[0] != 0 or b[-1] != seq_len:
                raise ValueError(
                    f"row {r}: cu_seqlens must start at 0 and end at seq_len={seq_len}, got "
                    f"{row[:3]}...{row[-3:]}"
                )
            if list(row) != sorted(row):
                raise ValueError(f"row {r}: cu_seqlens must be non-decreasing")
            lengths = torch.tensor([b[i + 1] - b[i] for i in range(len(b) - 1)])
            ids[r] = torch.repeat_interleave(torch.arange(len(b) - 1, dtype=torch.int32), lengths)
            bounds.append(tuple(b))
        layout = cls(ids.to(device))
        layout._cache["bounds"] = tuple(bounds)
        return layout

    @classmethod
    def from_lengths(cls, lengths: Sequence[Sequence[int]], device=None) -> "DocumentLayout":
        """Build from per-row document lengths (every row must sum to the same ``s``)."""
        rows = []
        for row in lengths:
            c = [0]
            for n in row:
                c.append(c[-1] + int(n))
            rows.append(c)
        s = rows[0][-1]
        out = cls.from_cu_seqlens(rows, s)
        return out.to(device) if device is not None else out

    @classmethod
    def single_document(cls, batch: int, seq_len: int, device=None) -> "DocumentLayout":
        layout = cls(torch.zeros(batch, seq_len, dtype=torch.int32, device=device))
        layout._cache["bounds"] = tuple((0, seq_len) for _ in range(batch))
        return layout

    # ------------------------------------------------------------------ properties
    @property
    def batch(self) -> int:
        return self.doc_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.doc_ids.shape[1]

    @property
    def device(self) -> torch.device:
        return self.doc_ids.device

    def to(self, device) -> "DocumentLayout":
        if torch.device(device) == self.device:
            return self
        out = DocumentLayout(self.doc_ids.to(device))
        if "bounds" in self._cache:
            out._cache["bounds"] = self._cache["bounds"]
        return out

    def boundaries(self) -> tuple[tuple[int, ...], ...]:
        """Per row, the document boundaries as Python ints ``(0, c_1, ..., s)`` (cached)."""
        if "bounds" not in self._cache:
            ids = self.doc_ids.cpu()
            s = ids.shape[1]
            out = []
            for row in ids:
                change = (torch.nonzero(row[1:] != row[:-1]).flatten() + 1).tolist()
                out.append(tuple([0] + change + [s]))
            self._cache["bounds"] = tuple(out)
        return self._cache["bounds"]

    def cu_seqlens(self) -> list[torch.Tensor]:
        """Per row, int32 cumulative lengths on the layout's device (cached)."""
        if "cu_rows" not in self._cache:
            self._cache["cu_rows"] = [
                torch.tensor(b, dtype=torch.int32, device=self.device) for b in self.boundaries()
            ]
        return self._cache["cu_rows"]

    def cu_seqlens_flat(self) -> torch.Tensor:
        """int32 cumulative lengths over the rows concatenated (``b * s`` tokens, THD order)."""
        if "cu_flat" not in self._cache:
            s = self.seq_len
            flat = [0]
            for r, b in enumerate(self.boundaries()):
                flat.extend(r * s + x for x in b[1:])
            self._cache["cu_flat"] = torch.tensor(flat, dtype=torch.int32, device=self.device)
        return self._cache["cu_flat"]

    def max_doc_len(self) -> int:
        return max(b[i + 1] - b[i] for b in self.boundaries() for i in range(len(b) - 1))

    def doc_start(self) -> torch.Tensor:
        """int64 ``[b, s]``: global position of the first token of each token's document."""
        if "doc_start" not in self._cache:
            s = self.seq_len
            pos = torch.arange(s, device=self.device).expand(self.batch, s)
            first = torch.ones_like(self.doc_ids, dtype=torch.bool)
            first[:, 1:] = self.doc_ids[:, 1:] != self.doc_ids[:, :-1]
            start = torch.where(first, pos, torch.zeros_like(pos))
            self._cache["doc_start"] = torch.cummax(start, dim=1).values
        return self._cache["doc_start"]

    def is_single_document(self) -> bool:
        if "single" not in self._cache:
            self._cache["single"] = all(len(b) == 2 for b in self.boundaries())
        return self._cache["single"]

    def sum_squared_lengths(self) -> int:
        """Sum over documents of L * (L + 1) / 2: the number of unmasked (query, key) pairs."""
        return sum(
            (b[i + 1] - b[i]) * (b[i + 1] - b[i] + 1) // 2
            for b in self.boundaries()
            for i in range(len(b) - 1)
        )
