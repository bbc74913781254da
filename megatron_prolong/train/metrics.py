"""Metrics to metrics.jsonl, TensorBoard and a console line with throughput and ETA."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch


def format_eta(seconds: float) -> str:
    """``H:MM:SS``, with days in front from 24 h on (``3d 04:05:06``): stage 1 runs for days."""
    s = int(round(max(seconds, 0.0)))
    days, s = divmod(s, 86400)
    clock = f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{days}d {clock}" if days else clock


def _json_value(value: Any) -> Any:
    """Strict JSON: a non-finite float (a skipped step's loss) is null, not NaN/Infinity."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def cut_after(path: Path, step: int) -> None:
    """Drop records after ``step``: a run resumed there re-runs (and re-logs) the later steps. A torn
    last line (the job was killed while writing it) is dropped too."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if k == len(lines) - 1:
                continue
            raise ValueError(f"{path}: line {k + 1} is not JSON ({err}); fix or remove that line to resume") from err
        if record["step"] <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if kept != lines:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)


class MetricsWriter:
    """Written by one rank only; every record is one JSON object per logged step.

    ``start_step``: the step the run starts from; later records (and TensorBoard events) of an
    earlier attempt that crashed before saving are dropped, so every step appears once.
    """

    def __init__(self, run_dir: Path, total_steps: int, tensorboard: bool, start_step: int = 0) -> None:
        self.total_steps = total_steps
        path = run_dir / "metrics.jsonl"
        cut_after(path, start_step)
        self._jsonl = open(path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1)
        self._start = time.monotonic()
        self._start_step: int | None = None

    def write(self, step: int, record: dict[str, Any]) -> None:
        record = {"step": step, **record}
        self._jsonl.write(json.dumps({k: _json_value(v) for k, v in record.items()}, allow_nan=False) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        print(self._console_line(step, record), flush=True)

    def _console_line(self, step: int, r: dict[str, Any]) -> str:
        if self._start_step is None:
            self._start_step, self._start = step - 1, time.monotonic() - r.get("step_time", 0.0)
        done = step - self._start_step
        per_step = (time.monotonic() - self._start) / max(done, 1)
        eta = per_step * (self.total_steps - step)
        return (
            f"step {step:>6}/{self.total_steps} | loss {r['loss']:.4f} | lr {r['lr']:.3e} | "
            f"grad norm {r['grad_norm']:.3f} | {r['tokens_per_s']:.0f} tok/s | "
            f"{r.get('tflops_per_gpu', 0.0):.1f} TFLOP/s/GPU (MFU {100 * r.get('mfu', 0.0):.1f}%) | "
            f"ETA {format_eta(eta)}"
        )

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


class StepClock:
    """Wall time and peak memory of one step. On CUDA (only there) the peak-memory counter is reset
    when the step starts, so the peak is this step's and not the run's so far, and the device is
    synchronized before the time is read, so kernels still queued when the step's Python returns
    count in this step and not the next."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._start = 0.0

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self._start = time.monotonic()

    def elapsed(self) -> float:
        """Seconds since :meth:`start`, the device's queued work included."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.monotonic() - self._start

    def peak_gib(self) -> float:
        """Peak allocated memory since :meth:`start` (0 off CUDA)."""
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else 0.0
