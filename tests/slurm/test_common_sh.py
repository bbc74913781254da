"""slurm/common.sh's functions run directly in bash, with srun and scontrol replaced by shell
functions that record their arguments (no Slurm needed): the scratch folder and SRUN_EXTRA_ARGS.
The same two behaviours on a real Slurm: tests/slurm/test_slurm_launch.py::test_scratch_and_extra_args."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# srun runs its command line after the options (what a task does); scontrol knows one node.
HARNESS = r"""
set -uo pipefail
srun() {
    local args=() a
    for a in "$@"; do args+=("$a"); done
    printf 'SRUN %s\n' "$(printf '%s\0' "${args[@]}" | base64 -w0)"
    while [[ $# -gt 0 && $1 == -* ]]; do shift; done
    "$@"
}
scontrol() { [[ $1 == show && $2 == hostnames ]] && echo node1; true; }
source "$PROLONG_DIR/slurm/common.sh"
prolong_init test
prolong_srun_all bash -c 'echo "TASK_TMPDIR $TMPDIR"; touch "$TMPDIR/task-file"'
prolong_cleanup
echo "RC $PROLONG_RC"
"""


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    base = {"PATH": "/usr/bin:/bin", "PROLONG_DIR": str(REPO), "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "1",
            "SLURM_JOB_NODELIST": "node1", "GPUS_PER_NODE": "1", "PYTHON": "python3", "HOME": str(tmp_path)}
    return subprocess.run(["bash", "-c", HARNESS], cwd=tmp_path, env={**base, **env}, capture_output=True,
                          text=True, timeout=60)


def _srun_argv(out: str) -> list[str]:
    line = next(l for l in out.splitlines() if l.startswith("SRUN "))
    return base64.b64decode(line.split()[1]).decode().split("\0")[:-1]


def test_cleanup_removes_only_the_jobs_own_scratch_folder(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "results.tar").write_text("a user's file")
    proc = _run(tmp_path, PROLONG_TMPDIR=str(scratch))
    assert "RC 0" in proc.stdout, proc.stdout + proc.stderr
    task_tmp = Path(proc.stdout.split("TASK_TMPDIR ")[1].split()[0])
    assert task_tmp.parent == scratch and task_tmp.name.startswith("prolong-slurm-4242."), task_tmp
    assert not task_tmp.exists()  # the job's folder (and the task's file in it) is gone ...
    assert (scratch / "results.tar").read_text() == "a user's file"  # ... PROLONG_TMPDIR and its files stay
    assert sorted(p.name for p in scratch.iterdir()) == ["results.tar"]


def test_scratch_defaults_to_tmpdir_and_unwritable_base_is_refused(tmp_path):
    (tmp_path / "t").mkdir()
    proc = _run(tmp_path, TMPDIR=str(tmp_path / "t"))
    assert "RC 0" in proc.stdout and Path(proc.stdout.split("TASK_TMPDIR ")[1].split()[0]).parent == tmp_path / "t"
    (tmp_path / "file").write_text("")
    proc = _run(tmp_path, PROLONG_TMPDIR=str(tmp_path / "file"))
    assert proc.returncode == 64 and "cannot create a scratch folder in PROLONG_TMPDIR=" in proc.stderr, proc.stderr


def test_srun_extra_args_are_split_but_never_globbed(tmp_path):
    # A file in the submit folder that the glob gpu[01-08] would match.
    (tmp_path / "--nodelist=gpu0").write_text("")
    (tmp_path / "somefile").write_text("")
    extra = "--nodelist=gpu[01-08]  --comment=*\t--exclusive"
    proc = _run(tmp_path, SRUN_EXTRA_ARGS=extra)
    assert "RC 0" in proc.stdout, proc.stdout + proc.stderr
    argv = _srun_argv(proc.stdout)
    i = argv.index("--nodelist=gpu[01-08]")
    assert argv[i:i + 3] == ["--nodelist=gpu[01-08]", "--comment=*", "--exclusive"], json.dumps(argv)
    assert argv[i + 3:i + 5] == ["bash", "-c"]  # then the task's command, unchanged
