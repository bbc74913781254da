"""A private single-node Slurm cluster (Debian's Slurm 22.05 packages) for the launch tests.

Everything lives in one temporary folder: its own munge key and munged socket, its own
slurm.conf (free ports, cluster name), state, spool, logs and pid files, so it touches no
system-wide Slurm or munge and several can run side by side. No systemd, no cgroups:
proctrack/linuxproc, task/none. ``stop()`` cancels every job, waits for the job processes to
end, then stops slurmd, slurmctld and munged by the pids they wrote.

Run by hand to get a cluster to play with: ``python tests/slurm/slurm_cluster.py [NODES]``
(Ctrl-C stops it).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "squeue")
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in SBIN:
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if which(b) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not alive for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class SlurmCluster:
    """Nodes on this host (NodeAddr 127.0.0.1), one partition ``test``.

    ``nodes=1``: one node named after the host. ``nodes=N``: N virtual nodes ``<host>-1`` ..
    ``<host>-N``, one slurmd each on its own port (Slurm's multiple-slurmd mode), each with all
    of this host's CPUs, so multi-node launches can be tested on one machine.
    """

    def __init__(self, root: Path | None = None, nodes: int = 1) -> None:
        self.num_nodes = nodes
        self.nodes: list[str] = []
        self._owns_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="prolong-slurm-"))
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.pids: dict[str, Path] = {
            "slurmctld": self.root / "slurmctld.pid",
            "munged": self.root / "munge" / "munged.pid",
        }
        self.started: list[str] = []
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        # Client commands must not pick up an outer job's settings.
        for key in list(self.env):
            if key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and key != "SLURM_CONF":
                del self.env[key]

    # -- start ---------------------------------------------------------------------------------
    def start(self) -> "SlurmCluster":
        try:
            self._start_munge()
            self._write_conf()
            self._start_daemon("slurmctld", [which("slurmctld"), "-f", str(self.conf)])
            for node in self.nodes:
                self._start_daemon(f"slurmd:{node}", [which("slurmd"), "-f", str(self.conf), "-N", node])
            self._wait_nodes_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        mdir = self.munge_socket.parent
        self.root.chmod(0o755)  # mkdtemp makes it 0700; munged (another user) must reach its folder
        mdir.mkdir(parents=True)
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        cmd = [which("munged"), f"--socket={self.munge_socket}", f"--key-file={key}",
               f"--pid-file={self.pids['munged']}", f"--log-file={mdir / 'munged.log'}",
               f"--seed-file={mdir / 'munged.seed'}"]
        if os.getuid() == 0:
            # munged will not run as root: hand its folder to the munge user and drop to it.
            try:
                munge = pwd.getpwnam("munge")
            except KeyError:
                munge = None
            if munge is not None:
                mdir.chmod(0o755)
                for p in (mdir, key):
                    os.chown(p, munge.pw_uid, munge.pw_gid)
                cmd = ["setpriv", f"--reuid={munge.pw_uid}", f"--regid={munge.pw_gid}", "--clear-groups", *cmd]
        self._run_daemon("munged", cmd)
        self._wait(lambda: self.munge_socket.exists(), "munged socket", self.root / "munge" / "munged.log")

    def _write_conf(self) -> None:
        self.host = socket.gethostname().split(".")[0]
        probe = subprocess.run([which("slurmd"), "-C"], capture_output=True, text=True, check=True)
        hw = probe.stdout.splitlines()[0].split(None, 1)[1]  # CPUs=... RealMemory=... (after NodeName=)
        self.cpus = int(hw.split("CPUs=")[1].split()[0])
        if self.num_nodes == 1:
            self.nodes = [self.host]
            node_lines = f"NodeName={self.host} {hw} NodeAddr=127.0.0.1 State=UNKNOWN"
        else:
            self.nodes = [f"{self.host}-{i}" for i in range(1, self.num_nodes + 1)]
            node_lines = "\n".join(
                f"NodeName={n} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={_free_port()} {hw} State=UNKNOWN"
                for n in self.nodes)
        for node in self.nodes:
            self.pids[f"slurmd:{node}"] = self.root / f"slurmd-{node}.pid"
        user = pwd.getpwuid(os.getuid()).pw_name
        for d in ("state", "spool", "logs"):
            (self.root / d).mkdir()
        self.conf.write_text(f"""\
ClusterName=prolongtest{os.getpid()}
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={self.root / 'state'}
SlurmdSpoolDir={self.root / 'spool' / '%n'}
SlurmctldPidFile={self.pids['slurmctld']}
SlurmdPidFile={self.root / 'slurmd-%n.pid'}
SlurmctldLogFile={self.root / 'logs' / 'slurmctld.log'}
SlurmdLogFile={self.root / 'logs' / 'slurmd-%n.log'}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
EnforcePartLimits=ALL
KillWait=10
MinJobAge=600
JobRequeue=1
{node_lines}
PartitionName=test Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
""")

    def _run_daemon(self, name: str, cmd: list[str]) -> None:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed to start ({proc.returncode}): {proc.stdout}{proc.stderr}")
        self.started.append(name)

    def _start_daemon(self, name: str, cmd: list[str]) -> None:
        self._run_daemon(name, cmd)  # both daemonise and write their pid file
        log = self.root / "logs" / f"{name.replace(':', '-')}.log"
        self._wait(lambda: self.pids[name].exists() and self.pids[name].read_text().strip(), f"{name} pid file", log)

    def _wait_nodes_idle(self, timeout: float = 60) -> None:
        def ready() -> bool:
            out = self.cmd("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split()
            states = dict(zip(out[::2], out[1::2]))
            return all(states.get(n) == "idle" for n in self.nodes)
        self._wait(ready, f"nodes {self.nodes} idle", self.root / "logs" / "slurmctld.log", timeout)

    def _wait(self, cond, what: str, log: Path | None = None, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.1)
        tail = log.read_text()[-3000:] if log and log.exists() else ""
        raise RuntimeError(f"timed out waiting for {what}\n{tail}")

    # -- use -------------------------------------------------------------------------------------
    def cmd(self, *args: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run([which(args[0]), *args[1:]], env=kw.pop("env", self.env), capture_output=True,
                              text=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def scontrol(self, *args: str, check: bool = True) -> str:
        return self.cmd("scontrol", *args, check=check).stdout

    def job(self, job_id: int | str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, StdOut, ...)."""
        out = self.scontrol("show", "job", "-o", str(job_id))
        fields: dict[str, str] = {}
        for tok in out.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                fields.setdefault(k, v)
        return fields

    def wait_job(self, job_id: int | str, timeout: float = 300, poll: float = 0.5) -> dict[str, str]:
        """Wait until the job has finished for good (not pending, running or requeued)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                        "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout} s")
            time.sleep(poll)

    # -- stop ------------------------------------------------------------------------------------
    def _job_pids(self) -> list[int]:
        if not any(n.startswith("slurmd") for n in self.started):
            return []
        pids = []
        for node in self.nodes:
            env = dict(self.env, SLURMD_NODENAME=node)  # which slurmd to ask (multiple-slurmd)
            proc = self.cmd("scontrol", "listpids", check=False, timeout=20, env=env)
            for line in proc.stdout.splitlines()[1:]:
                tok = line.split()
                if tok and tok[0].isdigit():
                    pids.append(int(tok[0]))
        return pids

    def stop(self) -> None:
        """Cancel all jobs, wait for their processes, stop the daemons by pid. Never raises."""
        if "slurmctld" in self.started:
            try:
                self.cmd("scancel", "--full", "--partition=test", "--state=PENDING", check=False, timeout=20)
                self.cmd("scancel", "--partition=test", check=False, timeout=20)
                deadline = time.monotonic() + 40
                while time.monotonic() < deadline:
                    squeue = self.cmd("squeue", "-h", "-o", "%i %T", check=False, timeout=20).stdout.strip()
                    if not squeue and not self._job_pids():
                        break
                    time.sleep(0.5)
            except Exception:  # noqa: BLE001 - teardown keeps going
                pass
        # Job processes slurmd still tracks (should be none): kill them by pid.
        try:
            for pid in self._job_pids():
                if _pid_alive(pid):
                    os.kill(pid, signal.SIGKILL)
        except Exception:  # noqa: BLE001
            pass
        for name in [n for n in self.started if n.startswith("slurmd:")] + ["slurmctld", "munged"]:
            if name not in self.started:
                continue
            path = self.pids[name]
            try:
                pid = int(path.read_text().strip())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 15
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.started.clear()
        if self._owns_root and not os.environ.get("PROLONG_SLURM_KEEP"):
            shutil.rmtree(self.root, ignore_errors=True)

    def logs(self) -> str:
        parts = []
        for p in sorted((self.root / "logs").glob("*.log")):
            parts.append(f"--- {p.name} (tail)\n{p.read_text()[-4000:]}")
        return "\n".join(parts)


if __name__ == "__main__":
    cluster = SlurmCluster(nodes=int(sys.argv[1]) if len(sys.argv) > 1 else 1).start()
    print(f"export SLURM_CONF={cluster.conf}", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        cluster.stop()
