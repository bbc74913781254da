"""Per-token log-probabilities of packed lines under a Megatron checkpoint, document by document.

Each input line has ``input_ids`` and optional ``indices`` ((start, end) document boundaries, as in
ProLong's data). The model attends only within documents, so every document of a packed line is
scored as if it were alone; the first token of a document has no log-probability (``None``).
The vocabulary-parallel log-softmax runs over the real vocabulary only (padding rows excluded) and
in blocks of ``chunk`` tokens, so the full [sequence x vocabulary] logits never exist at once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_prolong.attention.context_parallel import zigzag_indices
from megatron_prolong.attention.layout import DocumentLayout
from megatron_prolong.model.packed import DocumentPackedSeqParams, rope_positions


class ScoreInputError(ValueError):
    """A malformed input line; the message names the line."""


def boundaries(n_tokens: int, indices: Sequence[Sequence[int]] | None) -> list[int]:
    """Cumulative document boundaries ``[0, ..., n]`` from (start, end) pairs (gaps become documents)."""
    if not indices:
        return [0, n_tokens]
    cuts = {0, n_tokens}
    last_end = 0
    for pair in sorted((int(a), int(b)) for a, b in indices):
        a, b = pair
        if not 0 <= a < b <= n_tokens:
            raise ScoreInputError(f"document ({a}, {b}) is not inside the {n_tokens} tokens")
        if a < last_end:
            raise ScoreInputError(f"document ({a}, {b}) overlaps the previous one (ends at {last_end})")
        cuts.update((a, b))
        last_end = b
    return sorted(cuts)


def _vocab_parallel_logprobs(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, tp_group) -> torch.Tensor:
    """log softmax(logits)[target] over the real vocabulary; logits [n, V/tp] are this TP rank's columns."""
    from megatron.core import parallel_state

    logits = logits.float()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    width = logits.shape[-1]
    lo = tp_rank * width
    cols = torch.arange(lo, lo + width, device=logits.device)
    logits = logits.masked_fill(cols >= vocab_size, float("-inf"))
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    mx = logits.max(dim=-1).values
    if tp > 1:
        dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=tp_group)
    sumexp = torch.exp(logits - mx[:, None]).sum(dim=-1)
    local = (targets >= lo) & (targets < lo + width)
    tgt = torch.where(local, logits.gather(1, (targets - lo).clamp(0, width - 1)[:, None])[:, 0],
                      torch.zeros_like(mx))
    if tp > 1:
        dist.all_reduce(sumexp, group=tp_group)
        dist.all_reduce(tgt, group=tp_group)
    return tgt - mx - torch.log(sumexp)


@torch.no_grad()
def score_line(gpt, tokens: Sequence[int], indices, vocab_size: int, rope_mode: str, *,
               chunk: int = 2048) -> list[float | None]:
    """Log p(token | earlier tokens of its document) for every token of one line (None at document starts)."""
    from megatron.core import parallel_state

    n = len(tokens)
    if n == 0:
        return []
    if any(not 0 <= int(t) < vocab_size for t in tokens):
        raise ScoreInputError(f"input_ids must be in [0, {vocab_size}) for this checkpoint")
    cuts = boundaries(n, indices)
    cp = parallel_state.get_context_parallel_world_size()
    cp_rank = parallel_state.get_context_parallel_rank()
    multiple = 2 * cp if cp > 1 else 1
    s = -(-n // multiple) * multiple
    if s > n:
        cuts = cuts + [s]  # padding: its own document, never scored
    device = next(gpt.parameters()).device
    ids = torch.zeros(1, s, dtype=torch.long, device=device)
    ids[0, :n] = torch.as_tensor(list(tokens), dtype=torch.long)
    cu = torch.tensor([cuts], dtype=torch.int32, device=device)
    layout = DocumentLayout.from_cu_seqlens(cu, s)
    positions = rope_positions(layout, rope_mode)
    idx = zigzag_indices(s, cp, cp_rank, device=device)
    targets = torch.roll(ids[0], -1)[idx]
    packed = DocumentPackedSeqParams(qkv_format="sbhd", layout=layout, positions=positions[:, idx].t().contiguous())
    post = gpt.post_process
    gpt.post_process = False  # hidden states out; the output layer runs below in blocks
    try:
        hidden = gpt(ids[:, idx], None, None, packed_seq_params=packed)  # [s_local, 1, h]
    finally:
        gpt.post_process = post
    weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None
    tp_group = parallel_state.get_tensor_model_parallel_group()
    out = []
    for a in range(0, hidden.shape[0], chunk):
        logits, _ = gpt.output_layer(hidden[a:a + chunk], weight=weight, runtime_gather_output=False)
        out.append(_vocab_parallel_logprobs(logits[:, 0], targets[a:a + chunk], vocab_size, tp_group))
    lp_local = torch.cat(out)
    if cp > 1:
        group = parallel_state.get_context_parallel_group()
        parts = [torch.empty_like(lp_local) for _ in range(cp)]
        dist.all_gather(parts, lp_local, group=group)
        lp = torch.empty(s, dtype=lp_local.dtype, device=device)
        for r, part in enumerate(parts):
            lp[zigzag_indices(s, cp, r, device=device)] = part
    else:
        lp = lp_local
    doc = layout.doc_ids[0].cpu()
    lp = lp.cpu().tolist()
    return [None] + [lp[j - 1] if doc[j] == doc[j - 1] else None for j in range(1, n)]


def read_lines(path: str | Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for k, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ScoreInputError(f"{path}:{k}: not JSON ({err})") from err
            if not isinstance(row, dict) or "input_ids" not in row:
                raise ScoreInputError(f"{path}:{k}: each line needs an object with input_ids")
            rows.append(row)
    return rows


def score_file(checkpoint: str | Path, input_path: str | Path, output_path: str | Path, *, tp: int = 1, cp: int = 1,
               dtype: str | None = None, chunk: int = 2048) -> int:
    """Score every line; data-parallel ranks split the lines, rank 0 writes the output (atomically)."""
    from megatron_prolong.config import ParallelConfig
    from megatron_prolong.convert.mcore import megatron_session
    from megatron_prolong.eval.model import load_eval_model

    rows = read_lines(input_path)
    with megatron_session(ParallelConfig(tp=tp, cp=cp)) as topo:
        gpt, meta = load_eval_model(checkpoint, ParallelConfig(tp=tp, cp=cp), dtype)
        vocab_size = int(meta["vocab_size"])
        rope_mode = meta["model"].get("rope_positions", "continuous")
        mine: dict[int, list] = {}
        for k, row in enumerate(rows):
            if k % topo.dp_size != topo.dp_rank:
                continue
            try:
                mine[k] = score_line(gpt, row["input_ids"], row.get("indices"), vocab_size, rope_mode, chunk=chunk)
            except ScoreInputError as err:
                raise ScoreInputError(f"{input_path}: line {k + 1}: {err}") from err
        results: dict[int, list] = dict(mine)
        if topo.world_size > 1:
            gathered: list = [None] * topo.world_size
            dist.all_gather_object(gathered, mine)
            for part in gathered:
                results.update(part)
        if topo.rank == 0:
            _write_rows(output_path, rows, results)
        if dist.is_initialized():
            dist.barrier()
    return len(rows)


def _write_rows(path: str | Path, rows: Iterable[dict], results: dict[int, list]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for k, row in enumerate(rows):
            f.write(json.dumps(dict(row, token_logprobs=results[k])) + "\n")
    os.replace(tmp, path)
