"""tools/bench.py's inputs: the synthetic corpus (one MDS domain per document layout), the
trainer configuration composed from Hydra overrides, and the GPU timing helpers."""

from __future__ import annotations

import os
import statistics

import numpy as np
import torch

LAYOUT_MEANS = {"one_doc": None, "mean8k": 8192, "mean2k": 2048, "mean1.5k": 1536}


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


def _timed_tflops(mm, n: int, reps: int) -> float:
    for _ in range(3):
        mm()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        mm()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / statistics.median(times) / 1e12


def matmul_tflops(n: int = 8192, reps: int = 20) -> float:
    if not torch.cuda.is_available():
        return float("nan")
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return _timed_tflops(lambda: a @ b, n, reps)


def fp8_matmul_tflops(n: int = 8192, reps: int = 20) -> float:
    """An n^3 E4M3 x E4M3 GEMM with bf16 output and per-tensor scales (what TE's FP8 linears run),
    through torch's ``_scaled_mm``; NaN below compute capability 8.9 (no FP8 tensor cores)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        return float("nan")
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()  # _scaled_mm takes B column-major
    one = torch.ones((), device="cuda")
    return _timed_tflops(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), n, reps)
