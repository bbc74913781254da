"""The tiny end-to-end demo (the default config): real data format, real Megatron model, loss falls."""

from __future__ import annotations

import json

import pytest
import yaml


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from trainrun import train

    return train(tmp_path_factory.mktemp("demo") / "run")


def test_loss_falls(demo):
    losses = demo.losses
    assert len(losses) >= 10
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, (first, last)


def test_run_dir_holds_everything(demo):
    d = demo.dir
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    assert cfg["run"]["dir"] == str(d) and cfg["model"]["name"] == "tiny"
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


def test_rerun_of_a_finished_run_does_nothing(demo):
    from trainrun import train

    again = train(demo.dir)
    assert "already complete" in again.output


def test_reused_run_dir_with_another_seq_length_is_refused_naming_the_old_data(demo, tmp_path):
    """The run folder's prepared data records its sequence length: the mismatch is refused before
    anything starts, saying why and what to do, and nothing in the folder changes."""
    import shutil

    from trainrun import train

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
                 f"data {demo.dir / 'data'}; run folder {demo.dir}", f"training {steps} steps"):
        assert line in out, line
    assert (f"done: {steps} steps in " in out and f"{last['tokens']:,} tokens, final loss {last['loss']:.4f}; checkpoint "
            f"{demo.dir / 'checkpoints' / f'iter_{steps:07d}'}; TensorBoard: tensorboard --logdir {demo.dir / 'tensorboard'}"
            in out), out[-1000:]


def test_verbose_shows_megatrons_output(tmp_path):
    from trainrun import SMALL, train

    run = train(tmp_path / "run", *SMALL, "train.steps=1", "log.verbose=true")
    assert "Params for bucket" in run.output and "OptimizerConfig" in run.output
