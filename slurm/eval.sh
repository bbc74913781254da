#!/usr/bin/env bash
# Long-context evaluation: python tools/eval_long.py "$@", one process per GPU on one node.
#
#   sbatch slurm/eval.sh score --checkpoint /ckpt/stage1 --input docs.jsonl --output scores.jsonl
#   sbatch --ntasks-per-node=8 --gpus-per-node=8 slurm/eval.sh ...   # TP/CP over 8 GPUs
#
# Arguments go to the tool unchanged; the job's exit code is the tool's. Log: %x-%j.out in the
# submit folder. Processes: GPUS_PER_NODE (default: --ntasks-per-node, 1 here). Environment
# (optional): VENV, CONTAINER_IMAGE, CONTAINER_MOUNTS, CPUS_PER_TASK, MASTER_ADDR, MASTER_PORT,
# SRUN_EXTRA_ARGS, PROLONG_TMPDIR, PROLONG_DIR; NCCL/CUDA defaults as in slurm/cpt.sh.
# Details: docs/slurm.md.
#
#SBATCH --job-name=prolong-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
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
    echo "eval.sh: cannot find the megatron-prolong checkout (set PROLONG_DIR)" >&2
    exit 64
fi
export PROLONG_DIR
# shellcheck source=slurm/common.sh
source "$PROLONG_DIR/slurm/common.sh"

prolong_tool_job eval "" tools/eval_long.py "$@"
