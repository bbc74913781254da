#!/usr/bin/env bash
# Continued pre-training (ProLong stages: 64K, then 512K) on Megatron-Core, one process per GPU.
#
#   sbatch -N 8 slurm/cpt.sh experiment=prolong_64k data.root=/data/prolong-data-64K run.dir=/ckpt/stage1
#
# Everything after the script name goes to Hydra unchanged. Any #SBATCH line below can be
# overridden on the sbatch command line (-N, --time, --partition, --account, ...). Logs: the job's
# output file (%x-%j.out in the submit folder) and <run.dir>/logs/<job name>-<job id>.log.
# The exit code of the job is the training's. Details: docs/slurm.md.
#
# Preemption and time limits: at --signal=B:USR1@<s> (or `scancel --signal=USR1 --batch <job>`)
# the training processes checkpoint at the next step boundary and exit 75; this script then
# requeues the job, and the requeued job resumes from the latest checkpoint in run.dir (so does
# resubmitting the same command). USR1 goes to the training processes only (not to Megatron's
# helper processes), so prefer B: and --batch over signals Slurm sends to every process of a
# step. A plain `scancel` ends the job without requeue.
#
# Environment (all optional; defaults in slurm/common.sh):
#   GPUS_PER_NODE=8        processes per node (default: --ntasks-per-node). On nodes without
#                          GPUs the same processes run on CPU with gloo (e.g. GPUS_PER_NODE=2).
#   VENV=/path/to/venv     virtualenv (default: <repo>/.venv, else python3 on PATH)
#   CONTAINER_IMAGE=...    run inside this image with pyxis; CONTAINER_MOUNTS=/data:/data,...
#   CPUS_PER_TASK, MASTER_ADDR, MASTER_PORT, SRUN_EXTRA_ARGS, PROLONG_TMPDIR, PROLONG_REQUEUE,
#   PROLONG_MAX_RESTARTS, PROLONG_DIR (the repo checkout; found automatically)
#
# NCCL / CUDA knobs (set here only when unset in the environment):
#   CUDA_DEVICE_MAX_CONNECTIONS=1          Megatron's TP/SP communication overlap needs in-order
#                                          kernel launch
#   TORCH_NCCL_AVOID_RECORD_STREAMS=1      frees NCCL buffers sooner (lower peak memory)
#   PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True   less fragmentation at 64K-512K tokens
#   NCCL_DEBUG=WARN                        INFO to debug hangs and topology
#   OMP_NUM_THREADS=<CPUs per process>
# Often needed per cluster (not set here): NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME (which network
# interface; e.g. ^lo,docker), NCCL_IB_HCA, NCCL_IB_TIMEOUT, NCCL_NVLS_ENABLE=0 (NVLink SHARP
# off), TORCH_NCCL_ASYNC_ERROR_HANDLING (turn NCCL hangs into errors), NVTE_* (Transformer Engine).
#
#SBATCH --job-name=prolong-cpt
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
    echo "cpt.sh: cannot find the megatron-prolong checkout (set PROLONG_DIR)" >&2
    exit 64
fi
export PROLONG_DIR
# shellcheck source=slurm/common.sh
source "$PROLONG_DIR/slurm/common.sh"

prolong_train_job cpt "$@"
