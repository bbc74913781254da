"""Launching the real trainer as a subprocess (torchrun for several processes), for tests."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port free on this machine now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TrainingRun:
    def __init__(self, run_dir: Path, proc: subprocess.CompletedProcess) -> None:
        self.dir = run_dir
        self.proc = proc
        self.output = proc.stdout + proc.stderr

    @property
    def metrics(self) -> list[dict]:
        return read_metrics(self.dir)

    @property
    def losses(self) -> list[float]:
        return [m["loss"] for m in self.metrics]


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl records, in the order written (a step re-run after a kill repeats)."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def compose_config(*overrides: str):
    """The typed configuration the trainer would run with these overrides."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from megatron_prolong.config import register_configs

    register_configs()
    with initialize_config_module("megatron_prolong.conf", version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=list(overrides)))


def assert_checkpoint_size_estimated(run_dir: Path, step: int, *overrides: str, rel: float = 0.02) -> None:
    """The trainer's size estimate is within ``rel`` of a saved checkpoint's bytes on disk (the
    rest is metadata, RNG and data-stream state)."""
    from megatron_prolong.tokenizer import ByteTokenizer
    from megatron_prolong.train.checkpoint_manager import estimate_disk

    estimate = estimate_disk(compose_config(*overrides), ByteTokenizer.vocab_size).each
    folder = run_dir / "checkpoints" / f"iter_{step:07d}"
    actual = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert abs(actual - estimate) <= rel * actual, f"estimated {estimate} bytes, {actual} on disk"


def crashed_copy(run_dir: Path, dest: Path, step: int) -> Path:
    """``run_dir`` as it was had the run crashed after its last step, with ``step`` its last save."""
    shutil.copytree(run_dir, dest)
    ckpts = dest / "checkpoints"
    for later in ckpts.glob("iter_*"):
        if int(later.name[5:]) > step:
            shutil.rmtree(later)
    (ckpts / "latest_checkpointed_iteration.txt").write_text(str(step))
    return dest


def by_step(run_dir: Path) -> dict[int, dict]:
    records = read_metrics(run_dir)
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"a step is logged twice: {steps}"
    return {r["step"]: r for r in records}


def _env() -> dict[str, str]:
    # A child run makes its own rendezvous: drop any the test process itself set up.
    drop = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="1")
    return env


def die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the test process dies (Linux prctl PR_SET_PDEATHSIG), so a
    killed pytest leaves no torchrun behind (torchrun's workers then follow their launcher)."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def command(run_dir: Path, *overrides: str, nproc: int = 1) -> list[str]:
    """``python -m megatron_prolong.train`` (under torchrun when nproc > 1) for this run dir."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "megatron_prolong.train"]
    else:
        cmd = [sys.executable, "-m", "megatron_prolong.train"]
    return [*cmd, f"run.dir={run_dir}", *overrides]


def start(run_dir: Path, *overrides: str, nproc: int = 1, **popen) -> subprocess.Popen:
    """Start a run in the background, as its own process group (so a test can signal all of it)."""
    return subprocess.Popen(command(run_dir, *overrides, nproc=nproc), cwd=REPO, env=_env(),
                            start_new_session=True, preexec_fn=die_with_parent, **popen)


def train(run_dir: Path, *overrides: str, nproc: int = 1, check: bool = True, timeout: int = 900,
          env: dict[str, str] | None = None) -> TrainingRun:
    """Run the trainer to completion and collect its output (``env``: variables to set for it)."""
    cmd = command(run_dir, *overrides, nproc=nproc)
    proc = subprocess.run(cmd, cwd=REPO, env={**_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=die_with_parent)
    run = TrainingRun(run_dir, proc)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}): {' '.join(cmd)}\n{run.output[-6000:]}")
    return run


def run_once(root: Path, name: str, make: Callable[[Path], dict]) -> dict:
    """``make(root / name)`` once per test session for every test worker: the first to ask runs it
    under a file lock and records what it returns (JSON), the others wait for it and read the same
    record. ``root`` is a folder all workers share (the session's temporary root, ``shared_root``);
    a ``make`` that raises records nothing, so the next to ask tries again."""
    import fcntl

    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (also if this worker dies)
        done = folder / "output.json"
        if not done.exists():
            done.write_text(json.dumps(make(folder)))
        return json.loads(done.read_text())


def shared_train(root: Path, name: str, *overrides: str, nproc: int = 1) -> TrainingRun:
    """``train`` once per test session for every test worker (``run_once``), into ``root / name / "run"``.
    Whoever uses it must not change the run's folder."""

    def make(folder: Path) -> dict:
        run = train(folder / "run", *overrides, nproc=nproc)
        return {"args": run.proc.args, "stdout": run.proc.stdout, "stderr": run.proc.stderr}

    out = run_once(root, name, make)
    return TrainingRun(root / name / "run", subprocess.CompletedProcess(out["args"], 0, out["stdout"], out["stderr"]))


def shared_root(tmp_path_factory) -> Path:
    """The folder every test worker of this session shares (pytest-xdist gives each worker its own
    temporary root inside the session's)."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared-runs"


# Small, fast, float32 runs: checkpoint tests, and comparing parallel layouts step by step.
SMALL = ("data.seq_length=256", "train.global_batch_size=4", "train.micro_batch_size=1",
         "train.precision=fp32", "log.tensorboard=false")
PARITY = ("train.steps=4", *SMALL, "checkpoint.save_interval=0")


def assert_losses_close(a: list[float], b: list[float], rel: float = 1e-4) -> None:
    assert len(a) == len(b) and a, (a, b)
    for step, (x, y) in enumerate(zip(a, b), start=1):
        assert abs(x - y) <= rel * abs(y), f"step {step}: {x} vs {y} (rel diff {abs(x - y) / abs(y):.2e})"


def parity_baseline(tmp_path_factory) -> dict:
    """The single-process ``PARITY`` run that parallel layouts are compared with (trained once per
    session, ``shared_train``): its losses, pre-clip gradient norms, metrics and final tensors."""
    run = shared_train(shared_root(tmp_path_factory), "parity-baseline", *PARITY)
    return {"losses": run.losses, "grad_norms": [m["grad_norm"] for m in run.metrics], "metrics": run.metrics,
            "tensors": checkpoint_tensors(run.dir)}


def assert_trains_like(run: TrainingRun, baseline: dict) -> None:
    """The same per-step losses and gradient norms as ``parity_baseline``, and the same final weights
    and Adam moments (float32, relative 1e-4)."""
    assert len(baseline["losses"]) == 4
    assert_losses_close(run.losses, baseline["losses"])
    assert_losses_close([m["grad_norm"] for m in run.metrics], baseline["grad_norms"])
    assert_tensors_close(checkpoint_tensors(run.dir), baseline["tensors"])


def checkpoint_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a run's latest checkpoint (weights and Adam moments) at its global shape,
    whatever layout wrote it: the conversion code's reader of Megatron's distributed checkpoints."""
    from megatron_prolong.convert.mcore import DistCheckpointReader
    from megatron_prolong.inference import megatron_session
    from megatron_prolong.train.checkpoint import resolve_checkpoint

    with megatron_session():
        reader = DistCheckpointReader(resolve_checkpoint(run_dir), prefix="")
        return {key: reader.load(key) for key in reader.metadata}


def assert_tensors_close(a: dict, b: dict, rel: float = 1e-4) -> None:
    """``a`` has every tensor of ``b``, each within ``rel`` in relative norm of the difference. The
    distributed optimizer also saves its fp32 copy of each weight (``optimizer.state.param.<name>``):
    it must equal ``b``'s weight."""
    copies = {k: k.removeprefix("optimizer.state.param.") for k in a if k.startswith("optimizer.state.param.")}
    assert set(b) <= set(a) and set(a) - set(b) <= set(copies), sorted(set(a) ^ set(b))
    for key in sorted(a):
        x, y = a[key].double(), b[copies.get(key, key)].double()
        assert x.shape == y.shape, (key, x.shape, y.shape)
        err = (x - y).norm().item() / max(y.norm().item(), 1e-30)
        assert err <= rel, f"{key}: relative difference {err:.2e} > {rel:.0e}"
