"""The recall suite: generate the tasks with the checkpoint's tokenizer, decode greedily, score as
HELMET does, and report by task x length x needle depth (JSON, console table, heat map)."""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch.distributed as dist

from megatron_prolong.eval.generate import Generator
from megatron_prolong.eval.metrics import qa_metrics, ruler_recall
from megatron_prolong.eval.rows import EvalInputError, map_rows
from megatron_prolong.eval.tasks import Sample, check_tasks, make_samples


def read_haystack(path: str | Path | None) -> tuple[str | None, dict | None]:
    """The user's prose for ruler_mv and what to record about it (path, size, SHA-256)."""
    if not path:
        return None, None
    p = Path(path)
    if not p.is_file():
        raise EvalInputError(f"--haystack-file {p} does not exist; give a plain-text prose file (e.g. essays)")
    text = p.read_text(errors="replace")
    return text, {"path": str(p.resolve()), "words": len(text.split()),
                  "sha256": hashlib.sha256(text.encode()).hexdigest()}


def score_sample(sample: Sample, text: str) -> float:
    """HELMET's metric for the task, on the answer prefix plus the generated text, as a percentage."""
    prediction = sample.answer_prefix + text
    if sample.task == "json_kv":
        return 100.0 * qa_metrics(prediction, sample.answers, sample.answer_prefix)["substring_exact_match"]
    return 100.0 * ruler_recall(prediction, sample.answers)


def build_samples(tasks: Sequence[str], lengths: Sequence[int], num: int, encode: Callable[[str], list[int]],
                  seed: int, haystack_text: str | None, max_length: int) -> list[Sample]:
    """Every sample, or a clear error before any generation (unknown task, a length the model cannot take)."""
    check_tasks(list(tasks), haystack_text)
    too_long = [n for n in lengths if n > max_length]
    if too_long:
        raise EvalInputError(
            f"length(s) {', '.join(map(str, too_long))} exceed the model's length {max_length} (its trained "
            "seq_length); drop them or pass --max-length to evaluate beyond the trained length on purpose")
    return [s for task in tasks for n in lengths for s in make_samples(task, n, num, encode, seed, haystack_text)]


def run_recall(gen: Generator, decode: Callable[[list[int]], str], samples: list[Sample], topo,
               log: Callable[[str], None] = print) -> dict:
    """Generate and score every sample (data-parallel ranks split them); the same summary on every rank."""
    start = time.monotonic()
    done = [0]

    def one(row: dict) -> dict:
        s = samples[row["k"]]
        g = gen.generate(s.input_ids, s.max_new_tokens)
        ids = g.output_ids[:-1] if g.output_ids[-1] in gen.eos_ids else g.output_ids
        text = decode(ids)
        done[0] += 1
        if done[0] % 10 == 0 or done[0] == 1:
            log(f"[recall] {done[0]} samples on this rank ({time.monotonic() - start:.0f} s), last: {s.task} "
                f"{s.length} tokens")
        return {"text": text, "score": score_sample(s, text), "prefill_s": g.prefill_s, "decode_s": g.decode_s}

    outputs = map_rows([{"k": k} for k in range(len(samples))], one, topo, "recall")
    return summarize(samples, outputs, time.monotonic() - start)


def summarize(samples: list[Sample], outputs: dict[int, dict], seconds: float) -> dict:
    by_cell: dict = defaultdict(list)
    by_depth: dict = defaultdict(list)
    for k, s in enumerate(samples):
        by_cell[s.task, s.length].append(outputs[k]["score"])
        by_depth[s.task, s.length, s.depth].append(outputs[k]["score"])
    tasks: dict = defaultdict(dict)
    for (task, length), scores in by_cell.items():
        depths = {str(d): sum(v) / len(v) for (t, n, d), v in sorted(by_depth.items()) if t == task and n == length}
        tasks[task][str(length)] = {"score": sum(scores) / len(scores), "n": len(scores), "by_depth": depths}
    per_sample = [{"task": s.task, "length": s.length, "index": s.index, "depth": s.depth,
                   "prompt_tokens": len(s.input_ids), "answers": s.answers, **outputs[k]}
                  for k, s in enumerate(samples)]
    return {"tasks": dict(tasks), "metric": {t: "substring_exact_match" if t == "json_kv" else "ruler_recall"
                                             for t in tasks}, "seconds": seconds, "samples": per_sample}


def table(results: dict) -> str:
    """Tasks by lengths, scores in percent, with each task's average."""
    lengths = sorted({int(n) for cells in results["tasks"].values() for n in cells})
    head = f"{'task':<12}" + "".join(f"{n:>9}" for n in lengths) + f"{'avg':>9}"
    lines = [head, "-" * len(head)]
    for task, cells in results["tasks"].items():
        scores = [cells[str(n)]["score"] if str(n) in cells else float("nan") for n in lengths]
        avg = sum(scores) / len(scores)
        lines.append(f"{task:<12}" + "".join(f"{x:>9.1f}" for x in scores) + f"{avg:>9.1f}")
    return "\n".join(lines)


def heatmap(results: dict, path: str | Path, bins: int = 10) -> None:
    """Score by length (x) and needle depth (y, ``bins`` bands of the 0-100 % range), one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = list(results["tasks"])
    lengths = sorted({int(n) for cells in results["tasks"].values() for n in cells})
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks) + 1, 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        grid = np.full((bins, len(lengths)), np.nan)
        for j, n in enumerate(lengths):
            cell = results["tasks"][task].get(str(n))
            if cell is None:
                continue
            sums, counts = np.zeros(bins), np.zeros(bins)
            for depth, score in cell["by_depth"].items():
                b = min(int(depth) * bins // 100, bins - 1)
                sums[b] += score
                counts[b] += 1
            grid[:, j] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        im = ax.imshow(grid, origin="lower", aspect="auto", vmin=0, vmax=100, cmap="RdYlGn")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths], rotation=45)
        ax.set_yticks(range(bins), [f"{100 * b // bins}%" for b in range(bins)])
        ax.set_title(task)
        ax.set_xlabel("length")
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist(), label="score (%)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def recall_main(checkpoint: str | Path, tasks: Sequence[str], lengths: Sequence[int], num: int, out: str | Path, *,
                seed: int = 0, haystack_file: str | None = None, tp: int = 1, cp: int = 1, dtype: str | None = None,
                max_length: int | None = None) -> dict:
    """``eval_long.py recall``: results.json, samples.jsonl, recall_heatmap.png under ``out``."""
    from megatron_prolong.config import ParallelConfig
    from megatron_prolong.convert.mcore import megatron_session, read_checkpoint
    from megatron_prolong.eval.model import encode_prompt, eos_ids, load_eval_model, load_tokenizer

    haystack_text, haystack_info = read_haystack(haystack_file)
    check_tasks(list(tasks), haystack_text)
    tokenizer = load_tokenizer(checkpoint)
    _, meta = read_checkpoint(checkpoint)
    limit = max_length or int(meta["seq_length"])
    samples = build_samples(tasks, lengths, num, lambda t: encode_prompt(tokenizer, t), seed, haystack_text, limit)
    with megatron_session(ParallelConfig(tp=tp, cp=cp)) as topo:
        gpt, meta = load_eval_model(checkpoint, ParallelConfig(tp=tp, cp=cp), dtype)
        gen = Generator(gpt, int(meta["vocab_size"]), meta["model"].get("rope_positions", "continuous"),
                        eos_ids(checkpoint, tokenizer), limit)
        log = print if topo.rank == 0 else (lambda msg: None)
        results = run_recall(gen, tokenizer.decode, samples, topo, log)
        if topo.rank == 0:
            write_results(results, out, {"checkpoint": str(checkpoint), "seed": seed, "samples_per_cell": num,
                                         "haystack_file": haystack_info})
            print(table(results))
        if dist.is_initialized():
            dist.barrier()
    return results


def write_results(results: dict, out: str | Path, info: dict) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "samples.jsonl", "w") as f:
        for row in results["samples"]:
            f.write(json.dumps(row) + "\n")
    summary = {k: v for k, v in results.items() if k != "samples"}
    (out / "results.json").write_text(json.dumps({**info, **summary}, indent=2))
    heatmap(results, out / "recall_heatmap.png")
