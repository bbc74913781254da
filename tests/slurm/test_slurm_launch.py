"""slurm/*.sh against a real single-node Slurm (Debian's 22.05), on CPU: 2 processes over gloo.

- ``sbatch --wait slurm/cpt.sh <overrides>`` trains, exits 0, leaves metrics, a checkpoint and a
  log in the run dir;
- ``scancel --signal=USR1 --batch`` makes it checkpoint, exit 75, requeue itself and finish, with
  the same per-step losses as the uninterrupted run;
- bad overrides fail fast with the message in the job's log and a non-zero exit;
- convert.sh / eval.sh pass their arguments through unchanged; every script is shellcheck-clean.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "slurm").glob("*.sh"))
TINY = (
    "train.steps=12", "data.seq_length=256", "train.global_batch_size=4", "train.micro_batch_size=1",
    "checkpoint.save_interval=4", "log.tensorboard=false",
)
# The test node has 2 CPUs and no GPUs: override the 8-GPU #SBATCH defaults on the command line.
CPU_NODE = ("--gpus-per-node=0", "--ntasks-per-node=2")

pytestmark = pytest.mark.slurm


def _env(cluster, **extra: str) -> dict[str, str]:
    env = dict(cluster.env)
    # OMP_NUM_THREADS=1: the virtual nodes share 2 cores.
    env.update(GPUS_PER_NODE="2", VENV=sys.prefix, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PROLONG_DIR"):
        env.pop(key, None)
    env.update(extra)
    return env


def sbatch(cluster, cwd: Path, script: str, *args: str, wait: bool = False, sbatch_args=CPU_NODE,
           env: dict | None = None, timeout: float = 300, script_path: Path | None = None):
    """Submit; with ``wait`` returns the finished CompletedProcess (sbatch --wait), else the job id."""
    cmd = [shutil.which("sbatch") or "sbatch", "--parsable", *(["--wait"] if wait else []), *sbatch_args,
           str(script_path or REPO / "slurm" / script), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env or _env(cluster), capture_output=True, text=True,
                          timeout=timeout)
    if not wait:
        assert proc.returncode == 0, proc.stderr
        return int(proc.stdout.strip().split(";")[0])
    return proc


def run_job(cluster, cwd: Path, script: str, *args: str, **kw) -> tuple[int, int]:
    """Submit and poll scontrol (quicker than sbatch --wait for short jobs): (job id, exit code)."""
    job = sbatch(cluster, cwd, script, *args, **kw)
    info = cluster.wait_job(job, timeout=240, poll=0.3)
    return job, int(info["ExitCode"].split(":")[0])


def job_id_of(proc) -> int:
    return int(proc.stdout.strip().splitlines()[0].split(";")[0])


def metrics(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out[int(rec["step"])] = rec["loss"]
    return out


def explain(cluster, job_id, *files: Path) -> str:
    parts = [f"scontrol: {cluster.job(job_id)}"]
    for f in files:
        if f.exists():
            parts.append(f"--- {f}\n{f.read_text()[-6000:]}")
    parts.append(cluster.logs())
    return "\n".join(parts)


@pytest.fixture(scope="module")
def reference(slurm_cluster, tmp_path_factory):
    """The uninterrupted run: sbatch --wait slurm/cpt.sh with the tiny overrides."""
    cwd = tmp_path_factory.mktemp("reference")
    run_dir = cwd / "run"
    start = time.monotonic()
    proc = sbatch(slurm_cluster, cwd, "cpt.sh", f"run.dir={run_dir}", *TINY, wait=True)
    return {"proc": proc, "cwd": cwd, "dir": run_dir, "job": job_id_of(proc), "seconds": time.monotonic() - start}


def test_cpt_trains_with_two_processes(slurm_cluster, reference):
    job, run_dir, cwd = reference["job"], reference["dir"], reference["cwd"]
    out = cwd / f"prolong-cpt-{job}.out"
    log = run_dir / "logs" / f"prolong-cpt-{job}.log"
    assert reference["proc"].returncode == 0, explain(slurm_cluster, job, out)
    info = slurm_cluster.job(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    assert sorted(metrics(run_dir)) == list(range(1, 13))
    assert (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "12"
    assert (run_dir / "config.yaml").exists()
    text = log.read_text()
    assert "launching 2 processes (1 node(s) x 2" in text
    assert "0: step     12/12" in text and "finished (exit 0)" in text
    assert "dp=2" in text  # two data-parallel ranks: both tasks joined one process group
    # The job's own output file holds the same lines; the per-job TMPDIR is gone.
    assert "finished (exit 0)" in out.read_text()
    cluster_name = slurm_cluster.conf.read_text().split("ClusterName=")[1].split()[0]
    assert not list(Path("/tmp").glob(f"prolong-{cluster_name}-{job}.*"))


@pytest.mark.parametrize("nodes,per_node", [(1, 2), (2, 1)], ids=["1node-x2", "2nodes-x1"])
def test_usr1_checkpoints_requeues_and_resumes(slurm_cluster, reference, tmp_path, nodes, per_node):
    """Single node: the script signals the tasks itself; two nodes: through a step on each node."""
    run_dir = tmp_path / "run"
    # Polled with scontrol rather than sbatch --wait, whose polling interval grows to 32 s (sbatch
    # --wait did return only after the requeued job finished, with 0, when this test used it).
    job = sbatch(slurm_cluster, tmp_path, "cpt.sh", f"run.dir={run_dir}", *TINY,
                 sbatch_args=(f"--nodes={nodes}", "--gpus-per-node=0", f"--ntasks-per-node={per_node}"),
                 env=_env(slurm_cluster, GPUS_PER_NODE=str(per_node)))
    out = tmp_path / f"prolong-cpt-{job}.out"
    log = run_dir / "logs" / f"prolong-cpt-{job}.log"
    deadline = time.monotonic() + 240
    # After the first checkpoint (step 4): Megatron's checkpoint-writer helper processes exist
    # then, and the signal must reach the training processes without killing them.
    while len(metrics(run_dir)) < 5:
        assert time.monotonic() < deadline, explain(slurm_cluster, job, out)
        assert slurm_cluster.job(job)["JobState"] in {"PENDING", "CONFIGURING", "RUNNING"}, \
            explain(slurm_cluster, job, out)
        time.sleep(0.2)
    slurm_cluster.cmd("scancel", "--signal=USR1", "--batch", str(job))
    info = slurm_cluster.wait_job(job, timeout=300, poll=0.3)
    context = explain(slurm_cluster, job, out)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", context
    text = log.read_text()
    assert f"launching 2 processes ({nodes} node(s) x {per_node}" in text, context
    assert "got SIGUSR1" in text, context
    stopped = int(text.split("SIGUSR1: checkpointed at step ")[1].split(";")[0])
    assert 5 <= stopped < 12, context
    assert f"exit 75: checkpointed; requeueing job {job}" in text, context
    assert "restart 1 on" in text and f"resumed from {run_dir}/checkpoints/iter_{stopped:07d} at step {stopped}" in text
    assert "finished (exit 0)" in text
    # Same per-step losses as the uninterrupted run, before and after the requeue.
    got, want = metrics(run_dir), metrics(reference["dir"])
    assert sorted(got) == list(range(1, 13)), got
    for step in range(1, 13):
        assert got[step] == pytest.approx(want[step], rel=1e-6), (step, got[step], want[step])


@pytest.mark.parametrize("script", ["cpt.sh", "sft.sh"])
def test_unknown_key_fails_before_launch(slurm_cluster, tmp_path, script):
    # No run.dir on the command line: the script asks Hydra for it, and Hydra refuses the key.
    start = time.monotonic()
    job = sbatch(slurm_cluster, tmp_path, script, "train.stepz=3")
    info = slurm_cluster.wait_job(job, timeout=120, poll=0.3)
    out = tmp_path / f"prolong-{script[:-3]}-{job}.out"
    context = explain(slurm_cluster, job, out)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "1:0", context
    text = out.read_text()
    assert "Key 'stepz' not in 'TrainConfig'" in text and "nothing was launched" in text, context
    assert "launching" not in text
    assert time.monotonic() - start < 90


def test_invalid_config_fails_fast_with_exit_2(slurm_cluster, tmp_path):
    # Composes, but is invalid for 2 processes: the trainer says so on every rank and exits 2.
    # run.dir comes from Hydra (run.name), relative to the submit folder.
    job, rc = run_job(slurm_cluster, tmp_path, "cpt.sh", "run.name=badtp", "parallel.tp=3", *TINY)
    log = tmp_path / "outputs" / "badtp" / "logs" / f"prolong-cpt-{job}.log"
    context = explain(slurm_cluster, job, tmp_path / f"prolong-cpt-{job}.out", log)
    assert rc == 2, context
    text = log.read_text()
    assert "megatron-prolong: invalid configuration: parallel.tp" in text, context
    assert "training failed (exit 2)" in text and "requeue" not in text
    assert not (tmp_path / "outputs" / "badtp" / "checkpoints").exists()


@pytest.fixture
def stub_repo(tmp_path):
    """A copy of slurm/ next to stub tools that print the arguments they were given."""
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "slurm", repo / "slurm")
    (repo / "tools").mkdir()
    # 'step': the step's name as Slurm records it (srun --job-name inside a job names the step).
    stub = ("import json, os, subprocess, sys\n"
            "step = f\"{os.environ.get('SLURM_JOB_ID')}.{os.environ.get('SLURM_STEP_ID')}\"\n"
            "info = subprocess.run(['scontrol', '-o', 'show', 'step', step], capture_output=True, text=True).stdout\n"
            "name = info.split(' Name=')[1].split()[0] if ' Name=' in info else None\n"
            "print('ARGV ' + json.dumps({'rank': os.environ.get('SLURM_PROCID'), 'tool': os.path.basename(sys.argv[0]),"
            " 'argv': sys.argv[1:], 'master': os.environ.get('MASTER_ADDR'), 'tmpdir': os.environ.get('TMPDIR'),"
            " 'node': os.environ.get('SLURMD_NODENAME'), 'step': name}), flush=True)\n"
            "sys.exit(int(os.environ.get('STUB_EXIT', '0')))\n")
    for tool in ("convert_checkpoint.py", "eval_long.py"):
        (repo / "tools" / tool).write_text(stub)
    return repo


def _argv_lines(text: str, keys=("rank", "tool", "argv", "master")) -> list[dict]:
    lines = [json.loads(line.split("ARGV ", 1)[1]) for line in text.splitlines() if "ARGV " in line]
    return [{k: r[k] for k in keys} for r in lines]


ODD_ARGS = ("score", "--input", "a file with spaces.jsonl", "--flag=$HOME", "*", "it's", "")


def test_convert_and_eval_pass_arguments_unchanged(slurm_cluster, stub_repo, tmp_path):
    # The scripts find their checkout from the path given to sbatch (Slurm runs a spool copy).
    env = _env(slurm_cluster, STUB_EXIT="3")
    job, rc = run_job(slurm_cluster, tmp_path, "convert.sh", *ODD_ARGS, env=env,
                      sbatch_args=("--cpus-per-task=1",), script_path=stub_repo / "slurm" / "convert.sh")
    text = (tmp_path / f"prolong-convert-{job}.out").read_text()
    assert rc == 3, text  # the tool's exit code is the job's
    assert _argv_lines(text) == [{"rank": "0", "tool": "convert_checkpoint.py", "argv": list(ODD_ARGS),
                                  "master": "127.0.0.1"}], text

    job, rc = run_job(slurm_cluster, tmp_path, "eval.sh", *ODD_ARGS, env=_env(slurm_cluster),
                      sbatch_args=(*CPU_NODE, "--cpus-per-task=1"), script_path=stub_repo / "slurm" / "eval.sh")
    text = (tmp_path / f"prolong-eval-{job}.out").read_text()
    assert rc == 0, text
    lines = sorted(_argv_lines(text), key=lambda r: r["rank"])
    assert [r["rank"] for r in lines] == ["0", "1"], text  # GPUS_PER_NODE=2 processes
    assert all(r["argv"] == list(ODD_ARGS) and r["tool"] == "eval_long.py" for r in lines), text


def test_scratch_and_extra_args(slurm_cluster, stub_repo, tmp_path):
    """PROLONG_TMPDIR=<a user's scratch>: each node's task gets a new folder inside it, and only that
    folder goes at the end; SRUN_EXTRA_ARGS reaches srun unglobbed although a file in the submit
    folder matches each pattern (globbed, the step would be named after that file)."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "keep.txt").write_text("mine")
    nodes = f"{slurm_cluster.host}-[1-2]"
    (tmp_path / f"--nodelist={slurm_cluster.host}-1").write_text("")
    (tmp_path / "--job-name=step-globbed").write_text("")
    env = _env(slurm_cluster, GPUS_PER_NODE="1", PROLONG_TMPDIR=str(scratch),
               SRUN_EXTRA_ARGS=f"--nodelist={nodes}  --job-name=step-*")
    job, rc = run_job(slurm_cluster, tmp_path, "eval.sh", "x", env=env,
                      sbatch_args=("--nodes=2", "--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=1"),
                      script_path=stub_repo / "slurm" / "eval.sh")
    text = (tmp_path / f"prolong-eval-{job}.out").read_text()
    assert rc == 0, explain(slurm_cluster, job)
    lines = _argv_lines(text, keys=("rank", "tmpdir", "node", "step"))
    assert sorted(r["node"] for r in lines) == [f"{slurm_cluster.host}-1", f"{slurm_cluster.host}-2"], text
    assert [r["step"] for r in lines] == ["step-*", "step-*"], text
    tmpdirs = {Path(r["tmpdir"]) for r in lines}
    assert len(tmpdirs) == 1, text  # the same path on every node
    own = tmpdirs.pop()
    assert own.parent == scratch and own.name.startswith("prolong-"), own
    assert sorted(p.name for p in scratch.iterdir()) == ["keep.txt"], text
    assert (scratch / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("tool,script", [("convert_checkpoint.py", "convert.sh"), ("eval_long.py", "eval.sh")])
def test_real_tool_help_through_script(slurm_cluster, tmp_path, tool, script):
    job, rc = run_job(slurm_cluster, tmp_path, script, "--help", env=_env(slurm_cluster, GPUS_PER_NODE="1"),
                      sbatch_args=("--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=1"))
    text = (tmp_path / f"prolong-{script[:-3]}-{job}.out").read_text()
    assert rc == 0, text
    assert "usage:" in text.lower(), text


@pytest.mark.parametrize("script", ["cpt.sh", "sft.sh", "convert.sh", "eval.sh"])
def test_help_prints_usage_anywhere(tmp_path, script):
    """What the script does, the environment it reads, how arguments pass through, the pre-flight check."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(REPO / "slurm" / script), "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    text = proc.stdout
    assert "Usage: sbatch" in text and f"slurm/{script}" in text and "#SBATCH --" not in text, text
    assert "VENV" in text and "CONTAINER_IMAGE" in text, text  # the environment it reads
    if script in ("cpt.sh", "sft.sh"):
        assert "python -m megatron_prolong.train <overrides> --cfg job" in text, text
        assert "--dry-run (or PROLONG_DRY_RUN=1)" in text and "goes to python -m megatron_prolong.train unchanged" in text
    else:
        tool = {"convert.sh": "tools/convert_checkpoint.py", "eval.sh": "tools/eval_long.py"}[script]
        assert f"The arguments go to python {tool} unchanged; its own options: python {tool} --help" in text


@pytest.mark.parametrize("how", ["flag", "env"])
def test_dry_run_prints_config_memory_and_srun_line_then_exits(slurm_cluster, tmp_path, how):
    run_dir = tmp_path / "run"
    args = ("--dry-run",) if how == "flag" else ()
    env = _env(slurm_cluster, **({"PROLONG_DRY_RUN": "1"} if how == "env" else {}))
    job, rc = run_job(slurm_cluster, tmp_path, "cpt.sh", *args, f"run.dir={run_dir}", *TINY, env=env)
    out = tmp_path / f"prolong-cpt-{job}.out"
    context = explain(slurm_cluster, job, out)
    assert rc == 0, context
    text = out.read_text()
    assert "seq_length: 256" in text and f"dir: {run_dir}" in text, context  # the resolved configuration
    assert "dry run at 2 processes: configuration valid; memory estimate tp=1 pp=1 cp=1 dp=2" in text, context
    assert "dry run, not launched: srun --nodes=1 --ntasks=2" in text and "megatron_prolong.train" in text, context
    assert "--dry-run" not in text.split("dry run, not launched:")[1], context  # not passed to Hydra
    assert not run_dir.exists() and "step " not in text, context  # nothing started


def test_scripts_refuse_to_run_outside_slurm(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for script in ("cpt.sh", "sft.sh", "convert.sh", "eval.sh"):
        proc = subprocess.run(["bash", str(REPO / "slurm" / script), "x=1"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 64 and "not inside a Slurm job" in proc.stderr, (script, proc.stderr)


def test_shellcheck_clean():
    assert {p.name for p in SCRIPTS} >= {"cpt.sh", "sft.sh", "convert.sh", "eval.sh", "common.sh"}
    for script in SCRIPTS:
        subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed: run .ci/slurm_setup.sh")
    proc = subprocess.run(["shellcheck", "-x", *(str(p.relative_to(REPO)) for p in SCRIPTS)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
