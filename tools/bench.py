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
- ``stock``: Megatron-Core's GPTModel with its TE layer spec, TE's fused RoPE and Megatron's
  fused SwiGLU, THD packed documents, bf16 parameters trained by torch's fused AdamW (bf16
  states), no DDP: the baseline the issue compares against. Its loss is the plugin's blockwise
  one (outside the layers, so it cancels in the per-layer numbers).
``te`` and ``stock`` need Transformer Engine; without it they are skipped with a message.

Reported per path and layout: per-layer ms, model TFLOP/s per layer (matmuls + causal in-document
attention pairs, megatron_prolong/train/flops.py), MFU against an 8192^3 bf16 matmul timed in the
same process, per-layer activation memory (peak difference per layer minus the per-layer model
and optimizer states), peak memory, and a predicted 32-layer tokens/s/GPU (the measured fixed
part + 32 x the per-layer time). ``--profile DIR`` writes PyTorch-profiler tables of one step.
``--whole-model`` times 32 layers (forward + backward + gradient norm, full recompute; the
optimizer's fp32 states of 8B parameters do not fit next to them on one GPU, see docs).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import replace

import numpy as np
import torch

sys.path.insert(0, os.getcwd())

LAYOUT_MEANS = {"one_doc": None, "mean8k": 8192, "mean2k": 2048, "mean1.5k": 1536}
MIX = {"one_doc": 0.6, "mean1.5k": 0.4}  # ProLong stage 1: 60% long / 40% short rows
UNFUSED = ["kernels.swiglu=unfused", "kernels.rope=torch", "kernels.cross_entropy=torch", "kernels.optimizer=foreach"]
TRAINER_STATE_BYTES = 18  # bf16 weight + fp32 main grad + fp32 master + Adam m, v
STOCK_STATE_BYTES = 8  # bf16 weight, grad, m, v


def doc_lengths(seed: int, s: int, mean: float | None) -> list[int]:
    if mean is None:
        return [s]
    rng = np.random.default_rng(seed)
    out, left = [], s
    while left:
        n = min(left, max(1, int(rng.exponential(mean))))
        out.append(n)
        left -= n
    return out


def write_corpus(root: str, seq: int, rows: int, vocab: int, layouts: list[str]) -> dict[str, list[int]]:
    """One MDS domain per layout: random tokens, the layout's document lengths in every row."""
    from streaming import MDSWriter

    lengths = {}
    rng = np.random.default_rng(0)
    for name in layouts:
        lens = doc_lengths(1, seq, LAYOUT_MEANS[name])
        lengths[name] = lens
        cu = np.concatenate([[0], np.cumsum(lens)])
        idx = np.stack([cu[:-1], cu[1:]], axis=1).astype(np.uint32)
        cols = {"input_ids": "ndarray:uint32", "indices": "ndarray:uint32", "domain": "str"}
        with MDSWriter(out=os.path.join(root, name), columns=cols, compression=None) as w:
            for _ in range(rows):
                ids = rng.integers(0, vocab, seq, dtype=np.uint32)
                w.write({"input_ids": ids, "indices": idx, "domain": name})
    return lengths


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from omegaconf import OmegaConf

    from megatron_prolong.config import register_configs

    register_configs()
    with initialize_config_module("megatron_prolong.conf", version_base="1.3"):
        return OmegaConf.to_object(hydra_compose("config", overrides=overrides))


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def matmul_tflops(n: int = 8192, reps: int = 20) -> float:
    if not torch.cuda.is_available():
        return float("nan")
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / statistics.median(times) / 1e12


class TrainerPath:
    """The real trainer; each layout gets its own single-domain loader."""

    def __init__(self, cfg, topo):
        from megatron_prolong.train.loop import Trainer

        self.cfg = cfg
        self.trainer = Trainer(cfg, topo)
        self.params_per_layer = sum(p.numel() for n, p in self.trainer.model.named_parameters()
                                    if ".layers.0." in n)

    def use_layout(self, name: str) -> None:
        from megatron_prolong.data.config import DomainConfig
        from megatron_prolong.data.loader import MixtureLoader
        from megatron_prolong.data.metrics import DomainTracker

        t, tr = self.cfg.train, self.trainer
        data = replace(self.cfg.data, mixture=[DomainConfig(name=name, path=name, share=1.0)])
        tr.loader = MixtureLoader(data, vocab_size=tr.vocab_size, seed=t.seed, dp_rank=0, dp_size=1,
                                  micro_batch_size=t.micro_batch_size, num_micro_batches=tr.num_micro_batches)
        tr.domains = DomainTracker(tr.loader.domain_names)

    def step(self) -> None:
        self.trainer.train_step()

    def close(self) -> None:
        del self.trainer


class StockPath:
    """Megatron-Core GPTModel + TE layer spec, bf16 parameters, torch fused AdamW, no DDP."""

    def __init__(self, cfg, topo):
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
        from megatron.core.transformer import TransformerConfig
        import torch.nn.functional as F

        from megatron_prolong.model.loss import BlockwiseLoss

        m = cfg.model
        self.cfg = cfg
        config = TransformerConfig(
            num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
            num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
            kv_channels=m.hidden_size // m.num_attention_heads, normalization="RMSNorm",
            layernorm_epsilon=m.norm_epsilon, activation_func=F.silu, gated_linear_unit=True,
            add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, bf16=True,
            params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16, bias_activation_fusion=True,
            apply_rope_fusion=True, gradient_accumulation_fusion=False, calculate_per_token_loss=True,
        )
        self.model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_with_transformer_engine_spec(),
                              vocab_size=m.vocab_size, max_sequence_length=cfg.data.seq_length,
                              position_embedding_type="rope", rotary_base=int(m.rope_base),
                              share_embeddings_and_output_weights=False).cuda()
        t = cfg.train
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                                     eps=t.adam_eps, weight_decay=t.weight_decay, fused=True)
        self.loss = BlockwiseLoss(t.loss_block_size, cfg.kernels.cross_entropy)
        self.params_per_layer = sum(p.numel() for n, p in self.model.named_parameters() if ".layers.0." in n)
        self.loader = None

    def use_layout(self, name: str) -> None:
        from megatron_prolong.data.config import DomainConfig
        from megatron_prolong.data.loader import MixtureLoader

        data = replace(self.cfg.data, mixture=[DomainConfig(name=name, path=name, share=1.0)])
        self.loader = MixtureLoader(data, vocab_size=self.cfg.model.vocab_size, seed=0, dp_rank=0, dp_size=1,
                                    micro_batch_size=1, num_micro_batches=1)

    def step(self) -> None:
        from megatron_prolong.train.step import prepare_te_micro_batch

        mb = prepare_te_micro_batch(self.loader.next_step()[0], cp_size=1, cp_rank=0, device=torch.device("cuda"))
        self.opt.zero_grad(set_to_none=True)
        out = self.model(mb.tokens, None, None, labels=mb.labels, packed_seq_params=mb.packed,
                         output_processor=self.loss)
        loss = (out.float() * mb.loss_mask).sum() / mb.loss_mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip, foreach=True)
        self.opt.step()
        loss.item()

    def close(self) -> None:
        del self.model, self.opt


def te_importable() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means "no TE here"
        print(f"[bench] Transformer Engine not importable ({type(err).__name__}: {err}); "
              "skipping the te and stock paths", flush=True)
        return False
    return True


def layer_flops(model_cfg, vocab: int, lengths: list[int], l1: int, l2: int) -> float:
    from megatron_prolong.train.flops import model_flops_per_step

    f = [model_flops_per_step(replace(model_cfg, num_layers=n), vocab, lengths) for n in (l1, l2)]
    return (f[1] - f[0]) / (l2 - l1)


def time_layout(path, name: str, warmup: int, steps: int) -> dict:
    path.use_layout(name)
    reset_peak()
    times = []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        path.step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    reserved = torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else 0.0
    return {"step_s": times, "median_s": statistics.median(times), "peak_gib": peak_gib(), "reserved_gib": reserved}


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
    summarize(res, layouts, args, lengths, report["matmul_tflops"], report["model"], report["vocab"])


def summarize(res: dict, layouts: list[str], args, lengths, matmul: float, model_cfg, vocab: int) -> None:
    l1, l2 = args.layers[0], args.layers[-1]
    state_gib = res["params_per_layer"] * (STOCK_STATE_BYTES if res["kind"] == "stock" else TRAINER_STATE_BYTES) / 2**30
    res["state_gib_per_layer"] = state_gib
    summary = res["summary"] = {}
    a, b = res["layers"][str(l1)]["layouts"], res["layers"][str(l2)]["layouts"]
    for name in layouts:
        t_layer = (b[name]["median_s"] - a[name]["median_s"]) / (l2 - l1)
        fixed = a[name]["median_s"] - l1 * t_layer
        flops = layer_flops(model_cfg, vocab, lengths[name], l1, l2)
        mem = (b[name]["peak_gib"] - a[name]["peak_gib"]) / (l2 - l1)
        step32 = fixed + model_cfg.num_layers * t_layer
        summary[name] = {
            "layer_ms": t_layer * 1e3, "fixed_ms": fixed * 1e3, "layer_flops": flops,
            "layer_tflops": flops / t_layer / 1e12 if t_layer > 0 else float("nan"),
            "mfu_vs_matmul": flops / t_layer / 1e12 / matmul if t_layer > 0 else float("nan"),
            "peak_gib_per_layer": mem, "activation_gib_per_layer": mem - state_gib,
            "peak_gib": b[name]["peak_gib"],
            "tokens_per_s_gpu_32_layers": args.seq / step32 if step32 > 0 else float("nan"),
        }
    if all(k in summary for k in MIX):
        t = sum(w * summary[k]["layer_ms"] for k, w in MIX.items())
        f = sum(w * summary[k]["layer_flops"] for k, w in MIX.items())
        summary["stage1_mix"] = {"layer_ms": t, "layer_tflops": f / t / 1e9, "mfu_vs_matmul": f / t / 1e9 / matmul}


def whole_model(args, base: list[str], topo, report) -> None:
    """32 layers through the trainer, optimizer step left out (its states do not fit)."""
    cfg = compose(base + ["model.num_layers=32", "train.recompute=full"] + args.whole_overrides)
    path = TrainerPath(cfg, topo)
    path.trainer._optimizer_step = lambda loss: (True, 0.0)
    out = report["whole_model"] = {"overrides": ["model.num_layers=32", "train.recompute=full"] + args.whole_overrides}
    try:
        for name in args.whole_layouts:
            r = time_layout(path, name, args.warmup, args.steps)
            out[name] = {**r, "tokens_per_s_gpu_no_optimizer": args.seq / r["median_s"]}
            print(f"[bench] whole model {name}: {r['median_s'] * 1e3:.0f} ms/step (no optimizer step), "
                  f"{args.seq / r['median_s']:.0f} tokens/s, peak {r['peak_gib']:.1f} GiB", flush=True)
    finally:
        path.close()


def print_table(report: dict) -> None:
    paths = report["paths"]
    names = [n for n in list(LAYOUT_MEANS) + ["stage1_mix"] if any(n in p.get("summary", {}) for p in paths.values())]
    print("\n| path | " + " | ".join(names) + " | act GiB/layer (one_doc) |")
    print("|---|" + "---|" * (len(names) + 1))
    for tag, p in paths.items():
        s = p.get("summary", {})
        cells = [f"{s[n]['mfu_vs_matmul'] * 100:.1f}% ({s[n]['layer_ms']:.0f} ms)" if n in s else "-" for n in names]
        act = s.get("one_doc", {}).get("activation_gib_per_layer", float("nan"))
        print(f"| {tag} | " + " | ".join(cells) + f" | {act:.2f} |")
    if "stock" in paths and "summary" in paths["stock"]:
        for tag, p in paths.items():
            if tag != "stock" and "summary" in p:
                ratios = {n: paths["stock"]["summary"][n]["layer_ms"] / p["summary"][n]["layer_ms"]
                          for n in names if n in p["summary"] and n in paths["stock"]["summary"]}
                print(f"speed vs stock, {tag}: " + ", ".join(f"{n} {r:.3f}" for n, r in ratios.items()))
    print(f"matmul 8192^3 bf16: {report['matmul_tflops']:.0f} TFLOP/s")


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
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=override[,override...]: another plugin-path run with these config overrides")
    p.add_argument("--variant-layouts", default=",".join(LAYOUT_MEANS), type=lambda s: s.split(","),
                   help="the layouts the --variant runs measure")
    p.add_argument("--profile", default=None, help="folder for profiler tables (one step, first layer count)")
    p.add_argument("--profile-path", default="plugin")
    p.add_argument("--profile-layouts", default="one_doc,mean2k", type=lambda s: s.split(","))
    p.add_argument("--whole-model", action="store_true")
    p.add_argument("--whole-layouts", default="one_doc,mean1.5k", type=lambda s: s.split(","))
    p.add_argument("--whole-overrides", default="", type=lambda s: [x for x in s.split(",") if x])
    p.add_argument("--extra", default="", type=lambda s: [x for x in s.split(",") if x],
                   help="overrides for every path (e.g. a tiny model on CPU)")
    args = p.parse_args(argv)
    if len(args.layers) != 2 or args.layers[0] >= args.layers[1]:
        p.error("--layers takes two increasing layer counts")

    from megatron_prolong.parallel.cpu_compat import cpu_compat
    from megatron_prolong.parallel.distributed import init_distributed, shutdown

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report = {"date": time.strftime("%Y-%m-%d"), "gpu": gpu, "torch": torch.__version__, "argv": sys.argv[1:],
              "seq": args.seq, "layers": args.layers, "warmup": args.warmup, "steps": args.steps, "paths": {}}
    with tempfile.TemporaryDirectory() as tmp, cpu_compat():
        probe = compose([f"model={args.model}"] + args.extra)
        vocab = probe.model.vocab_size or 258
        report["model"], report["vocab"] = probe.model, vocab
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
            has_te = ("te" in args.paths or "stock" in args.paths) and te_importable()
            if has_te and "te" in args.paths:
                jobs.append(("te", "trainer", ["model.attention_backend=te"]))
            if has_te and "stock" in args.paths:
                jobs.append(("stock", "stock", []))
            for tag, kind, overrides in jobs:
                try:
                    run_path(tag, kind, overrides, args, base, lengths, topo, report)
                except Exception as err:  # noqa: BLE001 - one failing path must not lose the others
                    traceback.print_exc()
                    report["paths"].setdefault(tag, {})["error"] = f"{type(err).__name__}: {err}"
                if args.out:
                    _write(report, args.out)
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
        _write(report, args.out)
    print_table(report)
    return report


def _write(report: dict, path: str) -> None:
    def default(o):
        if hasattr(o, "__dataclass_fields__"):
            return vars(o)
        return str(o)

    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=default)


if __name__ == "__main__":
    main()
