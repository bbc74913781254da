"""``eval.every``: the demo trainer runs the recall suite and the position-wise loss on its live model
and logs ``eval/<task>/<length>``, ``eval/position_loss/<bucket>`` and the time taken, to
metrics.jsonl and TensorBoard; bad evaluation settings fail before the first step."""

from __future__ import annotations

import json

import pytest
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


def test_eval_every_defaults_work_on_the_demo(run_training):
    """The demo (data.seq_length 512, byte tokenizer) with only eval.every set: json_kv's smallest
    sample does not fit 512 tokens, so the default suite is ruler_mk2 alone, and the log says why."""
    run = run_training("train.steps=2", "eval.every=2", "checkpoint.save_interval=0", "log.tensorboard=false")
    record = run.metrics[-1]
    assert record["step"] == 2 and 0 <= record["eval/ruler_mk2/512"] <= 100
    assert not any(k.startswith("eval/json_kv") for k in record)
    assert "eval every 2 steps: ruler_mk2 at 512 tokens" in run.output
    assert "json_kv left out (needs 693 tokens)" in run.output


def test_impossible_eval_settings_are_one_line_at_config_time(run_training, tmp_path):
    run = run_training("eval.every=1", "eval.tasks=[json_kv]", check=False)
    assert run.proc.returncode == 2 and "Traceback" not in run.output, run.output[-3000:]
    (line,) = [x for x in run.output.splitlines() if "invalid configuration" in x]
    assert line.startswith("megatron-prolong: invalid configuration: eval.tasks=['json_kv'] at data.seq_length=512")
    assert "json_kv: 512 tokens is below the task's minimum of 693 tokens" in line
    assert "(the nearest: 693, 1024)" in line and "raise data.seq_length to at least 693" in line
    assert not run.dir.exists()  # nothing started: the trainer makes run.dir once the config is valid


def test_unreadable_eval_data_is_one_line(run_training, tmp_path):
    """eval.data's lines are read when the trainer starts, after the config checks: a bad line still
    ends the run as one line naming the key, with no traceback."""
    bad = tmp_path / "held.jsonl"
    bad.write_text(json.dumps({"words": "no input_ids or text"}) + "\n")
    run = run_training("eval.every=1", "train.steps=1", "checkpoint.save_interval=0", f"eval.data={bad}",
                       check=False)
    assert run.proc.returncode == 2 and "Traceback" not in run.output, run.output[-3000:]
    (line,) = [x for x in run.output.splitlines() if "invalid configuration" in x]
    assert line.startswith(f"megatron-prolong: invalid configuration: eval.data: {bad}:1: each line needs "
                           "input_ids or text"), line
    assert not run.metrics


@pytest.mark.parametrize("overrides,message", [
    (("data.seq_length=256",), "eval.every=1: no default task fits data.seq_length=256 (eval.lengths is empty) with "
                               "this tokenizer (minimum lengths: json_kv 693, ruler_mk2 466); set data.seq_length "
                               "to at least 466"),
    (("eval.lengths=[400,512]", "eval.tasks=[ruler_mk2,ruler_mk3]"),
     "eval.tasks=['ruler_mk2', 'ruler_mk3'] at eval.lengths=[400, 512]: ruler_mk2: 400 tokens is below the task's "
     "minimum of 466 tokens"),
    (("eval.lengths=[512]", "eval.tasks=[ruler_vt]"), "ruler_vt: 512 tokens is below the task's minimum of"),
    (("eval.tasks=[ruler_mv]",), "eval.tasks: ruler_mv needs an essay haystack"),
    (("eval.tasks=[ruler_mk2]", "eval.samples=0"), "eval.samples=0 must be at least 1"),
    (("eval.tasks=[ruler_mk2]", "eval.batch_size=0"), "eval.batch_size=0 must be at least 1"),
    (("eval.data=/no/such/file.jsonl",), "eval.data=/no/such/file.jsonl does not exist"),
    (("model.attention_backend=te",), "eval.every needs model.attention_backend=plugin"),
])
def test_eval_settings_checked_with_the_config(overrides, message):
    from trainrun import compose_config

    from megatron_prolong.config import ConfigError
    from megatron_prolong.eval.settings import check_training_eval

    with pytest.raises(ConfigError) as err:
        check_training_eval(compose_config("eval.every=1", *overrides))
    assert message in str(err.value), str(err.value)


def test_short_haystack_refused_with_the_config(tmp_path):
    from trainrun import compose_config

    from megatron_prolong.config import ConfigError
    from megatron_prolong.eval.settings import check_training_eval

    (tmp_path / "essay.txt").write_text(prose(300))
    cfg = compose_config("eval.every=1", "eval.tasks=[ruler_mv]", "data.seq_length=4096", "eval.lengths=[4096]",
                         f"eval.haystack_file={tmp_path / 'essay.txt'}")
    with pytest.raises(ConfigError, match="eval.haystack_file: ruler_mv: the haystack file's 3.. words all fit"):
        check_training_eval(cfg)
    check_training_eval(compose_config("eval.every=1", "eval.tasks=[ruler_mv]", "data.seq_length=1024",
                                       f"eval.haystack_file={tmp_path / 'essay.txt'}"))
