#!/usr/bin/env python
"""FP8 against bf16 from the same start: a small Llama-shaped model (8 layers, hidden 2048) trained
on real text with the plugin's layer and TE's linears, once in bf16 and once per FP8 recipe.

    PYTHONPATH=. python tools/fp8_numerics.py --out $OUT --steps 300

The text is the Python standard library's source files (one document each, byte tokenizer): it is
on every machine, the GPU machines included, which reach no network. The runs share the seed, so
the same initial weights (drawn per parameter name) and the same batches; only ``model.fp8``
differs. Writes ``fp8_numerics.json`` (per-step losses per run, the mean loss of the last
``--tail`` steps and its difference from bf16's) and ``fp8_numerics.png`` (the loss curves).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = ("model.num_layers=8", "model.hidden_size=2048", "model.ffn_hidden_size=5632",
         "model.num_attention_heads=16", "model.num_query_groups=4")


def write_text(folder: Path, source: Path, min_bytes: int) -> int:
    """One jsonl record per source file of at least ``min_bytes``; returns the count."""
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(folder / "text.jsonl", "w") as f:
        for path in sorted(source.rglob("*.py")):
            text = path.read_text(errors="replace")
            if len(text.encode()) >= min_bytes:
                f.write(json.dumps({"text": text}) + "\n")
                n += 1
    return n


def run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def plot(curves: dict[str, list[float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (full, diff) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=(2, 1))
    for name, ys in curves.items():
        full.plot(range(1, len(ys) + 1), ys, label=name, linewidth=1)
    full.set_ylabel("training loss (per byte)")
    full.set_title(title)
    full.legend()
    base = curves["bf16"]
    for name, ys in curves.items():
        if name != "bf16":
            diff.plot(range(1, len(ys) + 1), [a - b for a, b in zip(ys, base)], label=f"{name} - bf16", linewidth=1)
    diff.axhline(0.0, color="black", linewidth=0.5)
    diff.set_xlabel("step")
    diff.set_ylabel("loss difference")
    diff.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seq", type=int, default=16384, help="tokens per sequence (8K-16K)")
    p.add_argument("--global-batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--recipes", default="delayed,tensorwise", type=lambda s: [x for x in s.split(",") if x])
    p.add_argument("--tail", type=int, default=20, help="final loss: the mean of this many last steps")
    p.add_argument("--text", default=sysconfig.get_paths()["stdlib"], help="folder of .py files to train on")
    p.add_argument("--work", default="/tmp/fp8_numerics")
    args = p.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    docs = write_text(work / "raw", Path(args.text), min_bytes=2048)
    run([sys.executable, "tools/prepare_data.py", str(work / "raw" / "text.jsonl"), "--output", str(work / "data"),
         "--name", "text", "--tokenizer", "byte", "--seq-length", str(args.seq), "--quiet"], out / "prepare.log")
    common = [*MODEL, "tokenizer=byte", "data.synthetic=false", f"data.root={work / 'data'}",
              "data.mixture=[{name:text,path:text,share:1.0}]", f"data.seq_length={args.seq}",
              f"train.steps={args.steps}", f"train.global_batch_size={args.global_batch}", "train.micro_batch_size=1",
              f"train.lr={args.lr}", "train.precision=bf16", "train.memory_check=off", "checkpoint.save_interval=0",
              "log.tensorboard=false", "model.attention_backend=plugin", "model.linear=te"]
    curves, seconds = {}, {}
    for name, fp8 in [("bf16", "none"), *((f"fp8_{r}", r) for r in args.recipes)]:
        t0 = time.perf_counter()
        run_dir = work / "runs" / name
        run([sys.executable, "-m", "megatron_prolong.train", f"run.dir={run_dir}", *common, f"model.fp8={fp8}"],
            out / f"train_{name}.log")
        seconds[name] = time.perf_counter() - t0
        curves[name] = losses(run_dir)
        print(f"[fp8] {name}: final loss {curves[name][-1]:.4f} ({seconds[name]:.0f} s)", flush=True)
    tail = {name: sum(ys[-args.tail:]) / len(ys[-args.tail:]) for name, ys in curves.items()}
    report = {"date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:], "model": MODEL, "documents": docs,
              "seq": args.seq, "global_batch": args.global_batch, "steps": args.steps, "lr": args.lr,
              "seconds": seconds, "losses": curves, f"mean_loss_last_{args.tail}": tail,
              "difference_from_bf16": {n: tail[n] - tail["bf16"] for n in tail if n != "bf16"}}
    (out / "fp8_numerics.json").write_text(json.dumps(report, indent=1))
    plot(curves, out / "fp8_numerics.png",
         f"8 layers, hidden 2048, {args.seq} bytes x {args.global_batch} per step: TE linears, bf16 vs FP8")
    print("[fp8] mean loss of the last steps:", json.dumps(tail), "difference from bf16:",
          json.dumps(report["difference_from_bf16"]), flush=True)


if __name__ == "__main__":
    main()
