"""JSON-lines inputs and outputs of the evaluation tools, split over data-parallel ranks."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch.distributed as dist


class EvalInputError(ValueError):
    """A malformed input line or an input the model cannot take; the message names it and the fix."""


def boundaries(n_tokens: int, indices: Sequence[Sequence[int]] | None) -> list[int]:
    """Cumulative document boundaries ``[0, ..., n]`` from (start, end) pairs (gaps become documents)."""
    if not indices:
        return [0, n_tokens]
    cuts = {0, n_tokens}
    last_end = 0
    for pair in sorted((int(a), int(b)) for a, b in indices):
        a, b = pair
        if not 0 <= a < b <= n_tokens:
            raise EvalInputError(f"document ({a}, {b}) is not inside the {n_tokens} tokens")
        if a < last_end:
            raise EvalInputError(f"document ({a}, {b}) overlaps the previous one (ends at {last_end})")
        cuts.update((a, b))
        last_end = b
    return sorted(cuts)


def read_lines(path: str | Path, keys: tuple[str, ...] = ("input_ids",)) -> list[dict]:
    """JSON objects, one a line; each must have one of ``keys``."""
    rows = []
    with open(path) as f:
        for k, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalInputError(f"{path}:{k}: not JSON ({err})") from err
            if not isinstance(row, dict) or not any(key in row for key in keys):
                raise EvalInputError(f"{path}:{k}: each line needs {' or '.join(keys)} (one JSON object a line)")
            rows.append(row)
    return rows


def map_rows(rows: list[dict], fn: Callable[[dict], dict], topo, label: str = "input") -> dict[int, dict]:
    """``fn(row)`` for every row, data-parallel ranks taking turns; every rank gets all results.

    Model-parallel ranks (TP, CP) of one replica run the same rows together.
    """
    return map_batches(rows, lambda batch: [fn(row) for row in batch], topo, label, lambda row: 1)


def map_batches(rows: list[dict], fn: Callable[[list[dict]], list[dict]], topo, label: str,
                batch_of: Callable[[dict], int], order: Callable[[dict], object] = lambda row: 0) -> dict[int, dict]:
    """``fn`` on batches of rows, every rank getting all results (as :func:`map_rows`).

    This rank's rows (data-parallel ranks taking turns) are sorted by ``order`` (e.g. the prompt
    length, so a batch wastes little cache on padding) and cut into batches: a batch starting at
    ``row`` holds at most ``batch_of(row)`` rows of the same ``order``.
    """
    mine_idx = sorted((k for k in range(len(rows)) if k % topo.dp_size == topo.dp_rank),
                      key=lambda k: (order(rows[k]), k))
    mine: dict[int, dict] = {}
    i = 0
    while i < len(mine_idx):
        first = rows[mine_idx[i]]
        size = max(1, batch_of(first))
        batch = [k for k in mine_idx[i:i + size] if order(rows[k]) == order(first)]
        try:
            outs = fn([rows[k] for k in batch])
        except EvalInputError as err:
            raise EvalInputError(f"{label}: line {batch[0] + 1}: {err}") from err
        mine.update(zip(batch, outs, strict=True))
        i += len(batch)
    results = dict(mine)
    if topo.world_size > 1:
        gathered: list = [None] * topo.world_size
        dist.all_gather_object(gathered, mine)
        for part in gathered:
            results.update(part)
    return results


def write_rows(path: str | Path, rows: Sequence[dict], results: dict[int, dict]) -> None:
    """Each input row updated with its results, written atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for k, row in enumerate(rows):
            f.write(json.dumps(dict(row, **results[k])) + "\n")
    os.replace(tmp, path)
