#!/usr/bin/env bash
# Checkpoint conversion on one node, one process: python tools/convert_checkpoint.py "$@".
#
#   sbatch slurm/convert.sh hf-to-mcore --input /models/Llama-3-8B-Instruct --output /ckpt/llama3-8b \
#       --rope-base 8e6 --seq-length 65536
#   sbatch slurm/convert.sh mcore-to-hf --input /ckpt/sft --output /models/prolong-8b
#
# Arguments go to the tool unchanged; the job's exit code is the tool's. Log: %x-%j.out in the
# submit folder. Environment (optional): VENV, CONTAINER_IMAGE, CONTAINER_MOUNTS, CPUS_PER_TASK,
# PROLONG_TMPDIR, PROLONG_DIR. Details: docs/slurm.md.
#
#SBATCH --job-name=prolong-convert
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=0
#SBATCH --time=02:00:00
#SBATCH --output=%x-%j.out

set -uo pipefail

# The repo: PROLONG_DIR, else this file's folder (run in place), else the path sbatch was given
# (Slurm runs a copy of the script from its spool folder), else the submit folder.
if [[ -z "${PROLONG_DIR:-}" ]]; then
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    if [[ -f "$here/common.sh" ]]; then
        PROLONG_DIR=$(dirname "$here")
    else
        # scontrol prints "Command=<script> <arguments>".
        submitted=$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | sed -n 's/^ *Command=//p' | head -n 1)
        [[ $# -gt 0 && "$submitted" == *" $*" ]] && submitted=${submitted% "$*"}
        [[ -f "$submitted" ]] || submitted=${submitted%% *}
        if [[ -n "$submitted" && -f "$(dirname "$submitted")/common.sh" ]]; then
            PROLONG_DIR=$(cd "$(dirname "$submitted")/.." && pwd)
        else
            PROLONG_DIR=${SLURM_SUBMIT_DIR:-$PWD}
        fi
    fi
fi
if [[ ! -f "$PROLONG_DIR/slurm/common.sh" ]]; then
    echo "convert.sh: cannot find the megatron-prolong checkout (set PROLONG_DIR)" >&2
    exit 64
fi
export PROLONG_DIR
# shellcheck source=slurm/common.sh
source "$PROLONG_DIR/slurm/common.sh"

prolong_tool_job convert 1 tools/convert_checkpoint.py "$@"
