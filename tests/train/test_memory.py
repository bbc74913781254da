"""The per-GPU memory estimate: its terms by hand, regression checks against the recorded peaks it
was fitted on and against its own earlier output, and the refusal. None of these measures accuracy
on another layout: the only measurements are single-GPU (tp = cp = 1)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from megatron_prolong.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig
from megatron_prolong.train.flops import param_count
from megatron_prolong.train.memory import (
    LAYER_FACTOR,
    MARGIN,
    GiB,
    check_fits,
    estimate_memory,
    layer_activation_bytes,
    rank_params,
)
from megatron_prolong.train.memory_report import bench_estimate, bench_records, memory_table

LLAMA = ModelConfig(name="llama3_8b", num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
                    num_attention_heads=32, num_query_groups=8, vocab_size=128256)
H, F, KV, L = 4096, 14336, 1024, 32
S64, S512 = 65536, 524288


def train(**kw) -> TrainConfig:
    base = dict(global_batch_size=64, micro_batch_size=1, precision="bf16", recompute="none")
    base.update(kw)
    return TrainConfig(**base)


def par(tp=1, cp=1, pp=1, sp=False, distopt=True) -> ParallelConfig:
    return ParallelConfig(tp=tp, cp=cp, pp=pp, sequence_parallel=sp, distributed_optimizer=distopt)


BENCH_REPORTS = sorted((Path(__file__).resolve().parents[2] / "docs" / "benchmarks").glob("bench_*.json"))


def test_layer_activations_at_64k_match_the_formula():
    # Analytic (bf16, t = 1): s (12h + 4kv + 6f) bytes + fp32 softmax statistics (4 x heads per token).
    analytic = layer_activation_bytes(LLAMA, S64, tp=1, sequence_parallel=False)
    assert analytic == S64 * (12 * H + 4 * KV + 6 * F) + S64 * 4 * 32
    assert analytic / GiB == pytest.approx(8.5, rel=1e-3)  # 8.5 GiB (+ 8 MiB statistics)
    for backend, factor in LAYER_FACTOR.items():
        calibrated = layer_activation_bytes(LLAMA, S64, 1, False, factor=factor)
        assert calibrated == int(analytic * factor)
    est = estimate_memory(LLAMA, train(), par(), S64, world_size=8, gpu_memory_gib=80, attention_backend="plugin")
    assert est.activations == L * layer_activation_bytes(LLAMA, S64, 1, False, factor=LAYER_FACTOR["plugin"])


@pytest.mark.parametrize("report", BENCH_REPORTS, ids=lambda p: p.name)
def test_regression_estimate_within_margin_of_the_peaks_it_was_fitted_on(report):
    """Peaks tools/bench.py measured on one GPU (the trainer's default kernels, 64K tokens, tp = cp = 1):
    the same reports LAYER_FACTOR was fitted on, so this guards the fit, it does not validate it."""
    data = json.loads(report.read_text())
    records = list(bench_records(data))
    assert records, f"{report.name} holds no clean trainer measurement"
    for backend, layers, layout, peak, model, train in records:
        estimate = bench_estimate(model, data, backend, train=train)
        assert abs(estimate - peak) <= MARGIN * peak, (backend, layers, layout, train, estimate, peak)


WHOLE_MODEL_REPORTS = [p for p in BENCH_REPORTS if json.loads(p.read_text()).get("whole_model")]


@pytest.mark.parametrize("report", WHOLE_MODEL_REPORTS, ids=lambda p: p.name)
def test_estimate_within_margin_of_whole_model_peaks(report):
    """The Llama-3-8B shape with its 128,256-token vocabulary and as many layers as the GPU held
    (tools/bench.py --whole-model), with the measured path's recompute settings."""
    data = json.loads(report.read_text())
    whole = data["whole_model"]
    path = data["paths"][whole["path"]]
    records = list(bench_records({**data, "paths": {whole["path"]: path}}))
    assert records, f"{report.name}: the whole model's path {whole['path']} has no clean measurement"
    train = records[0][-1]
    model = replace(ModelConfig(**{k: v for k, v in data["model"].items() if k in ModelConfig.__dataclass_fields__}),
                    num_layers=whole["layers"])
    estimate = bench_estimate(model, data, "plugin", train=train)
    for layout, r in whole["layouts"].items():
        assert abs(estimate - r["peak_gib"]) <= MARGIN * r["peak_gib"], (layout, estimate, r["peak_gib"])


def test_refused_only_above_the_margin():
    est = estimate_memory(LLAMA, train(), par(tp=4, cp=2, sp=True), S64, 64, 80)
    just_below = est.total / GiB / (1 + MARGIN) * 1.001  # estimate 0.1% inside the margin
    assert not check_fits(LLAMA, train(), par(tp=4, cp=2, sp=True), S64, 64, just_below).fits
    with pytest.raises(ConfigError):
        check_fits(LLAMA, train(), par(tp=4, cp=2, sp=True), S64, 64, est.total / GiB / (1 + MARGIN) * 0.999)


def test_tensor_and_sequence_parallel_sharding():
    full = layer_activation_bytes(LLAMA, S64, 1, False)
    sp = layer_activation_bytes(LLAMA, S64, 2, True)
    assert sp == full // 2  # with sequence parallelism everything is split over TP
    no_sp = layer_activation_bytes(LLAMA, S64, 2, False)
    # Without SP the two norms' inputs and outputs (4 x 2 bytes x h per token) stay whole.
    assert no_sp == sp + S64 * 2 * 4 * (H - H // 2)
    # Beyond 8 KV groups, K/V heads are replicated: tp 16 would keep one group (128 wide), not 64.
    assert layer_activation_bytes(LLAMA, 1, 16, True) == int(
        2 * (4 * H / 16 + 2 * H / 16 + 2 * 128 + 3 * F / 16) + 4 * 32 / 16)


def test_context_parallel_halves_tokens_per_rank():
    one = estimate_memory(LLAMA, train(), par(cp=1), S64, 8, 80)
    two = estimate_memory(LLAMA, train(), par(cp=2), S64, 8, 80)
    assert two.info["tokens_per_rank"] == S64 // 2
    assert two.activations == pytest.approx(one.activations / 2, rel=1e-6)


def test_model_state_terms():
    p = param_count(LLAMA, 128256)
    assert rank_params(LLAMA, 128256, tp=1, pp=1) == p  # 128256 is already a multiple of 128
    est = estimate_memory(LLAMA, train(), par(), S64, world_size=64, gpu_memory_gib=80)
    assert est.weights == 2 * p  # bf16
    assert est.grads == 4 * p  # fp32 main grads (grad_reduce_in_fp32)
    assert est.optimizer == 12 * p // 64  # fp32 master + m + v over dp 64
    assert estimate_memory(LLAMA, train(), par(), S64, 64, 80, grad_reduce_in_fp32=False).grads == 2 * p
    no_distopt = estimate_memory(LLAMA, train(), par(distopt=False), S64, 64, 80)
    assert no_distopt.optimizer == 12 * p
    # The distributed optimizer shards over dp x cp: at a fixed world size, cp does not change it.
    cp8 = estimate_memory(LLAMA, train(), par(cp=8), S64, 64, 80)
    assert cp8.info["dp"] == 8 and cp8.optimizer == 12 * p // 64
    # TP splits the matrices (vocabulary-parallel embedding and output layer too); norms replicate.
    tp4 = rank_params(LLAMA, 128256, tp=4, pp=1)
    assert tp4 == (p - 65 * H) // 4 + 65 * H
    fp32 = estimate_memory(LLAMA, train(precision="fp32"), par(), S64, 64, 80)
    assert fp32.weights == 4 * p and fp32.optimizer == 8 * p // 64


def test_pipeline_stage_and_in_flight_micro_batches():
    # pp 4: 8 layers per stage plus the embedding (first) or final norm + output layer (last).
    p = rank_params(LLAMA, 128256, tp=1, pp=4)
    layer = 2 * H * H + 2 * H * KV + 3 * H * F + 2 * H
    assert p == 8 * layer + 128256 * H + H
    est = estimate_memory(LLAMA, train(recompute="full"), par(pp=4), S64, world_size=8, gpu_memory_gib=80)
    assert est.info["in_flight"] == 4  # 1F1B: stage 0 holds pp micro-batches
    assert est.activations == 8 * 4 * 2 * H * S64
    few = estimate_memory(LLAMA, train(recompute="full", global_batch_size=4), par(pp=4), S64, 8, 80)
    assert few.info["micro_batches"] == 2 and few.info["in_flight"] == 2


def test_recompute_modes():
    none = estimate_memory(LLAMA, train(), par(), S64, 64, 80)
    full = estimate_memory(LLAMA, train(recompute="full"), par(), S64, 64, 80)
    assert full.activations == L * 2 * H * S64  # only each layer's input
    assert full.recompute_layer == none.activations // L  # one layer rebuilt during backward
    core_attn = estimate_memory(LLAMA, train(recompute="selective"), par(), S64, 64, 80, recompute_modules=("core_attn",))
    # Megatron's selective recompute of core_attn saves only flash attention's statistics.
    assert 0 < none.activations - core_attn.activations < 0.01 * none.activations
    # swiglu: the SwiGLU output (f per token) is dropped; layernorm: the two norm outputs (2h).
    swiglu = estimate_memory(LLAMA, train(recompute="selective"), par(), S64, 64, 80, recompute_modules=("swiglu",))
    assert none.activations - swiglu.activations == pytest.approx(L * S64 * 2 * F * LAYER_FACTOR["te"], rel=1e-6)
    both = estimate_memory(LLAMA, train(recompute="selective"), par(tp=2, sp=True), S64, 64, 80)  # the default
    none_sp = estimate_memory(LLAMA, train(), par(tp=2, sp=True), S64, 64, 80)
    dropped = L * S64 * 2 * (F / 2 + 2 * H / 2)  # both shard over TP with sequence parallelism
    assert none_sp.activations - both.activations == pytest.approx(dropped * LAYER_FACTOR["te"], rel=1e-6)
    mlp = estimate_memory(LLAMA, train(recompute="selective"), par(), S64, 64, 80, recompute_modules=("mlp",))
    assert none.activations - mlp.activations == pytest.approx(L * S64 * 2 * 3 * F * LAYER_FACTOR["te"], rel=1e-6)
    # with Megatron's mlp recompute the MLP's checkpoint keeps its input: layernorm drops one norm output
    mlp_ln = estimate_memory(LLAMA, train(recompute="selective"), par(), S64, 64, 80, recompute_modules=("mlp", "layernorm"))
    assert mlp.activations - mlp_ln.activations == pytest.approx(L * S64 * 2 * H * LAYER_FACTOR["te"], rel=1e-6)
    with pytest.raises(ValueError, match="not modelled"):
        estimate_memory(LLAMA, train(recompute="selective"), par(), S64, 64, 80, recompute_modules=("moe",))


def test_logits_blocks_and_plugin_cp():
    blocked = estimate_memory(LLAMA, train(), par(), S64, 64, 80, cross_entropy="torch")
    whole = estimate_memory(LLAMA, train(), par(), S64, 64, 80, logits_block=None, cross_entropy="torch")
    assert blocked.logits - 4 * H * S64 == 14 * 2048 * 128256
    assert whole.logits - 4 * H * S64 == 14 * S64 * 128256  # 107 GiB: why the loss is blocked
    # fused: the bf16 logits of one block (their gradient in place) and the output layer's weight
    # gradient, summed in fp32 and cast to bf16
    fused = estimate_memory(LLAMA, train(), par(), S64, 64, 80)
    assert fused.logits - 4 * H * S64 == 2 * 2048 * 128256 + (4 + 2) * 128256 * H
    # the loss's backward and a layer's backward are not alive at once: the larger one counts
    assert fused.total - fused.overhead - fused.weights - fused.grads - fused.optimizer - fused.activations == max(
        fused.logits, fused.workspace)
    full = estimate_memory(LLAMA, train(recompute="full"), par(), S64, 64, 80)
    assert full.total - full.overhead - full.weights - full.grads - full.optimizer - full.activations == max(
        full.logits, full.workspace + full.recompute_layer)
    te = estimate_memory(LLAMA, train(), par(tp=8, cp=8, sp=True), S512, 64, 80, attention_backend="te")
    plugin = estimate_memory(LLAMA, train(), par(tp=8, cp=8, sp=True), S512, 64, 80, attention_backend="plugin")
    # The plugin keeps the gathered K/V of the 7 other CP ranks per layer: 2 bytes x 2 x 128 x 7 x 64K.
    plugin_layer = layer_activation_bytes(LLAMA, S64, 8, True, factor=LAYER_FACTOR["plugin"])
    assert te.activations == L * layer_activation_bytes(LLAMA, S64, 8, True, factor=LAYER_FACTOR["te"])
    assert plugin.activations - L * plugin_layer == L * 2 * 2 * 128 * 7 * S64


def test_regression_preset_layouts_estimates_on_h100():
    """Pins the estimator's own output for the presets' layouts (57.4 GiB at 64K): a change to any
    term shows here. Not a measurement."""
    t64 = train()
    fit64 = check_fits(LLAMA, t64, par(tp=4, cp=2, sp=True), S64, world_size=64, gpu_memory_gib=79.6)
    assert fit64.total / GiB == pytest.approx(57.4, abs=0.1)
    t512 = train(global_batch_size=16)
    for backend in ("te", "plugin"):
        est = check_fits(LLAMA, t512, par(tp=8, cp=8, sp=True), S512, 64, gpu="h100_80gb",
                         attention_backend=backend)
        assert est.total < 65 * GiB


def test_regression_refusal_names_the_breakdown_and_a_fix():
    """The message's figures (156.9 GiB of activations, 44.9 GiB with full recompute) are the
    estimator's own output, pinned; what is checked beyond them is what the message names."""
    with pytest.raises(ConfigError) as err:
        check_fits(LLAMA, train(), par(tp=2, sp=True), S64, world_size=64, gpu_memory_gib=79.6)
    msg = str(err.value)
    assert "data.seq_length=65536" in msg and "activations 156.9" in msg and "79.6 GiB available" in msg
    assert "fits with: train.recompute=full (44.9 GiB)" in msg
    assert isinstance(err.value, ValueError)
    # 512K on one node without TP: no single change fits; the message says what to combine.
    with pytest.raises(ValueError, match="no single change fits"):
        check_fits(LLAMA, train(global_batch_size=16), par(), S512, world_size=8, gpu_memory_gib=79.6)


def test_gpu_from_config_key_and_regression_table_row():
    class T:  # a config with the proposed train.gpu key
        global_batch_size, micro_batch_size, precision, recompute, gpu = 64, 1, "bf16", "full", "h200"

    est = estimate_memory(LLAMA, T(), par(), S64, 64)
    assert est.gpu_memory / GiB == pytest.approx(140.4, abs=0.1)
    assert "| 64K | 4 | 2 | 8 | on | none |" in memory_table()


def test_startup_check_estimates_the_backend_the_trainer_runs(monkeypatch):
    """``model.attention_backend=auto`` runs the plugin path (model/builder.py), so the check made
    before training starts must estimate that path, not the TE one (its K/V handling and calibration
    differ). The 64K preset's layout, on the 64 GPUs it is meant for."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from megatron_prolong.config import register_configs
    from megatron_prolong.model.builder import resolve_attention_backend
    from megatron_prolong.train import memory
    from megatron_prolong.main import check_memory

    register_configs()
    with initialize_config_module("megatron_prolong.conf", version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=["experiment=prolong_64k"]))
    assert cfg.model.attention_backend == "auto" and resolve_attention_backend(cfg.model) == "plugin"
    checked = []

    def recording(*args, **kwargs):
        checked.append(check_fits(*args, **kwargs))
        return checked[-1]

    monkeypatch.setattr(memory, "check_fits", recording)
    check_memory(cfg, world_size=64)

    def estimate(backend):
        return estimate_memory(cfg.model, cfg.train, cfg.parallel, cfg.data.seq_length, 64,
                               gpu=cfg.train.gpu, attention_backend=backend)

    assert len(checked) == 1 and checked[0].total == estimate("plugin").total
    assert estimate("te").total != estimate("plugin").total  # the test can tell the two paths apart
