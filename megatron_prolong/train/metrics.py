"""Metrics to metrics.jsonl, TensorBoard and a console line with throughput and ETA."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


class MetricsWriter:
    """Written by one rank only; every record is one JSON object per logged step."""

    def __init__(self, run_dir: Path, total_steps: int, tensorboard: bool) -> None:
        self.total_steps = total_steps
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self._start = time.monotonic()
        self._start_step: int | None = None

    def write(self, step: int, record: dict[str, Any]) -> None:
        record = {"step": step, **record}
        self._jsonl.write(json.dumps(record) + "\n")
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
            f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}"
        )

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
