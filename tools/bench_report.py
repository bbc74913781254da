"""tools/bench.py's report: per-layer numbers from the two layer counts, the table, the JSON file.

``mfu_vs_matmul`` is model TFLOP/s over the TFLOP/s of an 8192^3 bf16 matmul timed in the same
process (what this GPU reaches on one large GEMM); ``mfu`` is over the datasheet's dense bf16 peak
(``train.gpu``), the number MFU usually means.
"""

from __future__ import annotations

import json
from dataclasses import replace

from bench_setup import LAYOUT_MEANS

MIX = {"one_doc": 0.6, "mean1.5k": 0.4}  # ProLong stage 1: 60% long / 40% short rows
TRAINER_STATE_BYTES = 18  # bf16 weight + fp32 main grad + fp32 master + Adam m, v
STOCK_STATE_BYTES = 8  # bf16 weight, grad, m, v


def layer_flops(model_cfg, vocab: int, lengths: list[int], l1: int, l2: int) -> float:
    from megatron_prolong.train.flops import model_flops_per_step

    f = [model_flops_per_step(replace(model_cfg, num_layers=n), vocab, lengths) for n in (l1, l2)]
    return (f[1] - f[0]) / (l2 - l1)


def summarize(res: dict, layouts: list[str], args, lengths, matmul: float, peak: float, model_cfg, vocab: int) -> None:
    """``matmul``: the same-run matmul TFLOP/s; ``peak``: the datasheet's dense bf16 TFLOP/s."""
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
            "mfu": flops / t_layer / 1e12 / peak if t_layer > 0 else float("nan"),
            "peak_gib_per_layer": mem, "activation_gib_per_layer": mem - state_gib,
            "peak_gib": b[name]["peak_gib"],
            "tokens_per_s_gpu_32_layers": args.seq / step32 if step32 > 0 else float("nan"),
        }
    if all(k in summary for k in MIX):
        t = sum(w * summary[k]["layer_ms"] for k, w in MIX.items())
        f = sum(w * summary[k]["layer_flops"] for k, w in MIX.items())
        summary["stage1_mix"] = {"layer_ms": t, "layer_tflops": f / t / 1e9, "mfu_vs_matmul": f / t / 1e9 / matmul,
                                 "mfu": f / t / 1e9 / peak}


def print_table(report: dict) -> None:
    paths = report["paths"]
    names = [n for n in list(LAYOUT_MEANS) + ["stage1_mix"] if any(n in p.get("summary", {}) for p in paths.values())]
    print("\nper layer: % of the same-run matmul / % of the datasheet peak (ms)")
    print("\n| path | " + " | ".join(names) + " | act GiB/layer (one_doc) |")
    print("|---|" + "---|" * (len(names) + 1))
    for tag, p in paths.items():
        s = p.get("summary", {})
        cells = [f"{s[n]['mfu_vs_matmul'] * 100:.1f}% / {s[n].get('mfu', float('nan')) * 100:.1f}% "
                 f"({s[n]['layer_ms']:.0f} ms)" if n in s else "-" for n in names]
        act = s.get("one_doc", {}).get("activation_gib_per_layer", float("nan"))
        print(f"| {tag} | " + " | ".join(cells) + f" | {act:.2f} |")
    if "stock" in paths and "summary" in paths["stock"]:
        for tag, p in paths.items():
            if tag != "stock" and "summary" in p:
                ratios = {n: paths["stock"]["summary"][n]["layer_ms"] / p["summary"][n]["layer_ms"]
                          for n in names if n in p["summary"] and n in paths["stock"]["summary"]}
                print(f"speed vs stock, {tag}: " + ", ".join(f"{n} {r:.3f}" for n, r in ratios.items()))
    print(f"matmul 8192^3 bf16 (same run): {report['matmul_tflops']:.0f} TFLOP/s; datasheet peak "
          f"({report.get('gpu_spec', '?')}): {report.get('peak_tflops', float('nan')):.0f} TFLOP/s")


def write_report(report: dict, path: str) -> None:
    def default(o):
        if hasattr(o, "__dataclass_fields__"):
            return vars(o)
        return str(o)

    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=default)


