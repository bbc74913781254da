#!/usr/bin/env bash
# Installs what the Slurm tests need (tests/slurm): Debian's Slurm (slurmctld, slurmd, client),
# munge and shellcheck. Idempotent: does nothing when everything is already there.
# Only installs: the test fixture starts its own private munged/slurmctld/slurmd and stops them.
set -euo pipefail
need=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge shellcheck:shellcheck; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || need+=("${pair#*:}")
done
if [ "${#need[@]}" -eq 0 ]; then
    echo "slurm_setup: slurmctld, slurmd, slurm-client, munge and shellcheck already installed"
    exit 0
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "slurm_setup: need root or sudo to install ${need[*]}" >&2; exit 1; }
    SUDO=(sudo)
fi
echo "slurm_setup: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}"
