"""The memory estimate's reports: its calibration on the peaks tools/bench.py measured, the layout
table in docs/recipe.md, and the command line that prints either (or one configuration's estimate).
The estimate itself: megatron_prolong/train/memory.py."""

from __future__ import annotations

from dataclasses import replace

from megatron_prolong.train.flops import GPU_SPECS, gpu_spec
from megatron_prolong.train.memory import LAYER_FACTOR, GiB, estimate_memory

# -- calibration on measured peaks (tools/bench.py reports) ----------------------------------

_RECOMPUTE_KEYS = ("train.recompute=", "train.recompute_modules=")


def bench_records(report: dict):
    """(backend, layers, layout, measured peak GiB, model config, train overrides) of every clean
    measurement of the trainer's default kernels in a tools/bench.py report, with and without
    recompute (paths whose only other overrides are ``train.recompute*``): a build that started
    with more than 1 GiB still allocated (an earlier build not yet freed), or that did not record
    it, is skipped."""
    from megatron_prolong.config import ModelConfig

    model = ModelConfig(**{k: v for k, v in report["model"].items() if k in ModelConfig.__dataclass_fields__})
    for path in report["paths"].values():
        overrides = path.get("overrides", [])
        if path.get("kind") not in ("trainer", "variant") or any(
                not o.startswith(("model.attention_backend=",) + _RECOMPUTE_KEYS) for o in overrides):
            continue
        backend = "te" if "model.attention_backend=te" in overrides else "plugin"
        train = {}
        for o in overrides:
            if o.startswith(_RECOMPUTE_KEYS):
                key, value = o.split("=", 1)
                train[key.split(".", 1)[1]] = ([m.strip() for m in value.strip("[]").split(",")]
                                               if key.endswith("_modules") else value)
        for layers, per in path.get("layers", {}).items():
            before = per.get("allocated_before_build_gib")
            if before is None or before > 1.0:
                continue
            for layout, r in per.get("layouts", {}).items():
                yield backend, int(layers), layout, r["peak_gib"], replace(model, num_layers=int(layers)), train


def bench_estimate(model_cfg, report: dict, backend: str, factor: float | None = None, train: dict | None = None) -> float:
    """GiB the estimate gives for a tools/bench.py configuration (``train``: its recompute
    settings), without the overhead allowance (the measured peak is PyTorch's allocated memory: no
    CUDA context, no fragmentation)."""
    from megatron_prolong.config import ParallelConfig, TrainConfig

    est = estimate_memory(model_cfg, TrainConfig(global_batch_size=1, micro_batch_size=1, precision="bf16", **(train or {})),
                          ParallelConfig(), report["seq"], 1, 1e6, vocab_size=report["vocab"],
                          attention_backend=backend, overhead_gib=0.0, layer_factor=factor)
    return est.total / GiB


def calibrate(report: dict) -> dict[str, float]:
    """Per backend, the LAYER_FACTOR that makes the estimate match the report's clean peaks without
    recompute (least squares: the estimate is linear in the factor)."""
    fits: dict[str, list[tuple[float, float]]] = {}
    for backend, _, _, peak, model, train in bench_records(report):
        if train.get("recompute", "none") != "none":
            continue
        at0 = bench_estimate(model, report, backend, 0.0)
        slope = bench_estimate(model, report, backend, 1.0) - at0
        fits.setdefault(backend, []).append((peak - at0, slope))
    return {b: sum(y * x for y, x in v) / sum(x * x for _, x in v) for b, v in fits.items()}


# -- the table in docs/recipe.md ---------------------------------------------------------------

DOC_LAYOUTS = {
    65536: [
        dict(tp=1, cp=1, sp=False, recompute="none"),
        dict(tp=1, cp=1, sp=False, recompute="full"),
        dict(tp=1, cp=2, sp=False, recompute="full"),
        dict(tp=2, cp=1, sp=True, recompute="full"),
        dict(tp=1, cp=8, sp=False, recompute="full"),
        dict(tp=2, cp=4, sp=True, recompute="none"),
        dict(tp=4, cp=2, sp=True, recompute="none"),
        dict(tp=2, cp=4, sp=True, recompute="selective"),
        dict(tp=8, cp=1, sp=True, recompute="none"),
    ],
    524288: [
        dict(tp=1, cp=8, sp=False, recompute="full"),
        dict(tp=2, cp=8, sp=True, recompute="full"),
        dict(tp=4, cp=4, sp=True, recompute="full"),
        dict(tp=8, cp=2, sp=True, recompute="full"),
        dict(tp=4, cp=8, sp=True, recompute="none"),
        dict(tp=8, cp=4, sp=True, recompute="none"),
        dict(tp=8, cp=8, sp=True, recompute="none"),
    ],
}


def memory_table(gpu: str = "h100_80gb", world_size: int = 64, attention_backend: str = "te") -> str:
    """Markdown table of the DOC_LAYOUTS for Llama-3-8B with the presets' batch sizes."""
    from megatron_prolong.config import ModelConfig, ParallelConfig, TrainConfig

    model = ModelConfig(name="llama3_8b", num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
                        num_attention_heads=32, num_query_groups=8, vocab_size=128256)
    spec = gpu_spec(gpu)
    rows = [
        f"Llama-3-8B, {world_size} x {spec.name} ({spec.memory_gib:.1f} GiB), bf16, distributed optimizer, "
        f"micro batch 1, attention backend {attention_backend}; GiB per GPU.",
        "",
        "| seq | tp | cp | dp | sp | recompute | weights | grads | optim | activations | recompute layer | logits | workspace | overhead | total | fits |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for seq, layouts in DOC_LAYOUTS.items():
        gbs = 64 if seq == 65536 else 16
        for lay in layouts:
            train = TrainConfig(global_batch_size=gbs, micro_batch_size=1, precision="bf16", recompute=lay["recompute"])
            par = ParallelConfig(tp=lay["tp"], cp=lay["cp"], sequence_parallel=lay["sp"], distributed_optimizer=True)
            est = estimate_memory(model, train, par, seq, world_size, spec.memory_gib, attention_backend=attention_backend)
            g = est.gib
            rows.append(
                f"| {seq // 1024}K | {lay['tp']} | {lay['cp']} | {est.info['dp']} | {'on' if lay['sp'] else 'off'} "
                f"| {lay['recompute']} | {g('weights'):.1f} | {g('grads'):.1f} | {g('optimizer'):.1f} "
                f"| {g('activations'):.1f} | {g('recompute_layer'):.1f} | {g('logits'):.1f} | {g('workspace'):.1f} "
                f"| {g('overhead'):.1f} | **{est.total / GiB:.1f}** | {'yes' if est.fits else 'no'} |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    """``python -m megatron_prolong.train.memory_report [--gpu G] [--world N] [--backend te|plugin]``
    prints the docs table; with Hydra overrides (``experiment=prolong_64k ...``) it prints the
    estimate of that configuration instead."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--gpu", default=None, choices=sorted(GPU_SPECS))
    ap.add_argument("--world", type=int, default=64, help="number of GPUs")
    ap.add_argument("--backend", default="te", choices=("te", "plugin"))
    ap.add_argument("--calibrate", metavar="BENCH_JSON", help="fit LAYER_FACTOR to a tools/bench.py report")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if args.calibrate:
        import json

        with open(args.calibrate) as f:
            report = json.load(f)
        for backend, factor in calibrate(report).items():
            print(f"LAYER_FACTOR[{backend!r}] = {factor:.3f} (now {LAYER_FACTOR[backend]:.3f})")
        return
    if not args.overrides:
        print(memory_table(args.gpu or "h100_80gb", args.world, args.backend))
        return
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from megatron_prolong.config import register_configs

    register_configs()
    with initialize_config_module("megatron_prolong.conf", version_base="1.3"):
        raw = compose("config", overrides=args.overrides)
    cfg = OmegaConf.to_object(raw)
    est = estimate_memory(cfg.model, cfg.train, cfg.parallel, cfg.data.seq_length, args.world,
                          gpu=args.gpu, attention_backend=args.backend)
    print(est)
    print("fits" if est.fits else "DOES NOT FIT")


if __name__ == "__main__":
    main()
