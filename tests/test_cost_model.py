"""tools/cost_model.py: the per-rank CP efficiency from a bench_cp report, the reassembly of a
measured one-GPU step, and the docs table equal to what the tool prints."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import cost_model  # noqa: E402

BENCH = ROOT / "docs" / "benchmarks" / "bench_2026-12-02_h200.json"
BENCH_H100 = ROOT / "docs" / "benchmarks" / "bench_2026-12-08_h100_plugin.json"


def _row(cp: int, rank_tflops: list[float], ms: list[float]) -> dict:
    return {"layout": "one_doc", "backend": "cudnn", "split": "balanced", "cp": cp, "cp1_tflops": 500.0,
            "rank_tflops": rank_tflops, "ms_per_rank": ms}


def test_cp_efficiency_is_cp1_time_over_the_slowest_rank():
    # CP 2: both ranks at the CP = 1 rate -> 1.0; CP 8: one rank at half the rate with the same work
    # (twice the time) -> total work 8 x 10 ms x 500 TFLOP/s, ideal 8 x 5000 / 8 / 500 = 10 ms, slowest 20 ms.
    sim = {"rows": [_row(2, [500.0, 500.0], [10.0, 10.0]),
                    _row(8, [500.0] * 7 + [250.0], [10.0] * 7 + [20.0])]}
    assert cost_model.cp_efficiency(sim, "one_doc", 2) == pytest.approx(1.0)
    assert cost_model.cp_efficiency(sim, "one_doc", 8) == pytest.approx(0.5)
    assert cost_model.cp_efficiency(sim, "one_doc", 4) == pytest.approx(0.75)  # log2 midpoint
    assert cost_model.cp_efficiency(sim, "one_doc", 16) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="mean2K"):
        cost_model.cp_efficiency(sim, "mean2k", 2)


def test_one_gpu_prediction_reassembles_the_measured_step():
    bench = json.loads(BENCH.read_text())
    sim = json.loads(cost_model.CP_SIM["h200"][0].read_text())
    measured = bench["paths"]["plugin"]["summary"]["one_doc"]
    r = cost_model.predict(bench, sim, {"tp": 1, "cp": 1}, bench["seq"], 1, "h200", cost_model.Network(),
                           global_batch=1, mix={"one_doc": 1.0})
    step_s = (32 * measured["layer_ms"] + measured["fixed_ms"]) / 1e3
    assert r["step_s"] == pytest.approx(step_s, rel=1e-9)
    assert r["tokens_per_s_gpu"] == pytest.approx(measured["tokens_per_s_gpu_32_layers"], rel=1e-6)
    # twice the tokens of one document: matmul and the rest x 2, attention x 4
    parts = cost_model.split_layer(measured, cost_model.LLAMA3_8B, bench["seq"], [bench["seq"]],
                                   bench["matmul_tflops"], cost_model.cp1_rates(sim)["one_doc"])
    r2 = cost_model.predict(bench, sim, {"tp": 1, "cp": 1}, 2 * bench["seq"], 1, "h200", cost_model.Network(),
                            global_batch=1, mix={"one_doc": 1.0})
    layer2 = 2 * parts["matmul"] + 4 * parts["attention"] + 2 * parts["other"]
    assert r2["per_layer"]["one_doc"]["layer_s"] == pytest.approx(layer2, rel=1e-4)  # causal pairs: S(S+1)/2


@pytest.mark.parametrize("bench, nth", [(BENCH, 0), (BENCH_H100, 1)], ids=["h200", "h100"])
def test_docs_table_is_what_the_tool_prints(capsys, bench, nth):
    cost_model.main([str(bench), "--markdown"])
    printed = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()[2:]]
    doc = (ROOT / "docs" / "cost_model.md").read_text().splitlines()
    start = [i for i, line in enumerate(doc) if line.startswith("| seq | tp | cp |")][nth] + 2
    table = []
    for line in doc[start:]:
        if not line.startswith("| "):
            break
        table.append(line.split("|")[1:-1])
    # columns seq..memory (the docs add one "fits" column per GPU memory)
    assert [c[:9] for c in table] == [c[:9] for c in printed]


def test_cp_report_prefers_the_nearest_sequence_length():
    r128 = {"seq": 131072, "rows": [_row(2, [500.0, 500.0], [10.0, 10.0]),
                                    {**_row(8, [400.0] * 8, [10.0] * 8), "layout": "mean2K"}]}
    r512 = {"seq": 524288, "rows": [{**_row(8, [250.0] * 8, [10.0] * 8), "layout": "mean2K"}]}
    at512 = cost_model.cp_report([r128, r512], 524288)
    assert cost_model.cp_efficiency(at512, "mean2k", 8) == pytest.approx(0.5)  # the 512K row
    assert cost_model.cp_efficiency(at512, "one_doc", 2) == pytest.approx(1.0)  # only at 128K
    at64 = cost_model.cp_report([r512, r128], 65536)
    assert cost_model.cp_efficiency(at64, "mean2k", 8) == pytest.approx(0.8)


def test_one_prediction_reads_one_devices_measurements():
    bench = json.loads(BENCH.read_text())  # H200 layer times
    h100 = [json.loads(p.read_text()) for p in cost_model.CP_SIM["h100_80gb"]]
    with pytest.raises(ValueError, match="h100_80gb"):
        cost_model.predict(bench, cost_model.cp_report(h100, bench["seq"]), {"tp": 1, "cp": 2}, bench["seq"], 2,
                           "h200", cost_model.Network(), global_batch=1, mix={"one_doc": 1.0})
    h200 = [json.loads(p.read_text()) for p in cost_model.CP_SIM["h200"]]
    with pytest.raises(ValueError, match="different GPUs"):
        cost_model.cp_report(h100 + h200, bench["seq"])
    assert cost_model.device_of(bench) == "h200" and cost_model.cp_report(h200, bench["seq"])["device"] == "h200"
