"""Start-to-first-step time of a Llama-3-8B-shaped run that starts from a checkpoint, with and
without the random initialisation the trainer used to pay before loading.

1. Writes a model-only checkpoint of the 8B shape cut to ``--layers`` layers (bf16, weights drawn
   on the GPU: their values do not matter here).
2. Starts the trainer twice with ``checkpoint.load`` on it (``train.steps=3``, no saves) and kills
   it once the first step's metrics are written:
   - ``before``: the trainer with ``train.checkpoint.will_load`` forced to False, so the model is
     built through the existing random initialisation (``init_parameters``) and then loaded, which
     is what every start did before the initialisation was skipped;
   - ``after``: the trainer as it is.
   Each phase is timed from the trainer's own console lines as they arrive.

Results: ``start_time.json`` and ``start_time.png`` in ``--out``. On a lent GPU machine::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD python3 tools/gpu/start_time.py --layers 16 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The 8B model preset with the layer count cut; bf16 with its optimizer, short sequences.
RUN = ("train.precision=bf16", "data.seq_length=4096", "data.synthetic_sequences=8",
       "train.global_batch_size=1", "train.micro_batch_size=1", "train.steps=3", "checkpoint.save_interval=0",
       "checkpoint.load_optimizer=false", "log.tensorboard=false", "train.memory_check=off", "train.gpu=h200")
PHASES = (  # (name, console line that ends it)
    ("built", "random initialisation:"),  # drawn / skipped
    ("loaded", "initialised from"),
)
FORCE_INIT = ("import megatron_prolong.train.checkpoint as c; c.will_load = lambda root, load: False; "
              "from megatron_prolong.main import main; main()")


def write_checkpoint(path: Path, model: str, layers: int) -> None:
    """A model-only checkpoint as ``hf-to-mcore`` writes it, in a child process (its own GPU memory)."""
    code = f"""
import torch
from dataclasses import replace
from pathlib import Path
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from megatron_prolong.config import ParallelConfig, TrainConfig, register_configs
from megatron_prolong.convert.mcore import save_model, write_meta
from megatron_prolong.inference import megatron_session
from megatron_prolong.model.builder import build_model, build_transformer_config
from megatron_prolong.tokenizer import ByteTokenizer
register_configs()
with initialize_config_module("megatron_prolong.conf", version_base="1.3"):
    cfg = OmegaConf.to_object(compose("config", overrides=["model={model}", "model.num_layers={layers}"]))
m = replace(cfg.model, attention_backend="plugin")
vocab = m.vocab_size or ByteTokenizer.vocab_size
with megatron_session():
    tconfig = build_transformer_config(m, ParallelConfig(), TrainConfig(precision="bf16"))
    gpt = build_model(m, tconfig, vocab, 4096, seed=0, init=False)
    with torch.no_grad():
        for p in gpt.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    out = Path({str(path)!r})
    save_model(gpt, out)
    write_meta(out, m, vocab, 4096, None, {{"tool": "tools/gpu/start_time.py"}})
"""
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def time_start(mode: str, ckpt: Path, run_dir: Path, model: str, layers: int, timeout: float) -> dict:
    entry = ["-c", FORCE_INIT] if mode == "before" else ["-m", "megatron_prolong.train"]
    cmd = [sys.executable, *entry, f"run.dir={run_dir}", f"model={model}", *RUN, f"model.num_layers={layers}",
           f"checkpoint.load={ckpt}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    marks, lines = {}, []
    try:
        for line in proc.stdout:
            lines.append(line)
            now = time.monotonic() - start
            for name, text in PHASES:
                if text in line and name not in marks:
                    marks[name] = now
            if (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().strip():
                marks["first_step"] = now
                break
            if now > timeout:
                break
    finally:
        # Killed, not terminated: SIGTERM would make the trainer save a full checkpoint first.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if "first_step" not in marks:
        raise RuntimeError(f"{mode}: no first step within {timeout} s:\n" + "".join(lines[-40:]))
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    skipped = any("random initialisation: skipped" in line for line in lines)
    return {"mode": mode, "init_skipped": skipped, "seconds": marks, "first_step_time": record["step_time"],
            "first_step_loss": record["loss"], "log": "".join(lines[-30:])}


def plot(results: list[dict], path: Path, model: str, layers: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 2.8))
    colors = {"built": "C0", "loaded": "C1", "first_step": "C2"}  # phase -> colour, same in every row
    for row, r in enumerate(results):
        left = 0.0
        for name, color in colors.items():
            end = r["seconds"][name]
            ax.barh(row, end - left, left=left, color=color, label=name if row == 0 else None)
            left = end
        ax.text(left, row, f" {left:.0f} s", va="center")
    ax.set_yticks(range(len(results)), [r["mode"] for r in results])
    ax.set_xlabel("seconds from process start")
    ax.set_title(f"Start from a checkpoint: {model} with {layers} layers")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3_8b", help="model preset (tiny: a CPU smoke test of this tool)")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--work", default="/tmp/start_time")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    ap.add_argument("--timeout", type=float, default=540.0)
    args = ap.parse_args()
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = work / "ckpt"
    t = time.monotonic()
    write_checkpoint(ckpt, args.model, args.layers)
    print(f"checkpoint written in {time.monotonic() - t:.0f} s", flush=True)
    results = []
    for mode in ("before", "after"):
        r = time_start(mode, ckpt, work / f"run_{mode}", args.model, args.layers, args.timeout)
        print(f"{mode}: {json.dumps(r['seconds'])} (init skipped: {r['init_skipped']}, "
              f"first step {r['first_step_time']:.1f} s, loss {r['first_step_loss']:.3f})", flush=True)
        results.append(r)
    (out / "start_time.json").write_text(json.dumps({"model": args.model, "layers": args.layers, "run": RUN, "results": results}, indent=2))
    plot(results, out / "start_time.png", args.model, args.layers)


if __name__ == "__main__":
    main()
