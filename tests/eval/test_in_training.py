"""``eval.every``: the demo trainer runs the recall suite and the position-wise loss on its live model
and logs ``eval/<task>/<length>``, ``eval/position_loss/<bucket>`` and the time taken, to
metrics.jsonl and TensorBoard; bad evaluation settings fail before the first step."""

from __future__ import annotations

import json

from eval_helpers import prose

SMALL = ("data.seq_length=4096", "train.global_batch_size=1", "train.micro_batch_size=1",
         "data.synthetic_sequences=8", "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
         "model.num_attention_heads=4", "model.num_query_groups=2", "checkpoint.save_interval=0",
         "model.attention_backend=plugin")


def test_eval_every_logs_recall_and_position_loss(tmp_path, run_training):
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"text": prose(700 + 50 * k)}) + "\n" for k in range(2)))
    run = run_training(*SMALL, "train.steps=2", "eval.every=2", "eval.tasks=[ruler_mk2,ruler_vt]",
                       "eval.lengths=[4096]", "eval.samples=1", f"eval.data={held}")
    record = run.metrics[-1]
    assert record["step"] == 2
    for key in ("eval/ruler_mk2/4096", "eval/ruler_vt/4096", "eval/position_loss/1", "eval/position_loss/1024",
                "eval/seconds"):
        assert key in record, sorted(record)
    assert 0 <= record["eval/ruler_mk2/4096"] <= 100 and record["eval/seconds"] > 0
    assert 0 < record["eval/position_loss/1024"] < 20
    assert "evaluation in" in run.output

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run.dir / "tensorboard"))
    acc.Reload()
    assert {"eval/ruler_mk2/4096", "eval/position_loss/1024", "eval/seconds"} <= set(acc.Tags()["scalars"])


def test_bad_eval_settings_fail_before_training(run_training):
    run = run_training(*SMALL, "train.steps=1", "eval.every=1", "eval.lengths=[8192]", check=False)
    assert run.proc.returncode != 0
    assert "exceed the model's length 4096" in run.output and not run.metrics
