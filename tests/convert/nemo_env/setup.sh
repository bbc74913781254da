#!/usr/bin/env bash
# Creates the NeMo test environment (default .venv-nemo in the repository root) when it is missing
# or older than requirements.in / constraints.txt. It is used only by tests/convert/test_nemo.py,
# which runs NeMo in a subprocess with this environment's python; it is never mixed into the
# project's .venv (NeMo 2.5 needs megatron-core 0.14, the project 0.19.2). Concurrent calls (the
# test session starts one in the background, the NeMo tests call it again) build once: each waits
# for the lock, and one that finds the environment built meanwhile does nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
venv=${NEMO_VENV:-$root/.venv-nemo}
stamp=$venv/.installed
built() { [[ -f $stamp && $stamp -nt $here/constraints.txt && $stamp -nt $here/requirements.in ]]; }
if built; then exit 0; fi
mkdir -p "$(dirname "$venv")"
exec {lock}>"$venv.lock"
flock "$lock"
if built; then exit 0; fi
# NeMo 2.5.3 supports Python 3.10-3.12; 3.11 is the one with a CPU torch 2.13 wheel on this machine.
py=${NEMO_PYTHON:-$(command -v python3.11 || command -v python3.12 || true)}
if [[ -z $py ]]; then echo "setup.sh: no python3.11 or python3.12 for the NeMo test environment (set NEMO_PYTHON)" >&2; exit 1; fi
start=$(date +%s)
rm -rf "$venv"
"$py" -m venv "$venv"
# Wheels only, except two pure-Python packages PyPI has only as source (wget, antlr4-python3-runtime).
# --no-compile: byte-compiling all 2.6 GB took half the build's CPU time; the tests import a small
# part of it, compiled when imported.
"$venv/bin/pip" install --quiet --no-compile --only-binary :all: --no-binary wget,antlr4-python3-runtime \
    -c "$here/constraints.txt" -r "$here/requirements.in"
echo "NeMo test environment: $venv ($(( $(date +%s) - start )) s)" >&2
touch "$stamp"
