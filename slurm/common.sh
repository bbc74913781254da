# shellcheck shell=bash
# Shared launcher for slurm/{cpt,sft,convert,eval}.sh; sourced, not run. See docs/slurm.md.
#
# Launch model: one srun task per GPU (or per CPU process on nodes without GPUs), on every node of
# the allocation. Each task is a plain Python process that reads its rank from Slurm
# (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID) and the rendezvous from MASTER_ADDR / MASTER_PORT,
# which are set here (first node of the allocation, a port derived from the job id). No torchrun:
# signals reach the training processes directly and their exit code (75 = checkpointed, requeue
# me) comes back through srun unchanged.
#
# Environment read here (all optional):
#   GPUS_PER_NODE      processes per node (default: the job's --ntasks-per-node, else 8)
#   CPUS_PER_TASK      CPUs per process (default: the node's CPUs / GPUS_PER_NODE)
#   VENV               virtualenv to run in (default: <repo>/.venv if present, else python3 on PATH)
#   CONTAINER_IMAGE    run the processes in this image with pyxis (srun --container-image)
#   CONTAINER_MOUNTS   pyxis --container-mounts (the repo is always added); mount data and run dirs
#   MASTER_ADDR / MASTER_PORT   rendezvous (default: first node's address, 10000 + job id % 20000)
#   PROLONG_TMPDIR     folder to make the job's scratch folder in (default: $TMPDIR, else /tmp): a new
#                      prolong-<cluster>-<job id>.XXXXXX inside it is exported as TMPDIR to the
#                      processes and removed on every node at the end (PROLONG_TMPDIR itself never)
#   PROLONG_CLEAN_SHM  1 (default): on exclusive nodes, remove leaked mosaicml-streaming shared
#                      memory (/dev/shm/NNNNNN_*) this job's user created after the job started
#   SRUN_EXTRA_ARGS    extra srun arguments for the training step, split at whitespace; no globbing
#                      and no quote processing (--nodelist=gpu[01-08] arrives as written)
#   TASK_EXIT_WAIT     seconds srun waits for the other tasks once one has exited (default 300)
#   PROLONG_RESIGNAL   seconds between repeats of a forwarded USR1 until the step ends (default 30)
#   PROLONG_REQUEUE    1 (default): requeue the job when training exits with 75 (checkpointed)
#   PROLONG_MAX_RESTARTS  stop requeueing after this many restarts (default: no limit)

PROLONG_REQUEUE_EXIT_CODE=75  # megatron_prolong.train.preemption.REQUEUE_EXIT_CODE
PROLONG_SRUN_PID=""
PROLONG_RESENDER_PID=""
PROLONG_SIGNALLED=0     # a signal arrived during the current wait
PROLONG_GOT_USR1=0      # a preemption / time-limit warning was forwarded
PROLONG_GOT_TERM=0      # Slurm is tearing the job down (scancel, preemption without requeue)
PROLONG_TEE_PID=""
PROLONG_STDOUT_FD=""
PROLONG_STDERR_FD=""

prolong_log() { printf '[%s %s] %s\n' "${PROLONG_JOB_KIND:-prolong}" "$(date '+%F %T')" "$*"; }

# ---- environment ---------------------------------------------------------------------------------
prolong_init() {
    PROLONG_JOB_KIND=$1
    if [[ -z "${SLURM_JOB_ID:-}" ]]; then
        echo "$PROLONG_JOB_KIND: not inside a Slurm job; submit with: sbatch slurm/$PROLONG_JOB_KIND.sh [overrides]" >&2
        exit 64
    fi
    PROLONG_JOB_START=$(date +%s)
    NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-8}}
    GPUS_PER_NODE=${GPUS_PER_NODE%%(*}  # "8(x2)" forms
    local node_cpus=${SLURM_CPUS_ON_NODE:-$(nproc)}
    CPUS_PER_TASK=${CPUS_PER_TASK:-$(( node_cpus / GPUS_PER_NODE > 0 ? node_cpus / GPUS_PER_NODE : 1 ))}
    export NNODES GPUS_PER_NODE CPUS_PER_TASK

    # Rendezvous: the first node's address as Slurm knows it (NodeAddr), a port from the job id.
    local first
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    if [[ -z "${MASTER_ADDR:-}" ]]; then
        MASTER_ADDR=$(scontrol show node "$first" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n 1)
        MASTER_ADDR=${MASTER_ADDR:-$first}
    fi
    MASTER_PORT=${MASTER_PORT:-$(( 10000 + (SLURM_JOB_ID + 101 * ${SLURM_RESTART_COUNT:-0}) % 20000 ))}
    export MASTER_ADDR MASTER_PORT

    # NCCL / CUDA defaults (each only if unset; documented at the top of cpt.sh).
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
    export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$CPUS_PER_TASK}
    export PYTHONUNBUFFERED=1

    # Per-job scratch: mosaicml-streaming, compile caches and friends write under TMPDIR. A new
    # folder of our own inside PROLONG_TMPDIR (a user's /scratch/$USER must survive the cleanup);
    # random, so a requeue or a leftover of an earlier job never shares it.
    local base=${PROLONG_TMPDIR:-${TMPDIR:-/tmp}}
    if ! mkdir -p "$base" || ! PROLONG_JOB_TMPDIR=$(mktemp -d "$base/prolong-${SLURM_CLUSTER_NAME:-slurm}-$SLURM_JOB_ID.XXXXXX"); then
        echo "$PROLONG_JOB_KIND: cannot create a scratch folder in PROLONG_TMPDIR=$base; set PROLONG_TMPDIR to a writable folder" >&2
        exit 64
    fi
    export TMPDIR=$PROLONG_JOB_TMPDIR

    # Python: container, virtualenv, or whatever python3 is on PATH.
    PROLONG_CONTAINER_ARGS=()
    if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
        local mounts="$PROLONG_DIR:$PROLONG_DIR"
        [[ -n "${CONTAINER_MOUNTS:-}" ]] && mounts="$CONTAINER_MOUNTS,$mounts"
        PROLONG_CONTAINER_ARGS=(--container-image="$CONTAINER_IMAGE" --container-mounts="$mounts"
            --container-workdir="$PWD" --container-name="prolong-$SLURM_JOB_ID")
        PROLONG_PYTHON=${PYTHON:-python}
        export PYTHONPATH="$PROLONG_DIR${PYTHONPATH:+:$PYTHONPATH}"
    else
        if [[ -z "${VENV:-}" && -x "$PROLONG_DIR/.venv/bin/python" ]]; then
            VENV=$PROLONG_DIR/.venv
        fi
        if [[ -n "${VENV:-}" ]]; then
            [[ -x "$VENV/bin/python" ]] || { echo "$PROLONG_JOB_KIND: VENV=$VENV has no bin/python" >&2; exit 64; }
            export VIRTUAL_ENV=$VENV PATH="$VENV/bin:$PATH"
            PROLONG_PYTHON=$VENV/bin/python
        else
            PROLONG_PYTHON=${PYTHON:-python3}
        fi
    fi

    trap 'prolong_on_signal USR1' USR1
    trap 'prolong_on_signal TERM' TERM
    trap 'prolong_on_signal INT' INT
}

# ---- signals -------------------------------------------------------------------------------------
# Bash runs a trap only between commands, so every long command runs as `cmd & wait`.
# USR1 (the --signal=B:USR1@<s> warning, or `scancel --signal=USR1 --batch`) and TERM are both
# forwarded as USR1 to every training process (prolong_forward_usr1): the trainer checkpoints at the next
# step boundary and exits 75. After a TERM the job is being ended by Slurm, so it is not requeued.
# The tasks start with USR1 ignored (a USR1 during imports and model building would otherwise
# kill them: Slurm may send the time-limit warning up to a minute early) until the trainer
# installs its handler; so the forwarded USR1 is repeated every PROLONG_RESIGNAL seconds until
# the step ends.
prolong_on_signal() {
    PROLONG_SIGNALLED=1
    case $1 in
        TERM|INT) PROLONG_GOT_TERM=1 ;;
        *) PROLONG_GOT_USR1=1 ;;
    esac
    if [[ -n "$PROLONG_SRUN_PID" ]] && kill -0 "$PROLONG_SRUN_PID" 2>/dev/null; then
        prolong_log "got SIG$1: asking the training processes to checkpoint and stop (USR1)"
        prolong_forward_usr1
        if [[ -z "$PROLONG_RESENDER_PID" ]]; then
            (
                trap '' USR1 USR2 INT HUP
                trap 'kill "$nap" 2>/dev/null; exit 0' TERM
                while :; do
                    sleep "${PROLONG_RESIGNAL:-30}" &
                    nap=$!
                    wait "$nap"
                    kill -0 "$PROLONG_SRUN_PID" 2>/dev/null || exit 0
                    prolong_forward_usr1
                done
            ) &
            PROLONG_RESENDER_PID=$!
        fi
    else
        prolong_log "got SIG$1 before the training processes started"
    fi
}

# USR1 to the main process of every task of the running step(s), on every node, and to nothing
# else: not through srun, which would signal every process of the step, including Megatron's
# checkpoint-writer helpers (spawned processes, default disposition: USR1 kills them, and the
# checkpoint that the signal asks for then fails). `scontrol listpids` marks a task's own process
# with its local id; its children have "-".
prolong_forward_usr1() {
    # shellcheck disable=SC2016  # expanded by the per-node bash
    local script='scontrol listpids "$1" 2>/dev/null | awk -v own="${SLURM_STEP_ID:-none}" '"'"'NR > 1 && $3 ~ /^[0-9]+$/ && $3 != own && $4 != "-" { print $1 }'"'"' | xargs -r kill -USR1 2>/dev/null; true'
    if (( NNODES > 1 )); then
        srun --overlap --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=0 \
            bash -c "$script" prolong-signal "$SLURM_JOB_ID" >/dev/null 2>&1 || true
    else
        bash -c "$script" prolong-signal "$SLURM_JOB_ID" || true
    fi
}

# Run a command in the background and wait for it, surviving signal interruptions of `wait`.
# Sets PROLONG_RC.
prolong_run_bg() {
    "$@" &
    PROLONG_SRUN_PID=$!
    while :; do
        PROLONG_SIGNALLED=0
        PROLONG_RC=0
        wait "$PROLONG_SRUN_PID" || PROLONG_RC=$?
        (( PROLONG_SIGNALLED )) || break
    done
    PROLONG_SRUN_PID=""
    if [[ -n "$PROLONG_RESENDER_PID" ]]; then
        kill "$PROLONG_RESENDER_PID" 2>/dev/null || true
        wait "$PROLONG_RESENDER_PID" 2>/dev/null || true
        PROLONG_RESENDER_PID=""
    fi
}

# ---- steps ---------------------------------------------------------------------------------------
# srun for one process on the first node (container when set), e.g. for a pre-flight check.
prolong_srun_one() {
    if [[ ${#PROLONG_CONTAINER_ARGS[@]} -gt 0 ]]; then
        srun --nodes=1 --ntasks=1 "${PROLONG_CONTAINER_ARGS[@]}" "$@"
    else
        "$@"
    fi
}

# The step: GPUS_PER_NODE tasks on each of NNODES nodes running "$@"; each creates TMPDIR first.
prolong_srun_all() {
    local ntasks=$(( NNODES * GPUS_PER_NODE ))
    local extra=()
    # Split at whitespace by read (which never globs: gpu[01-08] stays as written).
    [[ -n "${SRUN_EXTRA_ARGS:-}" ]] && read -r -a extra <<< "$SRUN_EXTRA_ARGS"
    prolong_log "launching $ntasks processes ($NNODES node(s) x $GPUS_PER_NODE, $CPUS_PER_TASK CPUs each)," \
        "rendezvous $MASTER_ADDR:$MASTER_PORT${CONTAINER_IMAGE:+, container $CONTAINER_IMAGE}"
    # USR1 is ignored until the trainer installs its handler (an ignored signal stays ignored
    # across exec; Python's signal.signal replaces it).
    # shellcheck disable=SC2016  # $TMPDIR and $@ expand in the task's bash
    local cmd=(srun --nodes="$NNODES" --ntasks="$ntasks" --ntasks-per-node="$GPUS_PER_NODE"
        --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=0 --wait="${TASK_EXIT_WAIT:-300}" --label
        "${PROLONG_CONTAINER_ARGS[@]}" "${extra[@]}"
        bash -c 'trap "" USR1; mkdir -p "$TMPDIR" && exec "$@"' prolong-task "$@")
    if [[ "${PROLONG_DRY_RUN:-0}" == 1 ]]; then
        prolong_log "dry run, not launched: $(printf '%q ' "${cmd[@]}")"
        PROLONG_RC=0
        return 0
    fi
    prolong_run_bg "${cmd[@]}"
}

# ---- --help and --dry-run ------------------------------------------------------------------------
# The calling script's header comment (its lines up to the #SBATCH block), then what all share.
prolong_usage() {
    local kind=$1 tool=${2:-}
    sed -n '2,/^#SBATCH/{/^#SBATCH/d;s/^# \{0,1\}//;p}' "$0"
    if [[ -n "$tool" ]]; then
        cat <<EOF
Usage: sbatch slurm/$kind.sh <arguments of $tool>   (bash slurm/$kind.sh --help: this text)
The arguments go to python $tool unchanged; its own options: python $tool --help.
EOF
        return
    fi
    cat <<EOF
Usage: sbatch [sbatch options] slurm/$kind.sh [--dry-run] [Hydra overrides]   (--help: this text)
Overrides: everything after the script name goes to python -m megatron_prolong.train unchanged
  (key=value, e.g. experiment=prolong_64k run.dir=/ckpt/stage1).
Check first, on any machine: python -m megatron_prolong.train <overrides> --cfg job
  prints the resolved configuration and starts nothing.
--dry-run (or PROLONG_DRY_RUN=1) inside a job: prints the resolved configuration, checks it and
  its memory estimate at the job's number of processes, prints the srun line, and exits.
EOF
}

# $1: the kind, $2: the tool (empty: training); then the script's arguments. -h / --help: usage, exit.
# Inside a job a tool's --help goes to the tool (its arguments pass through unchanged).
prolong_help_if_asked() {
    local kind=$1 tool=$2
    shift 2
    [[ -n "$tool" && -n "${SLURM_JOB_ID:-}" ]] && return 0
    if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
        prolong_usage "$kind" "$tool"
        exit 0
    fi
}

# ---- run dir and logs ----------------------------------------------------------------------------
# Ask Hydra for the resolved run.dir (also a fast check of the overrides). Sets PROLONG_RUN_DIR.
prolong_resolve_run_dir() {
    local out rc=0 arg given=""
    # A literal run.dir=... on the command line wins over every config file: no need to ask.
    for arg in "$@"; do
        case $arg in
            run.dir=*|+run.dir=*|++run.dir=*) given=${arg#*run.dir=} ;;
        esac
    done
    if [[ -n "$given" && "$given" != *"\${"* && "$given" != *"'"* && "$given" != *'"'* ]]; then
        PROLONG_RUN_DIR=$given
        [[ "$PROLONG_RUN_DIR" = /* ]] || PROLONG_RUN_DIR=$PWD/$PROLONG_RUN_DIR
        return 0
    fi
    out=$(prolong_srun_one "$PROLONG_PYTHON" -m megatron_prolong.train "$@" --cfg job --resolve --package run 2>&1) || rc=$?
    if (( rc != 0 )); then
        printf '%s\n' "$out" >&2
        prolong_log "the overrides do not compose (exit $rc); nothing was launched" >&2
        PROLONG_RC=$rc
        return 1
    fi
    PROLONG_RUN_DIR=$(printf '%s\n' "$out" | sed -n 's/^dir: *//p' | head -n 1)
    PROLONG_RUN_DIR=${PROLONG_RUN_DIR%\"}; PROLONG_RUN_DIR=${PROLONG_RUN_DIR#\"}
    PROLONG_RUN_DIR=${PROLONG_RUN_DIR%\'}; PROLONG_RUN_DIR=${PROLONG_RUN_DIR#\'}
    if [[ -z "$PROLONG_RUN_DIR" ]]; then
        printf '%s\n' "$out" >&2
        prolong_log "could not read run.dir from the configuration" >&2
        PROLONG_RC=1
        return 1
    fi
    [[ "$PROLONG_RUN_DIR" = /* ]] || PROLONG_RUN_DIR=$PWD/$PROLONG_RUN_DIR
}

# From here on, everything the script and the processes print also goes to <run dir>/logs/.
prolong_log_to_run_dir() {
    local logdir=$PROLONG_RUN_DIR/logs
    PROLONG_LOG=$logdir/${SLURM_JOB_NAME:-$PROLONG_JOB_KIND}-$SLURM_JOB_ID.log
    if ! mkdir -p "$logdir" 2>/dev/null || ! touch "$PROLONG_LOG" 2>/dev/null; then
        prolong_log "cannot write $PROLONG_LOG; logging to the job's output file only" >&2
        PROLONG_LOG="(none)"
        return 0
    fi
    # Keep the job's own stdout/stderr (the sbatch --output file) to return to at the end.
    exec {PROLONG_STDOUT_FD}>&1 {PROLONG_STDERR_FD}>&2
    # tee ignores the job's signals (scancel --full signals every process of the batch step).
    exec > >(trap '' USR1 USR2 TERM INT HUP; exec tee -a "$PROLONG_LOG") 2>&1
    PROLONG_TEE_PID=$!
}

prolong_banner() {
    prolong_log "job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST," \
        "repo $PROLONG_DIR, python $PROLONG_PYTHON, cwd $PWD"
    prolong_log "arguments: $*"
}

# ---- end of job ------------------------------------------------------------------------------
prolong_cleanup() {
    local clean_shm=0
    if [[ "${PROLONG_CLEAN_SHM:-1}" == 1 ]] && scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -q 'OverSubscribe=NO'; then
        clean_shm=1
    fi
    # shellcheck disable=SC2016  # expanded by the per-node bash
    local script='rm -rf "$1"; if [ "$2" = 1 ]; then find /dev/shm -maxdepth 1 -type f -user "$(id -u)" -newermt "@$3" -regextype posix-extended -regex ".*/[0-9]{6}_(locals|barrier|next_epoch|cache_usage|shard_states|shard_access_times|resume|epoch_shape|epoch_data)" -delete 2>/dev/null; fi; true'
    if (( NNODES > 1 )); then
        srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --overlap --kill-on-bad-exit=0 \
            bash -c "$script" prolong-cleanup "$PROLONG_JOB_TMPDIR" "$clean_shm" "$PROLONG_JOB_START" || true
    fi
    bash -c "$script" prolong-cleanup "$PROLONG_JOB_TMPDIR" "$clean_shm" "$PROLONG_JOB_START" || true
}

# Decide about requeueing after a training step that exited with $1, clean up, and exit with it.
prolong_finish() {
    local rc=$1 requeue=0
    prolong_cleanup
    if (( rc == 0 )); then
        prolong_log "finished (exit 0)"
    elif (( PROLONG_GOT_TERM )); then
        prolong_log "exit $rc after SIGTERM: the job is being ended by Slurm; not requeueing" \
            "(resubmitting the same command resumes from the latest checkpoint)"
    elif (( rc == PROLONG_REQUEUE_EXIT_CODE )); then
        requeue=1
    else
        prolong_log "training failed (exit $rc)"
    fi
    if (( requeue )) && [[ "${PROLONG_REQUEUE:-1}" != 1 ]]; then
        prolong_log "exit $rc: checkpointed; PROLONG_REQUEUE=${PROLONG_REQUEUE} so not requeueing"
        requeue=0
    fi
    if (( requeue )) && [[ -n "${PROLONG_MAX_RESTARTS:-}" ]] && (( ${SLURM_RESTART_COUNT:-0} >= PROLONG_MAX_RESTARTS )); then
        prolong_log "exit $rc: checkpointed; already restarted ${SLURM_RESTART_COUNT:-0} times (PROLONG_MAX_RESTARTS)," \
            "not requeueing"
        requeue=0
    fi
    if (( requeue )); then
        prolong_log "exit $rc: checkpointed; requeueing job $SLURM_JOB_ID (it resumes from the latest checkpoint)"
        prolong_close_log
        # Slurm ends this script as part of the requeue; the exit below runs only if it refuses.
        if ! scontrol requeue "$SLURM_JOB_ID"; then
            echo "[$PROLONG_JOB_KIND] scontrol requeue failed; resubmit the same command to resume" >&2
        fi
        exit "$rc"
    fi
    prolong_close_log
    exit "$rc"
}

prolong_close_log() {
    if [[ -n "$PROLONG_TEE_PID" ]]; then
        # Back to the job's own output file; tee sees end of input, flushes and exits.
        exec 1>&"$PROLONG_STDOUT_FD" 2>&"$PROLONG_STDERR_FD"
        wait "$PROLONG_TEE_PID" 2>/dev/null || true
        PROLONG_TEE_PID=""
    fi
}

# ---- entry points --------------------------------------------------------------------------------
# Training (cpt.sh, sft.sh): everything after the script name goes to Hydra unchanged.
prolong_train_job() {
    local kind=$1
    shift
    prolong_help_if_asked "$kind" "" "$@"
    if [[ "${1:-}" == --dry-run ]]; then
        PROLONG_DRY_RUN=1
        shift
    fi
    prolong_init "$kind"
    if [[ "${PROLONG_DRY_RUN:-0}" == 1 ]]; then
        prolong_dry_run "$@"
    fi
    if ! prolong_resolve_run_dir "$@"; then
        prolong_cleanup
        exit "$PROLONG_RC"
    fi
    prolong_log_to_run_dir
    prolong_banner "$@"
    prolong_log "run dir $PROLONG_RUN_DIR (log $PROLONG_LOG)"
    if (( PROLONG_GOT_TERM )); then
        prolong_log "SIGTERM before launch; not starting"
        prolong_finish 143
    elif (( PROLONG_GOT_USR1 )); then
        prolong_log "USR1 before launch: nothing to checkpoint"
        prolong_finish "$PROLONG_REQUEUE_EXIT_CODE"
    fi
    prolong_srun_all "$PROLONG_PYTHON" -m megatron_prolong.train "$@"
    prolong_finish "$PROLONG_RC"
}

# The resolved configuration and its memory estimate at the job's size (the trainer's dry run, one
# process), then the srun line that would start training; exits with the check's code.
prolong_dry_run() {
    local rc=0
    export PROLONG_DRY_RUN=1
    WORLD_SIZE=$(( NNODES * GPUS_PER_NODE )) prolong_srun_one "$PROLONG_PYTHON" -m megatron_prolong.train "$@" || rc=$?
    (( rc == 0 )) && prolong_srun_all "$PROLONG_PYTHON" -m megatron_prolong.train "$@"
    prolong_cleanup
    exit "$rc"
}

# A tool (convert.sh, eval.sh): "$@" goes to the tool unchanged; exit code is the tool's.
# $2: processes per node to force (empty: GPUS_PER_NODE / --ntasks-per-node).
prolong_tool_job() {
    local kind=$1 procs=$2 tool=$3
    shift 3
    prolong_help_if_asked "$kind" "$tool" "$@"
    [[ -n "$procs" ]] && GPUS_PER_NODE=$procs
    prolong_init "$kind"
    [[ -n "$procs" ]] && NNODES=1
    prolong_banner "$@"
    if [[ ! -f "$PROLONG_DIR/$tool" ]]; then
        prolong_log "$PROLONG_DIR/$tool does not exist" >&2
        prolong_cleanup
        exit 2
    fi
    prolong_srun_all "$PROLONG_PYTHON" "$PROLONG_DIR/$tool" "$@"
    prolong_cleanup
    if (( PROLONG_RC != 0 )); then
        prolong_log "$tool failed (exit $PROLONG_RC)"
    fi
    exit "$PROLONG_RC"
}
