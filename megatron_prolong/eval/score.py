"""Per-token log-probabilities of packed lines under a Megatron checkpoint, document by document.

Each input line has ``input_ids`` and optional ``indices`` ((start, end) document boundaries, as in
ProLong's data). The model attends only within documents, so every document of a packed line is
scored as if it were alone; the first token of a document has no log-probability (``None``).
The vocabulary-parallel log-softmax runs over the real vocabulary only (padding rows excluded) and
in blocks of ``chunk`` tokens, so the full [sequence x vocabulary] logits never exist at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_prolong import inference
from megatron_prolong.attention.context_parallel import zigzag_indices
from megatron_prolong.eval.model import forward_hidden, output_logits, packed_line, vocab_parallel_logprobs
from megatron_prolong.eval.rows import map_rows, read_lines, write_rows


@torch.no_grad()
def score_line(gpt, tokens: Sequence[int], indices, vocab_size: int, rope_mode: str, *,
               chunk: int = 2048) -> list[float | None]:
    """Log p(token | earlier tokens of its document) for every token of one line (None at document starts)."""
    from megatron.core import parallel_state

    n = len(tokens)
    if n == 0:
        return []
    device = next(gpt.parameters()).device
    line = packed_line(tokens, indices, vocab_size, rope_mode, device)
    s = line.padded
    full = torch.zeros(s, dtype=torch.long, device=device)
    full[:n] = torch.as_tensor(list(tokens), dtype=torch.long)
    targets = torch.roll(full, -1)[line.index]
    hidden = forward_hidden(gpt, line.ids, line.packed)  # [s_local, 1, h]
    tp_group = parallel_state.get_tensor_model_parallel_group()
    out = []
    for a in range(0, hidden.shape[0], chunk):
        logits = output_logits(gpt, hidden[a:a + chunk])
        out.append(vocab_parallel_logprobs(logits[:, 0], targets[a:a + chunk], vocab_size, tp_group))
    lp_local = torch.cat(out)
    cp = parallel_state.get_context_parallel_world_size()
    if cp > 1:
        group = parallel_state.get_context_parallel_group()
        parts = [torch.empty_like(lp_local) for _ in range(cp)]
        dist.all_gather(parts, lp_local, group=group)
        lp = torch.empty(s, dtype=lp_local.dtype, device=device)
        for r, part in enumerate(parts):
            lp[zigzag_indices(s, cp, r, device=device)] = part
    else:
        lp = lp_local
    doc = line.packed.layout.doc_ids[0].cpu()
    lp = lp.cpu().tolist()
    return [None] + [lp[j - 1] if doc[j] == doc[j - 1] else None for j in range(1, n)]


def score_file(checkpoint: str | Path, input_path: str | Path, output_path: str | Path, *, tp: int = 1, cp: int = 1,
               dtype: str | None = None, chunk: int = 2048) -> int:
    """Score every line; data-parallel ranks split the lines, rank 0 writes the output (atomically)."""
    from megatron_prolong.config import ParallelConfig

    rows = read_lines(input_path)
    with inference.megatron_session(ParallelConfig(tp=tp, cp=cp)) as topo:
        gpt, meta = inference.load_model(checkpoint, ParallelConfig(tp=tp, cp=cp), dtype)
        vocab_size = int(meta["vocab_size"])
        rope_mode = meta["model"].get("rope_positions", "continuous")
        results = map_rows(rows, lambda row: {"token_logprobs": score_line(
            gpt, row["input_ids"], row.get("indices"), vocab_size, rope_mode, chunk=chunk)}, topo, str(input_path))
        if topo.rank == 0:
            write_rows(output_path, rows, results)
        if dist.is_initialized():
            dist.barrier()
    return len(rows)
