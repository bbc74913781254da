#!/usr/bin/env python
"""Predicted training throughput of Llama-3-8B on 8-GPU nodes of the GPU a layer report was measured
on, from its measured per-layer rates.

    python tools/cost_model.py docs/benchmarks/bench_<date>_<gpu>.json [--markdown]

Inputs: one tools/bench.py report (per-layer time of one 64K row on one GPU, per layout, and the
fixed part: embedding, output layer, loss, optimizer of the 2-layer model), tools/bench_cp.py
--simulate reports (cudnn) measured on the same kind of GPU (the attention rate at CP = 1 and the
per-rank rate under CP), and the interconnect bandwidths below. One prediction reads one device's
measurements: a CP report of another GPU is refused (an H100 and an H200 share the compute die,
not the memory, and their rates differ). docs/cost_model.md explains every term; in short, per micro-batch (one
sequence of S tokens on the tp x cp GPUs of one model replica):

  layer compute   the measured single-GPU layer time split into matmul (6 P S / matmul rate),
                  attention (causal in-document pairs / the CP = 1 attention rate of the
                  same-device CP report nearest the layer report's length, scaled by S^2 for one
                  document and by S for documents of a fixed mean length; under CP divided by
                  the measured per-rank efficiency, ``cp_efficiency``) and the rest
                  (elementwise, proportional to tokens); all of it divided by tp x cp (sequence
                  parallelism shards the elementwise work over TP too); GEMMs narrowed by TP run
                  at ``tp_gemm_efficiency``
  TP comm         with sequence parallelism: per layer 4 all-gathers + 4 reduce-scatters of the
                  [S/cp, h] bf16 activations (forward + backward), (tp-1)/tp of them through each
                  GPU's NVLink; Megatron-Core without TE does not overlap them with GEMMs: counted
                  in full
  CP comm         the plugin's K/V all-gather (forward) and dK/dV reduce-scatter (backward):
                  2 x kv_local x S x 2 B x (cp-1)/cp each way, NVLink inside a node, InfiniBand
                  when the CP group spans nodes; both run while the rank computes its causal
                  squares (attention/ring.py), so only what exceeds that share of the attention
                  time counts (``square_share`` of the slowest rank, from the bench_cp report)
  fixed part      output layer and loss, scaled by tokens per GPU (vocabulary-parallel over TP)
  DP / optimizer  once per step: gradient reduce-scatter (fp32) and parameter all-gather (bf16)
                  over InfiniBand across replicas, hidden behind the last micro-batch's backward /
                  the first forward when parallel.overlap_grad_reduce is on (only the excess
                  counts); the optimizer update on this rank's 1/(dp x cp) shard
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.getcwd())

from megatron_prolong.config import ModelConfig, ParallelConfig, TrainConfig  # noqa: E402
from megatron_prolong.train.flops import GPU_SPECS, attention_flops, layer_matmul_params  # noqa: E402
from megatron_prolong.train.memory import GiB, estimate_memory  # noqa: E402

LLAMA3_8B = ModelConfig(name="llama3_8b", num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
                        num_attention_heads=32, num_query_groups=8, vocab_size=128256)


@dataclass(frozen=True)
class Network:
    """Bus bandwidths (GB/s per GPU) that NCCL reaches; sources in docs/cost_model.md."""

    nvlink: float = 360.0  # H100/H200 SXM NVLink 4: 450 GB/s per direction, ~80% reached by all-gather
    infiniband: float = 40.0  # one 400 Gb/s NDR adapter per GPU (50 GB/s), ~80% reached
    name: str = "DGX H100/H200 (NVLink 4, 8 x 400G NDR)"


#: the share of the data sheet's memory bandwidth an elementwise pass reaches: a large device copy
#: ran at 3.03 TB/s on an H100 SXM (3.35), docs/benchmarks.md, "Decoding at memory speed"
HBM_EFFICIENCY = 0.9


def rebuild_bytes(model, tokens: int, tp: int, sequence_parallel: bool,
                  modules: tuple[str, ...] = tuple(TrainConfig().recompute_modules)) -> float:
    """Bytes one layer moves to rebuild what ``train.recompute=selective`` dropped
    (model/released.py: the output recomputed from the kept input, then copied into its released
    storage) over ``tokens`` tokens on one rank: the SwiGLU reads fc1's output (2f), writes f and
    copies f (5f); each RMSNorm reads x, writes its output and copies it (4 h_sp)."""
    e, f = 2, model.ffn_hidden_size / tp
    h_sp = model.hidden_size / tp if sequence_parallel else model.hidden_size
    per_token = (5 * f if "swiglu" in modules else 0) + (2 * 4 * h_sp if "layernorm" in modules else 0)
    return e * per_token * tokens


def split_layer(summary: dict, model, seq: int, lengths: list[int], matmul_tflops: float, attn_tflops: float) -> dict:
    """Measured single-GPU layer seconds at ``seq`` tokens -> matmul, attention and the rest."""
    t = summary["layer_ms"] / 1e3
    mm = 6 * layer_matmul_params(model) * seq / (matmul_tflops * 1e12)
    one_layer = ModelConfig(**{**vars(model), "num_layers": 1})
    attn = attention_flops(one_layer, lengths) / (attn_tflops * 1e12)
    return {"matmul": mm, "attention": attn, "other": max(t - mm - attn, 0.0), "measured": t}


def predict(bench: dict, cp_sim: dict, layout: dict, seq: int, world: int, gpu: str, net: Network, *,
            global_batch: int, mix: dict[str, float], tp_gemm_efficiency: float = 0.92, overlap_grad_reduce: bool = True,
            attention_rates: dict[str, float] | None = None) -> dict:
    """``cp_sim``: CP rows of the bench report's device (``cp_report``); ``attention_rates``: the CP = 1
    attention TFLOP/s per layout that split the measured layer time (by default ``cp_sim``'s own)."""
    model = LLAMA3_8B
    tp, cp = layout["tp"], layout["cp"]
    dp = world // (tp * cp)
    h = model.hidden_size
    kv_local = max(model.num_query_groups // tp, 1) * (model.hidden_size // model.num_attention_heads)
    plugin = bench["paths"][layout.get("path", "plugin")]["summary"]
    rate = bench["matmul_tflops"]
    base_seq = bench["seq"]
    same_device(bench, cp_sim)
    attention_rates = cp1_rates(cp_sim) if attention_rates is None else attention_rates
    per_row = {}
    for name, weight in mix.items():
        measured, lengths_base, lengths = _layout(name, base_seq, seq)
        parts = split_layer(plugin[measured], model, base_seq, lengths_base, rate, attention_rates[measured])
        attn_rate_ratio = cp_efficiency(cp_sim, measured, cp) if cp > 1 else 1.0
        scale = seq / base_seq
        attn_scale = attention_flops(ModelConfig(**{**vars(model), "num_layers": 1}), lengths) / max(
            attention_flops(ModelConfig(**{**vars(model), "num_layers": 1}), lengths_base), 1)
        attention = parts["attention"] * attn_scale / attn_rate_ratio / (tp * cp)
        compute = (parts["matmul"] * scale / (tp_gemm_efficiency if tp > 1 else 1.0)
                   + parts["other"] * scale) / (tp * cp) + attention
        if layout.get("recompute") == "full":  # one more forward pass: about a third of forward + backward
            compute *= 4 / 3
        elif layout.get("recompute") == "selective":
            compute += rebuild_bytes(model, seq // cp, tp, tp > 1) / (HBM_EFFICIENCY * GPU_SPECS[gpu].hbm_tb_s * 1e12)
        tp_bytes = 8 * (tp - 1) / tp * seq / cp * h * 2 if tp > 1 else 0.0
        cp_bytes = 2 * 2 * kv_local * seq * 2 * (cp - 1) / cp if cp > 1 else 0.0
        cp_bw = net.nvlink if tp * cp <= 8 else net.infiniband
        cp_s = cp_bytes / (cp_bw * 1e9)
        cp_exposed = max(cp_s - attention * square_share(cp_sim, measured, cp), 0.0) if cp > 1 else 0.0
        layer = compute + tp_bytes / (net.nvlink * 1e9) + cp_exposed
        per_row[name] = {"layer_s": layer, "weight": weight, "compute_s": compute,
                         "tp_comm_s": tp_bytes / (net.nvlink * 1e9), "cp_comm_s": cp_s,
                         "cp_comm_exposed_s": cp_exposed}
    layer_s = sum(r["layer_s"] * r["weight"] for r in per_row.values())
    fixed = sum(plugin[_layout(n, base_seq, seq)[0]]["fixed_ms"] * w for n, w in mix.items()) / 1e3 * seq / base_seq / (tp * cp)
    micro = layer_s * model.num_layers + fixed
    n_micro = global_batch // dp
    params_rank = _params(model) / tp
    dp_bytes = (4 + 2) * params_rank * (dp - 1) / dp if dp > 1 else 0.0
    dp_s = dp_bytes / (net.infiniband * 1e9)
    hidden = micro if overlap_grad_reduce else 0.0
    step = n_micro * micro + max(dp_s - hidden, 0.0)
    tokens_per_gpu = global_batch * seq / step / world
    est = estimate_memory(model, TrainConfig(global_batch_size=global_batch, micro_batch_size=1, precision="bf16",
                                             recompute=layout.get("recompute", "none")),
                          ParallelConfig(tp=tp, cp=cp, sequence_parallel=tp > 1, distributed_optimizer=True),
                          seq, world, GPU_SPECS[gpu].memory_gib, attention_backend="plugin")
    return {"layout": layout, "dp": dp, "micro_batches": n_micro, "micro_batch_s": micro, "step_s": step,
            "tokens_per_s_gpu": tokens_per_gpu, "per_layer": per_row, "dp_comm_s": dp_s,
            "memory_gib": est.total / GiB, "fits": est.fits}


#: the bench layouts' rows in a tools/bench_cp.py --simulate report (mean 1.5K: taken as mean 2K's)
CP_SIM_LAYOUT = {"one_doc": "one_doc", "mean8k": "mean8K", "mean2k": "mean2K", "mean1.5k": "mean2K"}
_BENCHMARKS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
#: the CP reports (cudnn, default split of their date) per GPU, docs/benchmarks.md: H200 of
#: 2026-12-02 (128K rows, CP 2 / 8; "Context parallelism: the attention package"), H100 of
#: 2026-12-07 (128K rows at CP 2 / 4 / 8, 512K rows at CP 8; "Per-rank rate under CP")
CP_SIM = {
    "h200": [_BENCHMARKS / "cp_sim_2026-12-02_h200_cudnn.json"],
    "h100_80gb": [_BENCHMARKS / "cp_sim_2026-12-07_h100_cudnn.json", _BENCHMARKS / "cp_sim_512k_2026-12-07_h100_cudnn.json"],
}
#: how the reports name the GPU (``torch.cuda.get_device_name``) -> its ``GPU_SPECS`` key
_DEVICE_NAMES = (("H200", "h200"), ("H100 PCIe", "h100_pcie"), ("H100", "h100_80gb"))


def device_of(report: dict) -> str:
    """The ``GPU_SPECS`` key of the GPU a bench (``gpu``) or bench_cp (``device``) report ran on."""
    name = report.get("gpu") or report.get("device") or ""
    if name in GPU_SPECS:
        return name
    for part, key in _DEVICE_NAMES:
        if part in name:
            return key
    raise ValueError(f"the report names no known GPU ({name!r})")


def same_device(bench: dict, cp_sim: dict) -> None:
    """Refuse a prediction that would mix two GPUs' measurements."""
    if cp_sim.get("device") and device_of(bench) != device_of(cp_sim):
        raise ValueError(f"the layer report was measured on {device_of(bench)}, the CP report on "
                         f"{device_of(cp_sim)}: give CP reports of the same GPU (--cp-sim)")


def cp_report(reports: list[dict], seq: int) -> dict:
    """The rows of the report measured nearest to ``seq`` (log scale), and of layouts it lacks
    from the next nearest; all reports of one GPU (refused otherwise), named in ``device``."""
    devices = {device_of(r) for r in reports if r.get("device")}
    if len(devices) > 1:
        raise ValueError(f"CP reports of different GPUs ({', '.join(sorted(devices))}): one prediction, one device")
    rows, seen = [], set()
    for rep in sorted(reports, key=lambda r: abs(math.log2(r["seq"]) - math.log2(seq))):
        names = {r["layout"] for r in rep["rows"]} - seen
        rows += [r for r in rep["rows"] if r["layout"] in names]
        seen |= names
    return {"rows": rows, "device": devices.pop() if devices else None}


def cp1_rates(cp_sim: dict) -> dict[str, float]:
    """The attention TFLOP/s at CP = 1 per bench layout, from the CP report's cudnn rows (measured in
    the same process as its CP rows: cuDNN SDPA for one document, the cudnn THD kernel for packed
    rows; mean 1.5K taken as mean 2K's)."""
    rates = {}
    for layout, name in CP_SIM_LAYOUT.items():
        rows = [r for r in cp_sim["rows"] if r["layout"] == name and r["backend"] == "cudnn"]
        if not rows:
            raise ValueError(f"the CP report has no cudnn rows for {name!r}")
        rates[layout] = rows[0]["cp1_tflops"]
    return rates


def cp_efficiency(cp_sim: dict, layout: str, cp: int) -> float:
    """Attention time at CP = 1 / cp over the slowest CP rank's time, measured for the cudnn
    kernel and the balanced split (tools/bench_cp.py --simulate: one rank's share timed alone);
    between measured CP sizes interpolated in log2(cp), outside them the nearest one."""
    name = CP_SIM_LAYOUT[layout]
    by_cp = {}
    for r in cp_sim["rows"]:
        if r["layout"] == name and r["backend"] == "cudnn" and r["split"] == "balanced":
            work = sum(t * ms for t, ms in zip(r["rank_tflops"], r["ms_per_rank"]))
            by_cp[r["cp"]] = work / r["cp"] / r["cp1_tflops"] / max(r["ms_per_rank"])
    if not by_cp:
        raise ValueError(f"the CP report has no cudnn/balanced rows for {name!r}")
    sizes = sorted(by_cp)
    if cp <= sizes[0] or cp >= sizes[-1]:
        return by_cp[sizes[0] if cp <= sizes[0] else sizes[-1]]
    lo = max(c for c in sizes if c <= cp)
    hi = min(c for c in sizes if c >= cp)
    if lo == hi:
        return by_cp[lo]
    w = (math.log2(cp) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
    return by_cp[lo] * (1 - w) + by_cp[hi] * w


def square_share(cp_sim: dict, layout: str, cp: int) -> float:
    """The slowest rank's share of attention work in its causal squares (which run while the
    K/V all-gather is in flight), at the nearest measured CP size; 0 in reports without it."""
    name = CP_SIM_LAYOUT[layout]
    rows = [r for r in cp_sim["rows"] if r["layout"] == name and r["backend"] == "cudnn"
            and "square_share_slowest" in r]
    if not rows:
        return 0.0
    return min(rows, key=lambda r: abs(math.log2(r["cp"]) - math.log2(cp)))["square_share_slowest"]


#: ProLong's data per stage as rows (docs/recipe.md): 64K: 60% single documents, 40% packed short
#: documents; 512K: 20% single 512K documents (code, books), 40% rows of 8 packed 64K documents,
#: 40% packed short documents
MIXES = {65536: {"one_doc": 0.6, "mean1.5k": 0.4}, 524288: {"one_doc": 0.2, "docs64k": 0.4, "mean1.5k": 0.4}}


def _layout(name: str, base_seq: int, seq: int) -> tuple[str, list[int], list[int]]:
    """(measured layout it scales from, its document lengths at base_seq, lengths at seq)."""
    if name == "docs64k":
        return "one_doc", [base_seq], [65536] * (seq // 65536)
    mean = {"one_doc": None, "mean8k": 8192, "mean2k": 2048, "mean1.5k": 1536}[name]
    if mean is None:
        return name, [base_seq], [seq]
    return name, _expected_lengths(base_seq, mean), _expected_lengths(seq, mean)


def _params(model) -> int:
    return model.num_layers * (layer_matmul_params(model) + 2 * model.hidden_size) + 2 * model.vocab_size * model.hidden_size


def _expected_lengths(seq: int, mean: int) -> list[int]:
    """Documents of exponential length: sum of L^2 ~ 2 x mean x seq, as seq / (2 mean) documents of 2 x mean."""
    n = max(seq // (2 * mean), 1)
    return [seq // n] * n


LAYOUTS = {
    65536: [dict(tp=4, cp=2), dict(tp=2, cp=4), dict(tp=8, cp=1), dict(tp=1, cp=8, recompute="full"),
            dict(tp=2, cp=2), dict(tp=4, cp=1), dict(tp=4, cp=2, recompute="selective"),
            dict(tp=2, cp=4, recompute="selective"), dict(tp=2, cp=2, recompute="selective"),
            dict(tp=4, cp=1, recompute="selective")],
    524288: [dict(tp=8, cp=8), dict(tp=4, cp=16), dict(tp=8, cp=4), dict(tp=4, cp=8, recompute="full"),
             dict(tp=8, cp=16), dict(tp=8, cp=4, recompute="selective"), dict(tp=4, cp=8, recompute="selective")],
}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bench", help="a tools/bench.py JSON report")
    p.add_argument("--world", type=int, default=64)
    p.add_argument("--path", default="plugin", help="which path of the report to scale")
    p.add_argument("--cp-sim", nargs="+",
                   help="tools/bench_cp.py --simulate reports (cudnn) of the layer report's GPU, e.g. one at 128K "
                        "and one at 512K (default: that GPU's reports in docs/benchmarks)")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    with open(args.bench) as f:
        bench = json.load(f)
    gpu = device_of(bench)  # throughput and memory of the GPU the layers were measured on
    names = args.cp_sim or [str(x) for x in CP_SIM.get(gpu, [])]
    if not names:
        raise SystemExit(f"no CP reports of {gpu} in docs/benchmarks: give them with --cp-sim")
    reports = []
    for name in names:
        with open(name) as f:
            reports.append(json.load(f))
    rates = cp1_rates(cp_report(reports, bench["seq"]))
    net = Network()
    rows = []
    for seq, layouts in LAYOUTS.items():
        gbs, mix = (64 if seq == 65536 else 16), MIXES[seq]
        for lay in layouts:
            world = max(args.world, lay["tp"] * lay["cp"])
            r = predict(bench, cp_report(reports, seq), {**lay, "path": args.path}, seq, world, gpu, net,
                        global_batch=gbs, mix=mix, attention_rates=rates)
            r["seq"], r["world"] = seq, world
            rows.append(r)
    if args.markdown:
        print(f"| seq | tp | cp | dp | recompute | GPUs | tokens/s/GPU | step s | memory GiB ({gpu}) | fits |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lay = r["layout"]
        line = (f"| {r['seq'] // 1024}K | {lay['tp']} | {lay['cp']} | {r['dp']} | {lay.get('recompute', 'none')} | "
                f"{r['world']} | {r['tokens_per_s_gpu']:,.0f} | {r['step_s']:.1f} | {r['memory_gib']:.1f} | "
                f"{'yes' if r['fits'] else 'no'} |")
        print(line if args.markdown else line.strip("| ").replace(" | ", "  "))
    return rows


if __name__ == "__main__":
    main()
