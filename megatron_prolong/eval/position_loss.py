"""Mean loss by token position within the document, in log-spaced buckets ([1, 2), [2, 4), ...,
[2^k, 2^(k+1))), on held-out long documents: does the model use the far context?

Documents come from a jsonl file (``input_ids``, optional ``indices``; or ``text``, tokenized with
the checkpoint's tokenizer) or an MDS folder (ProLong's format). Every document is scored alone
(document-masked attention), with the training forward in any TP/CP layout; a sequence longer
than the model's length is cut to it (the number cut is reported).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch.distributed as dist

from megatron_prolong import inference
from megatron_prolong.eval.rows import EvalInputError, map_rows, read_lines
from megatron_prolong.eval.score import score_line


def read_sequences(path: str | Path, encode: Callable[[str], list[int]], limit: int | None) -> list[dict]:
    """``{"input_ids", "indices"}`` per sequence, from jsonl or an MDS folder (at most ``limit``)."""
    p = Path(path)
    rows: list[dict] = []
    if p.is_dir():
        from megatron_prolong.data.sources import MDSSource

        src = MDSSource("heldout", str(p))
        for i in range(len(src) if limit is None else min(limit, len(src))):
            s = src.get(i)
            rows.append({"input_ids": s.input_ids.tolist(), "indices": s.indices.tolist()})
        return rows
    if not p.is_file():
        raise EvalInputError(f"--data {p} is neither a jsonl file nor an MDS folder")
    for row in read_lines(p, keys=("input_ids", "text")):
        if "input_ids" in row:
            rows.append({"input_ids": [int(t) for t in row["input_ids"]], "indices": row.get("indices")})
        else:
            rows.append({"input_ids": encode(row["text"]), "indices": None})
        if limit is not None and len(rows) >= limit:
            break
    return rows


def bucket_of(position: int) -> int:
    """Bucket b holds positions [2^b, 2^(b+1)) (position 0, a document's first token, has no loss)."""
    return int(math.log2(position))


def bucket_losses(per_line: Iterable[tuple[list, list]]) -> list[dict]:
    """(token log-probabilities, document start of each token) per line -> mean loss per bucket."""
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for logprobs, starts in per_line:
        for j, (lp, start) in enumerate(zip(logprobs, starts)):
            if lp is None:
                continue
            b = bucket_of(j - start)
            sums[b] = sums.get(b, 0.0) - lp
            counts[b] = counts.get(b, 0) + 1
    return [{"start": 2**b, "end": 2 ** (b + 1), "loss": sums[b] / counts[b], "tokens": counts[b]}
            for b in sorted(sums)]


def _doc_starts(n: int, indices) -> list[int]:
    from megatron_prolong.eval.rows import boundaries

    cuts = boundaries(n, indices)
    out = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        out.extend([a] * (b - a))
    return out


def position_loss(gpt, rows: list[dict], vocab_size: int, rope_mode: str, max_length: int, topo) -> dict:
    """Bucketed losses over ``rows`` (data-parallel ranks split them); the same result on every rank."""
    cut = sum(len(r["input_ids"]) > max_length for r in rows)

    def one(row: dict) -> dict:
        ids = row["input_ids"][:max_length]
        indices = [[a, min(b, max_length)] for a, b in (row["indices"] or []) if a < max_length] or None
        return {"logprobs": score_line(gpt, ids, indices, vocab_size, rope_mode), "starts": _doc_starts(len(ids), indices)}

    scored = map_rows(rows, one, topo, "position-loss")
    buckets = bucket_losses((scored[k]["logprobs"], scored[k]["starts"]) for k in range(len(rows)))
    return {"buckets": buckets, "sequences": len(rows), "sequences_cut_to_max_length": cut, "max_length": max_length}


def plot(result: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = result["buckets"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([x["start"] for x in b], [x["loss"] for x in b], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("token position in document (bucket start)")
    ax.set_ylabel("mean loss (nats)")
    ax.set_title("loss by position")
    ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def position_loss_main(checkpoint: str | Path, data: str | Path, out: str | Path, *, tp: int = 1, cp: int = 1,
                       dtype: str | None = None, max_sequences: int | None = None) -> dict:
    """``eval_long.py position-loss``: OUT/position_loss.json and OUT/position_loss.png."""
    from megatron_prolong.config import ParallelConfig
    from megatron_prolong.eval.model import load_tokenizer
    from megatron_prolong.tokenizer import encode_prompt

    tokenizer = load_tokenizer(checkpoint)
    rows = read_sequences(data, lambda t: encode_prompt(tokenizer, t), max_sequences)
    if not rows:
        raise EvalInputError(f"--data {data} holds no sequences")
    with inference.megatron_session(ParallelConfig(tp=tp, cp=cp)) as topo:
        gpt, meta = inference.load_model(checkpoint, ParallelConfig(tp=tp, cp=cp), dtype)
        result = position_loss(gpt, rows, int(meta["vocab_size"]), meta["model"].get("rope_positions", "continuous"),
                               int(meta["seq_length"]), topo)
        if topo.rank == 0:
            out = Path(out)
            out.mkdir(parents=True, exist_ok=True)
            result = {"checkpoint": str(checkpoint), "data": str(data), **result}
            (out / "position_loss.json").write_text(json.dumps(result, indent=2))
            plot(result, out / "position_loss.png")
            for x in result["buckets"]:
                print(f"positions [{x['start']:>7}, {x['end']:>7}): loss {x['loss']:.4f} ({x['tokens']} tokens)")
            print(f"[position-loss] wrote {out / 'position_loss.json'}, {out / 'position_loss.png'}")
        if dist.is_initialized():
            dist.barrier()
    return result
