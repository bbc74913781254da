#!/usr/bin/env python
"""Per-layer speed and memory of full training steps, the plugin's layer vs stock Megatron-Core + TE.

    PYTHONPATH=. PYTHONUNBUFFERED=1 python tools/bench.py --out $OUT/bench.json

Llama-3-8B-shaped layers (4096 hidden, 32/8 heads, 14336 FFN, vocabulary 128256), bf16, one
64K-token row per step. Every path runs full training steps (forward, backward, gradient
clipping, AdamW) at two layer counts in the same process; per layer = (median step time at
L2 - at L1) / (L2 - L1) over the timed steps (warm-up steps excluded), which removes the
embedding, the output layer and the loss. Layouts (documents of exponential length with the
given mean, the same lengths in every row): one 64K document, mean 8K, mean 2K, mean 1.5K; the
ProLong stage-1 mix is derived: 60% single-document rows, 40% rows of mean-1.5K documents
(row-weighted: total FLOPs over total time).

Paths:
- ``plugin`` (and ``--variant NAME=override,...``): the trainer (``megatron_prolong.train.loop.
  Trainer.train_step``: Megatron-Core DDP with fp32 main grads, Megatron's optimizer with fp32
  master weights) with the plugin's attention and the given config overrides.
- ``unfused``: the plugin path with every ``kernels.*`` switch on its unfused choice (as landed
  before the fused kernels).
- ``te``: the same trainer with ``model.attention_backend=te`` (Megatron's TE layer spec).
- ``te_linear``: the plugin path with TE's linears (``model.linear=te``); ``--fp8 delayed,tensorwise``
  adds ``te_linear_fp8_<recipe>`` (``model.fp8=<recipe>``) per recipe, and the report then holds
  an 8192^3 FP8 (E4M3) matmul timed in the same process (``fp8_matmul_tflops``).
- ``stock``: Megatron-Core's GPTModel with its TE layer spec, TE's fused RoPE and Megatron's
  fused SwiGLU, THD packed documents, bf16 parameters trained by torch's fused AdamW (bf16
  states), no DDP: the baseline the issue compares against. Its loss is the plugin's blockwise
  one (outside the layers, so it cancels in the per-layer numbers).
``te``, ``te_linear`` and ``stock`` need Transformer Engine; without it they are skipped with a message.

Parts: corpus, configuration and timing helpers in ``bench_setup.py``, the ``stock`` baseline in
``bench_stock.py``, the per-layer summary and table in ``bench_report.py``.

Reported per path and layout: per-layer ms, model TFLOP/s per layer (matmuls + causal in-document
attention pairs, megatron_prolong/train/flops.py), that rate as a share of an 8192^3 bf16 matmul
timed in the same process (``mfu_vs_matmul``) and of the datasheet's dense bf16 peak of ``train.gpu``
(``mfu``), per-layer activation memory (peak difference per layer minus the per-layer model
and optimizer states), peak memory, and a predicted 32-layer tokens/s/GPU (the measured fixed
part + 32 x the per-layer time). ``--profile DIR`` writes PyTorch-profiler tables of one step.
``--whole-model`` then trains the most layers of the model that one GPU holds (train/memory.py's
estimate, one fewer after an out-of-memory error) with the settings of one measured path
(``--whole-path``), optimizer step included, and reports its tokens/s against that path's
prediction (fixed part + N x layer) and its peak memory against the estimate.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import replace

import torch

sys.path.insert(0, os.getcwd())

from bench_report import print_table, summarize, write_report  # noqa: E402
from bench_setup import (  # noqa: E402
    LAYOUT_MEANS, compose, fp8_matmul_tflops, matmul_tflops, peak_gib, reset_peak, sync, write_corpus,
)
from bench_stock import StockPath, te_importable  # noqa: E402

UNFUSED = ["kernels.swiglu=unfused", "kernels.rope=torch", "kernels.cross_entropy=torch", "kernels.optimizer=foreach"]


class TrainerPath:
    """The real trainer; each layout gets its own single-domain loader."""

    def __init__(self, cfg, topo):
        from megatron_prolong.train.loop import Trainer

        self.cfg = cfg
        self.trainer = Trainer(cfg, topo).build(saves=False)
        self.params_per_layer = sum(p.numel() for n, p in self.trainer.model.named_parameters()
                                    if ".layers.0." in n)

    def use_layout(self, name: str) -> None:
        from megatron_prolong.data.config import DomainConfig
        from megatron_prolong.data.loader import MixtureLoader

        t, tr = self.cfg.train, self.trainer
        data = replace(self.cfg.data, mixture=[DomainConfig(name=name, path=name, share=1.0)])
        tr.use_loader(MixtureLoader(data, vocab_size=tr.vocab_size, seed=t.seed, dp_rank=0, dp_size=1,
                                    micro_batch_size=t.micro_batch_size, num_micro_batches=tr.num_micro_batches))

    def step(self) -> None:
        self.trainer.train_step()

    def close(self) -> None:
        del self.trainer



def time_layout(path, name: str, warmup: int, steps: int) -> dict:
    path.use_layout(name)
    reset_peak()
    times, peak, reserved = [], 0.0, 0.0
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        path.step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        # read after every step: the trainer resets the peak counters when a step starts
        peak = max(peak, peak_gib())
        reserved = max(reserved, torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else 0.0)
    return {"step_s": times, "median_s": statistics.median(times), "peak_gib": peak, "reserved_gib": reserved}


def profile_step(path, name: str, out_dir: str, tag: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    path.use_layout(name)
    path.step()
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        path.step()
        sync()
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=60, max_name_column_width=70)
    with open(os.path.join(out_dir, f"profile_{tag}_{name}.txt"), "w") as f:
        f.write(table)
    print(f"[bench] profile {tag} {name}:\n" + "\n".join(table.splitlines()[:30]), flush=True)


def run_path(tag: str, kind: str, overrides: list[str], args, base: list[str], lengths, topo, report) -> None:
    layouts = args.layouts if kind != "variant" else [n for n in args.layouts if n in args.variant_layouts]
    res = {"kind": kind, "overrides": overrides, "layers": {}, "layouts": layouts}
    report["paths"][tag] = res
    for n_layers in args.layers:
        cfg = compose(base + [f"model.num_layers={n_layers}"] + overrides)
        before = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        t0 = time.perf_counter()
        path = (StockPath if kind == "stock" else TrainerPath)(cfg, topo)
        if kind == "variant":
            res["kind"] = "trainer"
        res["params_per_layer"] = path.params_per_layer
        print(f"[bench] {tag}: {n_layers} layers built in {time.perf_counter() - t0:.1f} s", flush=True)
        per = res["layers"][str(n_layers)] = {"layouts": {}}
        try:
            for name in layouts:
                r = per["layouts"][name] = time_layout(path, name, args.warmup, args.steps)
                print(f"[bench] {tag} L={n_layers} {name}: {r['median_s'] * 1e3:.1f} ms/step, "
                      f"peak {r['peak_gib']:.1f} GiB", flush=True)
            if args.profile and n_layers == args.layers[0] and tag == args.profile_path:
                for name in [n for n in args.profile_layouts if n in layouts]:
                    profile_step(path, name, args.profile, tag)
        finally:
            path.close()
            del path
            gc.collect()  # modules, hooks and optimizer hold reference cycles
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        # memory a previous build left allocated would inflate this one's peaks
        per["allocated_before_build_gib"] = before
    summarize(res, layouts, args, lengths, report["matmul_tflops"], report["peak_tflops"], report["model"],
              report["vocab"])


def _estimate(cfg, seq: int, vocab: int):
    from megatron_prolong.train.memory import estimate_memory

    mem = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 80.0
    return estimate_memory(cfg.model, cfg.train, cfg.parallel, seq, 1, mem, vocab_size=vocab,
                           attention_backend="plugin", cross_entropy="triton" if torch.cuda.is_available() else "torch")


def whole_model(args, base: list[str], topo, report) -> None:
    """The most layers of the model that fit, with the optimizer step and the settings of the
    per-layer path ``--whole-path``: measured step against that path's fixed part + N x layer, and
    peak memory against train/memory.py's estimate."""
    src = report["paths"][args.whole_path]
    overrides = src["overrides"]
    cfg = compose(base + overrides)
    n = args.whole_layers or max([k for k in range(1, cfg.model.num_layers + 1)
                                  if _estimate(compose(base + overrides + [f"model.num_layers={k}"]),
                                               args.seq, report["vocab"]).fits] or [1])
    out = report["whole_model"] = {"path": args.whole_path, "overrides": overrides, "tried": []}
    while n >= 1:
        cfg = compose(base + overrides + [f"model.num_layers={n}"])
        out["tried"].append(n)
        path = None
        try:
            path = TrainerPath(cfg, topo)
            out["layers"], out["layouts"] = n, {}
            est = _estimate(cfg, args.seq, report["vocab"])
            # the peak is PyTorch's allocated memory: set against the estimate less its allowance for
            # the CUDA context and fragmentation (tools/memory_report.py's calibration does the same)
            out["estimate_gib"] = (est.total - est.overhead) / 2**30
            out["estimate_with_overhead_gib"] = est.total / 2**30
            for name in args.whole_layouts:
                r = time_layout(path, name, args.warmup, args.steps)
                s = src["summary"][name]
                pred_ms = s["fixed_ms"] + n * s["layer_ms"]
                out["layouts"][name] = {**r, "tokens_per_s_gpu": args.seq / r["median_s"],
                                        "predicted_tokens_per_s_gpu": args.seq / (pred_ms / 1e3),
                                        "measured_over_predicted_time": r["median_s"] * 1e3 / pred_ms,
                                        "peak_over_estimate": r["peak_gib"] / out["estimate_gib"]}
                print(f"[bench] whole model, {n} layers, {name}: {r['median_s'] * 1e3:.0f} ms/step "
                      f"(predicted {pred_ms:.0f}), {args.seq / r['median_s']:.0f} tokens/s; peak "
                      f"{r['peak_gib']:.1f} GiB (estimate {out['estimate_gib']:.1f})", flush=True)
            return
        except torch.cuda.OutOfMemoryError:
            print(f"[bench] whole model: {n} layers do not fit; trying {n - 1}", flush=True)
            n -= 1
        finally:
            if path is not None:
                path.close()
            del path
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="JSON report")
    p.add_argument("--seq", type=int, default=65536)
    p.add_argument("--model", default="llama3_8b")
    p.add_argument("--layers", default="2,4", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--layouts", default=",".join(LAYOUT_MEANS), type=lambda s: s.split(","))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--paths", default="plugin,te,stock", type=lambda s: [x for x in s.split(",") if x])
    p.add_argument("--fp8", default="", type=lambda s: [x for x in s.split(",") if x],
                   help="FP8 recipes (delayed,tensorwise) to run te_linear with, each as te_linear_fp8_<recipe>")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=override[,override...]: another plugin-path run with these config overrides")
    p.add_argument("--variant-layouts", default=",".join(LAYOUT_MEANS), type=lambda s: s.split(","),
                   help="the layouts the --variant runs measure")
    p.add_argument("--profile", default=None, help="folder for profiler tables (one step, first layer count)")
    p.add_argument("--profile-path", default="plugin")
    p.add_argument("--profile-layouts", default="one_doc,mean2k", type=lambda s: s.split(","))
    p.add_argument("--whole-model", action="store_true")
    p.add_argument("--whole-path", default="plugin", help="the measured path whose settings and per-layer "
                   "numbers the whole model uses (plugin or a --variant name)")
    p.add_argument("--whole-layers", type=int, default=0, help="0: the most layers estimated to fit")
    p.add_argument("--whole-layouts", default="one_doc,mean1.5k", type=lambda s: s.split(","))
    p.add_argument("--extra", default="", type=lambda s: [x for x in s.split(",") if x],
                   help="overrides for every path (e.g. a tiny model on CPU)")
    args = p.parse_args(argv)
    if len(args.layers) != 2 or args.layers[0] >= args.layers[1]:
        p.error("--layers takes two increasing layer counts")
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)  # before the first build, not after a path has run

    from megatron_prolong.parallel.cpu_compat import cpu_compat
    from megatron_prolong.parallel.distributed import init_distributed, shutdown
    from megatron_prolong.train.flops import gpu_spec

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report = {"date": time.strftime("%Y-%m-%d"), "gpu": gpu, "torch": torch.__version__, "argv": sys.argv[1:],
              "seq": args.seq, "layers": args.layers, "warmup": args.warmup, "steps": args.steps, "paths": {}}
    with tempfile.TemporaryDirectory() as tmp, cpu_compat():
        probe = compose([f"model={args.model}"] + args.extra)
        vocab = probe.model.vocab_size or 258
        report["model"], report["vocab"] = probe.model, vocab
        report["gpu_spec"], report["peak_tflops"] = probe.train.gpu, gpu_spec(probe.train.gpu).bf16_tflops
        rows = (args.warmup + args.steps + 2) * 2
        lengths = write_corpus(tmp, args.seq, rows, vocab, args.layouts)
        report["documents"] = {k: len(v) for k, v in lengths.items()}
        base = [f"model={args.model}", f"data.seq_length={args.seq}", "train.global_batch_size=1",
                "train.micro_batch_size=1", "train.precision=bf16", "train.steps=100000", "train.lr=1e-5",
                "data.synthetic=false", f"data.root={tmp}", f"run.dir={tmp}/run", "checkpoint.save_interval=0",
                "log.tensorboard=false", "data.balance_micro_batches=false",
                f"data.mixture=[{{name:{args.layouts[0]},path:{args.layouts[0]},share:1.0}}]", *args.extra]
        topo = init_distributed(probe.parallel, seed=1234)
        try:
            report["matmul_tflops"] = matmul_tflops()
            print(f"[bench] {gpu}: matmul 8192^3 bf16 {report['matmul_tflops']:.0f} TFLOP/s", flush=True)
            jobs = [("plugin", "trainer", ["model.attention_backend=plugin"])] if "plugin" in args.paths else []
            if "unfused" in args.paths:
                jobs.append(("unfused", "trainer", ["model.attention_backend=plugin", *UNFUSED]))
            for v in args.variant:
                name, _, ov = v.partition("=")
                jobs.append((name, "variant", ["model.attention_backend=plugin"] + [o for o in ov.split(",") if o]))
            te_paths = {"te", "stock", "te_linear"} & set(args.paths) or args.fp8
            has_te = bool(te_paths) and te_importable()
            if has_te and "te" in args.paths:
                jobs.append(("te", "trainer", ["model.attention_backend=te"]))
            if has_te and "te_linear" in args.paths:
                jobs.append(("te_linear", "trainer", ["model.attention_backend=plugin", "model.linear=te"]))
            for recipe in args.fp8 if has_te else []:
                jobs.append((f"te_linear_fp8_{recipe}", "trainer",
                             ["model.attention_backend=plugin", "model.linear=te", f"model.fp8={recipe}"]))
            if args.fp8:
                report["fp8_matmul_tflops"] = fp8_matmul_tflops()
                print(f"[bench] {gpu}: matmul 8192^3 fp8 e4m3 {report['fp8_matmul_tflops']:.0f} TFLOP/s", flush=True)
            if has_te and "stock" in args.paths:
                jobs.append(("stock", "stock", []))
            for tag, kind, overrides in jobs:
                try:
                    run_path(tag, kind, overrides, args, base, lengths, topo, report)
                except Exception as err:  # noqa: BLE001 - one failing path must not lose the others
                    traceback.print_exc()
                    report["paths"].setdefault(tag, {})["error"] = f"{type(err).__name__}: {err}"
                if args.out:
                    write_report(report, args.out)
            if args.whole_model:
                try:
                    whole_model(args, base, topo, report)
                except Exception as err:  # noqa: BLE001
                    traceback.print_exc()
                    report["whole_model"] = {"error": f"{type(err).__name__}: {err}"}
        finally:
            shutdown()
    report["model"] = {k: v for k, v in vars(report["model"]).items()}
    if args.out:
        write_report(report, args.out)
    print_table(report)
    return report



if __name__ == "__main__":
    main()
