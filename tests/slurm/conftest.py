"""Fixtures for the Slurm launch tests: one private Slurm cluster for the whole session.

Two virtual nodes (two slurmd on this host) so that multi-node launches are tested too.
The tests need Debian's Slurm (slurmctld, slurmd, slurm-client) and munge, installed by
.ci/slurm_setup.sh; without them they are skipped with that reason (CI installs them, so there
they run). The cluster is started here and stopped (jobs cancelled, daemons stopped by pid) when
the session ends. Deselect with ``-m "not slurm"``.
"""

from __future__ import annotations

import os

import pytest
from slurm_cluster import SlurmCluster, missing_binaries


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: runs jobs on a private Slurm cluster (needs .ci/slurm_setup.sh)")


@pytest.fixture(scope="session")
def slurm_cluster():
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm/munge binaries not installed ({', '.join(missing)}): run .ci/slurm_setup.sh")
    if os.getuid() != 0:
        pytest.skip("slurmd must run as root to start jobs: run the Slurm tests as root (CI does)")
    cluster = SlurmCluster(nodes=2).start()  # two virtual nodes on this host, for multi-node launches
    try:
        yield cluster
    finally:
        cluster.stop()
