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
    assert record["eval/seconds"] > 0 and "evaluation in" in run.output

    # The live model's numbers are the offline tools' on the checkpoint saved at the same step.
    from megatron_prolong.eval.cli import main

    ckpt = str(run.dir / "checkpoints")
    assert main(["position-loss", "--checkpoint", ckpt, "--data", str(held), "--out", str(tmp_path / "pl")]) == 0
    offline = json.loads((tmp_path / "pl" / "position_loss.json").read_text())["buckets"]
    assert {f"eval/position_loss/{b['start']}" for b in offline} == {k for k in record if "position_loss" in k}
    for b in offline:
        assert abs(record[f"eval/position_loss/{b['start']}"] - b["loss"]) < 1e-5 * max(1.0, b["loss"]), b
    assert main(["recall", "--checkpoint", ckpt, "--tasks", "ruler_mk2,ruler_vt", "--lengths", "4096",
                 "--samples", "1", "--out", str(tmp_path / "recall")]) == 0
    tasks = json.loads((tmp_path / "recall" / "results.json").read_text())["tasks"]
    assert {t: tasks[t]["4096"]["score"] for t in tasks} == {t: record[f"eval/{t}/4096"] for t in tasks}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run.dir / "tensorboard"))
    acc.Reload()
    assert {"eval/ruler_mk2/4096", "eval/position_loss/1024", "eval/seconds"} <= set(acc.Tags()["scalars"])


def test_bad_eval_settings_fail_before_training(run_training):
    run = run_training(*SMALL, "train.steps=1", "eval.every=1", "eval.lengths=[8192]", check=False)
    assert run.proc.returncode != 0
    assert "exceed the model's length 4096" in run.output and not run.metrics
