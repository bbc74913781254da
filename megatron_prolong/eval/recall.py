"""The recall suite: generate the tasks with the checkpoint's tokenizer, decode greedily, score as
HELMET does, and report by task x length x needle depth (JSON, console table, heat map)."""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch.distributed as dist

from megatron_prolong import inference
from megatron_prolong.eval.generate import Generator
from megatron_prolong.eval.metrics import qa_metrics, ruler_recall
from megatron_prolong.eval.rows import EvalInputError, map_batches
from megatron_prolong.eval.samples import (Sample, build_samples, check_lengths, check_tasks, default_tasks,
                                           read_haystack)
from megatron_prolong.eval.tasks import TASKS

#: what every score (cell, depth, sample) is: HELMET's metrics times 100
SCALE = "percent (0-100)"


def score_sample(sample: Sample, text: str) -> float:
    """HELMET's metric for the task, on the answer prefix plus the generated text, as a percentage."""
    prediction = sample.answer_prefix + text
    if sample.task == "json_kv":
        return 100.0 * qa_metrics(prediction, sample.answers, sample.answer_prefix)["substring_exact_match"]
    return 100.0 * ruler_recall(prediction, sample.answers)


def run_recall(gen: Generator, decode: Callable[[list[int]], str], samples: list[Sample], topo,
               log: Callable[[str], None] = print) -> dict:
    """Generate and score every sample (data-parallel ranks split them; samples of one length bucket
    are decoded ``gen.batch_size`` at a time); the same summary on every rank."""
    start = time.monotonic()
    done = [0]

    def run(batch: list[dict]) -> list[dict]:
        group = [samples[row["k"]] for row in batch]
        outs = []
        for s, g in zip(group, gen.generate_batch([s.input_ids for s in group], group[0].max_new_tokens)):
            ids = g.output_ids[:-1] if g.output_ids[-1] in gen.eos_ids else g.output_ids
            text = decode(ids)
            outs.append({"text": text, "score": score_sample(s, text), "prefill_s": g.prefill_s,
                         "decode_s": g.decode_s, "batch": g.stats["batch"]})
        before, done[0] = done[0], done[0] + len(batch)
        if done[0] // 10 > before // 10 or before == 0:
            log(f"[recall] {done[0]} samples on this rank ({time.monotonic() - start:.0f} s), last: "
                f"{group[-1].task} {group[-1].length} tokens")
        return outs

    def key(row: dict) -> tuple[int, int]:
        s = samples[row["k"]]
        return s.max_new_tokens, gen.bucket(len(s.input_ids), s.max_new_tokens)

    outputs = map_batches([{"k": k} for k in range(len(samples))], run, topo, "recall",
                          batch_of=lambda row: gen.rows_that_fit(len(samples[row["k"]].input_ids),
                                                                 samples[row["k"]].max_new_tokens),
                          order=key)
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
                   "prompt_tokens": len(s.input_ids), "haystack_units": s.units, "answers": s.answers, **outputs[k]}
                  for k, s in enumerate(samples)]
    return {"tasks": dict(tasks), "scale": SCALE,
            "metric": {t: "substring_exact_match" if t == "json_kv" else "ruler_recall" for t in tasks},
            "seconds": seconds, "samples": per_sample}


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


def recall_main(checkpoint: str | Path, tasks: Sequence[str] | None, lengths: Sequence[int], num: int,
                out: str | Path, *, seed: int = 0, haystack_file: str | None = None, tp: int = 1, cp: int = 1,
                dtype: str | None = None, max_length: int | None = None, batch_size: int = 1,
                graphs: str = "auto") -> dict:
    """``eval_long.py recall``: results.json, samples.jsonl, recall_heatmap.png under ``out``.
    ``tasks`` None: every task that works at all ``lengths`` (:func:`default_tasks`), the others
    named with the reason; named tasks that cannot work are refused instead."""
    from megatron_prolong.config import ParallelConfig
    from megatron_prolong.eval.model import eos_ids, load_tokenizer
    from megatron_prolong.tokenizer import encode_prompt

    haystack_text, haystack_info = read_haystack(haystack_file)
    if tasks is not None:
        check_tasks(list(tasks), haystack_text)
    tokenizer = load_tokenizer(checkpoint)
    _, meta = inference.read_checkpoint(checkpoint)
    limit = max_length or int(meta["seq_length"])
    encode = lambda t: encode_prompt(tokenizer, t)  # noqa: E731
    left_out: dict[str, str] = {}
    if tasks is None:
        check_lengths(lengths, limit)
        tasks, left_out = default_tasks(TASKS, lengths, num, encode, seed, haystack_text)
        if not tasks:
            raise EvalInputError(f"no recall task works at {min(lengths)} tokens with this tokenizer: " +
                                 "; ".join(f"{t} {why}" for t, why in left_out.items()) +
                                 "; give longer --lengths")
        if left_out and os.environ.get("RANK", "0") == "0":
            print(f"[recall] tasks: {', '.join(tasks)}; left out: " +
                  "; ".join(f"{t} ({why})" for t, why in left_out.items()))
    samples = build_samples(tasks, lengths, num, encode, seed, haystack_text, limit)
    with inference.megatron_session(ParallelConfig(tp=tp, cp=cp)) as topo:
        gpt, meta = inference.load_model(checkpoint, ParallelConfig(tp=tp, cp=cp), dtype)
        gen = Generator(gpt, int(meta["vocab_size"]), meta["model"].get("rope_positions", "continuous"),
                        eos_ids(checkpoint, tokenizer), limit, batch_size=batch_size, graphs=graphs)
        log = print if topo.rank == 0 else (lambda msg: None)
        results = run_recall(gen, tokenizer.decode, samples, topo, log)
        if topo.rank == 0:
            written = write_results(results, out, {"checkpoint": str(checkpoint), "seed": seed,
                                                   "samples_per_cell": num, "haystack_file": haystack_info,
                                                   "left_out": left_out})
            print(table(results))
            print("[recall] scores in percent (0-100); wrote " + ", ".join(map(str, written)))
        if dist.is_initialized():
            dist.barrier()
    return results


def write_results(results: dict, out: str | Path, info: dict) -> list[Path]:
    """OUT/results.json, OUT/samples.jsonl and OUT/recall_heatmap.png; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "samples.jsonl", "w") as f:
        for row in results["samples"]:
            f.write(json.dumps(row) + "\n")
    summary = {k: v for k, v in results.items() if k != "samples"}
    (out / "results.json").write_text(json.dumps({**info, **summary}, indent=2))
    heatmap(results, out / "recall_heatmap.png")
    return [out / "results.json", out / "samples.jsonl", out / "recall_heatmap.png"]
