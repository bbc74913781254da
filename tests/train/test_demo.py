"""The tiny end-to-end demo (the default config): real data format, real Megatron model, loss falls.
The demo is the README's, its first command (``python -m megatron_prolong.train``, into
outputs/demo), trained once per session for this file and tests/eval/test_demo_eval.py."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from readme_demo import DEMO_DIR, readme_demo, run_readme_command
from trainrun import SMALL, TrainingRun, train


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The README's demo run; its ``dir`` is absolute, ``DEMO_DIR`` what the trainer was given."""
    root, done = readme_demo(tmp_path_factory)
    first = done[0]
    assert first.args[-1].startswith("python -m megatron_prolong.train") and first.returncode == 0, (
        f"the demo failed ({first.returncode}):\n{(first.stdout + first.stderr)[-6000:]}")
    return TrainingRun(root / DEMO_DIR, first)


def test_loss_falls(demo):
    losses = demo.losses
    assert len(losses) >= 10
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, (first, last)


def test_run_dir_holds_everything(demo):
    d = demo.dir
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    assert cfg["run"]["dir"] == str(DEMO_DIR) and cfg["model"]["name"] == "tiny"
    record = demo.metrics[-1]
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s",
                "domain/long/samples", "domain/short/tokens", "domain/long/loss"):
        assert key in record, key
    assert record["tokens"] == record["step"] * cfg["train"]["global_batch_size"] * cfg["data"]["seq_length"]
    assert list((d / "tensorboard").glob("events.out.tfevents.*"))
    tracker = d / "checkpoints" / "latest_checkpointed_iteration.txt"
    step = int(tracker.read_text())
    assert step == cfg["train"]["steps"]
    ckpt = d / "checkpoints" / f"iter_{step:07d}"
    assert (ckpt / "metadata.json").is_file() and json.loads((ckpt / "prolong_meta.json").read_text())["step"] == step
    # The synthetic corpus is real MDS in ProLong's layout.
    assert json.loads((d / "data" / "long" / "index.json").read_text())["shards"][0]["format"] == "mds"
    # Console progress: one line per step with loss, throughput and ETA.
    assert "ETA" in demo.output and "tok/s" in demo.output


def test_rerun_of_a_finished_run_does_nothing(demo, tmp_path):
    shutil.copytree(demo.dir, tmp_path / DEMO_DIR)
    again = run_readme_command(tmp_path, demo.proc.args[-1])
    assert again.returncode == 0 and "already complete" in again.stdout + again.stderr, again.stderr[-3000:]


def test_reused_run_dir_with_another_seq_length_is_refused_naming_the_old_data(demo, tmp_path):
    """The run folder's prepared data records its sequence length: the mismatch is refused before
    anything starts, saying why and what to do, and nothing in the folder changes."""
    run_dir = tmp_path / "run"
    shutil.copytree(demo.dir, run_dir)
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    again = train(run_dir, "data.seq_length=256", check=False)
    assert again.proc.returncode == 2, again.output[-3000:]
    (line,) = [x for x in again.proc.stderr.splitlines() if x.startswith("megatron-prolong:")]
    assert "prepared for data.seq_length=512" in line and "data.seq_length=256" in line
    assert "Use a new run.dir, or delete" in line and "Traceback" not in again.output
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


def test_start_is_a_few_lines_and_the_end_a_summary(demo):
    """Megatron's configuration dumps and notices stay out (log.verbose=false); the start names the
    model, layout, memory, data and run folder; the end says what was done and where things are."""
    out = demo.proc.stdout + demo.proc.stderr
    before_step_1 = out[: out.index("step      1/")].strip().splitlines()
    assert len(before_step_1) <= 10, before_step_1
    for noise in ("Params for bucket", "OptimizerConfig", "DistributedDataParallelConfig", "Warning", "DEPRECATED"):
        assert noise not in out, noise
    last = demo.metrics[-1]
    steps = last["step"]
    for line in ("model tiny: 3.02M parameters", "layout tp=1 pp=1 cp=1 dp=1", "memory estimate",
                 f"data {DEMO_DIR / 'data'}; run folder {DEMO_DIR}", f"training {steps} steps"):
        assert line in out, line
    assert (f"done: {steps} steps in " in out and f"{last['tokens']:,} tokens, final loss {last['loss']:.4f}; checkpoint "
            f"{DEMO_DIR / 'checkpoints' / f'iter_{steps:07d}'}; TensorBoard: tensorboard --logdir {DEMO_DIR / 'tensorboard'}"
            in out), out[-1000:]


def test_verbose_shows_megatrons_output(tmp_path):
    run = train(tmp_path / "run", *SMALL, "train.steps=1", "log.verbose=true")
    assert "Params for bucket" in run.output and "OptimizerConfig" in run.output
