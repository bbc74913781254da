"""metrics.jsonl is strict JSON, holds every step once after a resume, and the ETA counts days."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_prolong.train.metrics import MetricsWriter, format_eta


def _record(loss: float) -> dict:
    return {"loss": loss, "lr": 1e-3, "grad_norm": loss, "tokens_per_s": 10.0, "step_time": 1.0}


def _strict(line: str) -> dict:
    def refuse(name: str):
        raise ValueError(f"{name} is not JSON")

    return json.loads(line, parse_constant=refuse)


@pytest.mark.parametrize("seconds, text", [
    (0, "00:00:00"), (3661, "01:01:01"), (86399, "23:59:59"), (86400, "1d 00:00:00"),
    (3 * 86400 + 4 * 3600 + 5 * 60 + 6, "3d 04:05:06"), (40 * 86400 + 59.6, "40d 00:01:00"),
])
def test_eta_counts_days(seconds, text):
    assert format_eta(seconds) == text


def test_non_finite_values_are_null_and_tensorboard_skips_them(tmp_path):
    writer = MetricsWriter(tmp_path, total_steps=3, tensorboard=True)
    writer.write(1, _record(2.0))
    writer.write(2, _record(float("nan")))
    writer.write(3, _record(float("inf")))
    writer.close()
    rows = [_strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [2.0, None, None]
    assert [r["grad_norm"] for r in rows] == [2.0, None, None]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.0)]


def test_resume_cuts_metrics_and_tensorboard_back_to_the_resumed_step(tmp_path):
    first = MetricsWriter(tmp_path, total_steps=6, tensorboard=True)
    for step in range(1, 6):  # steps 4 and 5 ran, then a crash before their checkpoint
        first.write(step, _record(float(step)))
    first.close()
    resumed = MetricsWriter(tmp_path, total_steps=6, tensorboard=True, start_step=3)
    for step in range(4, 7):
        resumed.write(step, _record(10.0 + step))
    resumed.close()
    rows = [_strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows] == [1.0, 2.0, 3.0, 14.0, 15.0, 16.0]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0),
                                                                  (5, 15.0), (6, 16.0)]


def test_resume_after_a_kill_mid_write_drops_the_torn_line(tmp_path):
    """A job killed while writing leaves half a line; the resume must start, and the file stay JSON."""
    first = MetricsWriter(tmp_path, total_steps=4, tensorboard=False)
    for step in (1, 2, 3):
        first.write(step, _record(float(step)))
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 4.')
    resumed = MetricsWriter(tmp_path, total_steps=4, tensorboard=False, start_step=3)
    resumed.write(4, _record(14.0))
    resumed.close()
    rows = [_strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0)]
