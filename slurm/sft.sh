#!/usr/bin/env bash
# Supervised fine-tuning (ProLong's short-instruction SFT stage) on Megatron-Core, one process per GPU.
#
#   sbatch -N 1 slurm/sft.sh experiment=prolong_sft data.root=/data \
#       checkpoint.load=/ckpt/stage2 run.dir=/ckpt/sft
#
# Same launcher as slurm/cpt.sh (see its header for the environment, NCCL/CUDA knobs, logs and
# preemption): everything after the script name goes to Hydra unchanged; at the
# --signal=B:USR1@<s> warning (or `scancel --signal=USR1 --batch <job>`) training checkpoints,
# exits 75 and the job requeues itself and resumes. The job's exit code is the training's.
#
# Environment (optional): GPUS_PER_NODE, VENV, CONTAINER_IMAGE, CONTAINER_MOUNTS, CPUS_PER_TASK,
# MASTER_ADDR, MASTER_PORT, SRUN_EXTRA_ARGS, PROLONG_TMPDIR, PROLONG_REQUEUE, PROLONG_MAX_RESTARTS;
# NCCL/CUDA defaults (only when unset): CUDA_DEVICE_MAX_CONNECTIONS=1,
# TORCH_NCCL_AVOID_RECORD_STREAMS=1, PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True,
# NCCL_DEBUG=WARN, OMP_NUM_THREADS=<CPUs per process>. Details: docs/slurm.md.
#
#SBATCH --job-name=prolong-sft
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
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
    echo "sft.sh: cannot find the megatron-prolong checkout (set PROLONG_DIR)" >&2
    exit 64
fi
export PROLONG_DIR
# shellcheck source=slurm/common.sh
source "$PROLONG_DIR/slurm/common.sh"

prolong_train_job sft "$@"
