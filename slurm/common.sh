# shellcheck shell=bash
# Sourced by the slurm/*.sbatch scripts: rendezvous variables and the one srun that starts
# one task per GPU on every node of the allocation.
#
# Every task runs the megatron_opd entry point directly; the trainer reads SLURM_PROCID,
# SLURM_NTASKS and SLURM_LOCALID itself (megatron_opd/launch_env.py read_launch_env), so
# there is no torchrun. MASTER_ADDR is the first host of the allocation.
#
# Settings (environment; all optional):
#   REPO_DIR            megatron_opd checkout, seen by every node    (default: the submit dir)
#   TASKS_PER_NODE      tasks per node, one per GPU                  (default: SLURM_GPUS_ON_NODE or 8;
#                       at most the --ntasks-per-node of the job)
#   MASTER_PORT         rendezvous port                              (default: 29500 + job id % 1000)
#   OPD_LAUNCHER        how to run the CLI                           (default: megatron-opd)
#                       e.g. OPD_LAUNCHER="python -m megatron_opd.cli" when it is not installed
#   CONTAINER_IMAGE     pyxis/enroot image; empty runs on the host   (e.g. nvcr.io#nvidia/pytorch:25.09-py3
#                       or /shared/images/megatron-opd.sqsh)
#   CONTAINER_MOUNTS    pyxis mounts                                 (default: REPO_DIR on itself)
#   EXTRA_SRUN_ARGS     more srun flags, word-split                  (e.g. "--cpu-bind=none")
#   OPD_CPUS_PER_TASK   srun --cpus-per-task                         (default: the job's SLURM_CPUS_PER_TASK)
#   OPD_REQUEUE_MARKER  file the trainer writes when it stopped on a (default: REPO_DIR/.slurm_requeue/<job id>;
#                       signal after saving (training scripts)       must be visible to the batch shell and rank 0)

# The sbatch scripts set REPO_DIR (default: the submit directory) before sourcing this.
: "${REPO_DIR:?set REPO_DIR to the megatron_opd checkout}"
: "${SLURM_JOB_ID:?run this script with sbatch (SLURM_JOB_ID is not set)}"
: "${SLURM_JOB_NODELIST:?run this script with sbatch (SLURM_JOB_NODELIST is not set)}"

# shellcheck source=env.sh
source "$REPO_DIR/slurm/env.sh"

# Not `| head -n1`: with pipefail, scontrol may die of SIGPIPE and fail the job.
mapfile -t OPD_JOB_HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
export MASTER_ADDR=${OPD_JOB_HOSTS[0]:?scontrol show hostnames returned no host}
export MASTER_PORT=${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 1000))}
NUM_NODES=${SLURM_NNODES:-1}
# SLURM_GPUS_ON_NODE is set when the job asked for GPUs (--gpus-per-node / --gres).
TASKS_PER_NODE=${TASKS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
# torchrun's variables would take precedence over SLURM's in read_launch_env.
unset RANK WORLD_SIZE LOCAL_RANK
# shellcheck disable=SC2034  # used by the sbatch scripts
read -r -a OPD_LAUNCHER_WORDS <<<"${OPD_LAUNCHER:-megatron-opd}"

# Load a model file from slurm/models/ (architecture facts, default TP/PP) by name.
opd_source_model() { # name, e.g. qwen3_8b
  local file=$REPO_DIR/slurm/models/$1.sh
  if [ ! -f "$file" ]; then
    local known=() path
    for path in "$REPO_DIR"/slurm/models/*.sh; do known+=("$(basename "$path" .sh)"); done
    echo "unknown MODEL '$1' (no $file); choose one of: ${known[*]}" >&2
    exit 2
  fi
  # shellcheck source=/dev/null
  source "$file"
  : "${MODEL_TP:?$file sets no MODEL_TP}" "${MODEL_PP:?$file sets no MODEL_PP}"
}

# The srun options of one task per GPU on every node; fills the array OPD_SRUN_ARGS.
opd_srun_args() {
  OPD_SRUN_ARGS=(
    --nodes="$NUM_NODES"
    --ntasks="$((NUM_NODES * TASKS_PER_NODE))"
    --ntasks-per-node="$TASKS_PER_NODE"
    --kill-on-bad-exit=1 # one failed rank ends the step instead of hanging in NCCL
    --label
    --chdir="$REPO_DIR"
  )
  # Since Slurm 22.05 srun no longer inherits sbatch's --cpus-per-task: without it every
  # task gets one CPU (one core for data loading, tokenization and the Python side).
  local cpus=${OPD_CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-}}
  [ -z "$cpus" ] || OPD_SRUN_ARGS+=(--cpus-per-task="$cpus")
  if [ -n "${CONTAINER_IMAGE:-}" ]; then
    OPD_SRUN_ARGS+=(
      --container-image="$CONTAINER_IMAGE"
      --container-mounts="${CONTAINER_MOUNTS:-$REPO_DIR:$REPO_DIR}"
      --container-workdir="$REPO_DIR"
      --no-container-mount-home
    )
  fi
  if [ -n "${EXTRA_SRUN_ARGS:-}" ]; then
    local extra
    read -r -a extra <<<"$EXTRA_SRUN_ARGS"
    OPD_SRUN_ARGS+=("${extra[@]}")
  fi
  echo "[$(date +%FT%T)] job $SLURM_JOB_ID: $NUM_NODES node(s) x $TASKS_PER_NODE task(s)," \
    "master $MASTER_ADDR:$MASTER_PORT${CONTAINER_IMAGE:+, image $CONTAINER_IMAGE}"
}

# srun the given command once per GPU on every node (NUM_NODES x TASKS_PER_NODE tasks).
opd_srun() {
  opd_srun_args
  echo "+ srun ${OPD_SRUN_ARGS[*]} $*"
  srun "${OPD_SRUN_ARGS[@]}" "$@"
}

# opd_srun for training, made preemption-safe. The sbatch header asks for
# `--signal=B:USR1@<lead>`: before the time limit Slurm signals this batch shell only, so
# the shell forwards the signal to srun, which forwards it to every task. The trainer
# finishes its step, saves, and rank 0 writes $OPD_REQUEUE_MARKER; seeing the marker, the
# shell requeues the job (`--requeue`), which then resumes from the checkpoint by itself.
# SIGUSR1 sent to the tasks only (`scancel --signal=USR1 <job>`) ends the same way.
# SIGTERM (scancel, preemption, `scontrol requeue`) is forwarded too, so the trainer saves
# if it can within KillWait/GraceTime, but the shell never requeues after it: a cancelled
# job must stay cancelled, and Slurm requeues a preempted one itself.
opd_srun_requeueable() {
  OPD_REQUEUE_MARKER=${OPD_REQUEUE_MARKER:-$REPO_DIR/.slurm_requeue/$SLURM_JOB_ID}
  export OPD_REQUEUE_MARKER
  rm -f "$OPD_REQUEUE_MARKER"
  OPD_SIGNALS_SEEN=""
  echo "[$(date +%FT%T)] job $SLURM_JOB_ID, requeued ${SLURM_RESTART_COUNT:-0} time(s) so far"
  opd_srun_args
  echo "+ srun ${OPD_SRUN_ARGS[*]} $*"
  OPD_SRUN_PID=""
  trap 'opd_forward_signal USR1' USR1
  trap 'opd_forward_signal TERM' TERM
  # In the background: bash runs traps only between commands, never during a foreground one.
  srun "${OPD_SRUN_ARGS[@]}" "$@" &
  OPD_SRUN_PID=$!
  local status=0
  # `wait` returns early (status > 128) whenever a trapped signal arrives; wait again
  # until srun is gone, then once more for its real exit status.
  while kill -0 "$OPD_SRUN_PID" 2>/dev/null; do
    wait "$OPD_SRUN_PID" || true
  done
  wait "$OPD_SRUN_PID" || status=$?
  trap - USR1 TERM
  if [ -f "$OPD_REQUEUE_MARKER" ]; then
    echo "[$(date +%FT%T)] the trainer stopped on a signal after saving: $(tr '\n' ' ' <"$OPD_REQUEUE_MARKER")"
    rm -f "$OPD_REQUEUE_MARKER"
    if [[ " $OPD_SIGNALS_SEEN " == *" TERM "* ]]; then
      echo "SIGTERM came from Slurm (cancel, preemption or requeue): not requeueing from here"
    else
      echo "+ scontrol requeue $SLURM_JOB_ID"
      scontrol requeue "$SLURM_JOB_ID" && return 0
      echo "scontrol requeue failed: resubmit the job; it resumes from the checkpoint" >&2
    fi
  fi
  return "$status"
}

# Trap body of opd_srun_requeueable: remember the signal and pass it on to srun.
opd_forward_signal() { # USR1 | TERM
  OPD_SIGNALS_SEEN+=" $1"
  echo "[$(date +%FT%T)] batch shell got SIG$1: forwarding it to the tasks"
  [ -z "$OPD_SRUN_PID" ] || kill -s "$1" "$OPD_SRUN_PID" 2>/dev/null || true
}

# Layout overrides for the trainer: TP/PP if exported, else the MODEL file's defaults.
# Fills the array OPD_LAYOUT_OVERRIDES (empty when neither is given).
opd_layout_overrides() {
  OPD_LAYOUT_OVERRIDES=()
  if [ -n "${MODEL:-}" ]; then
    opd_source_model "$MODEL"
  fi
  local tp=${TP:-${MODEL_TP:-}} pp=${PP:-${MODEL_PP:-}}
  [ -z "$tp" ] || OPD_LAYOUT_OVERRIDES+=("parallel.tensor_parallel_size=$tp")
  [ -z "$pp" ] || OPD_LAYOUT_OVERRIDES+=("parallel.pipeline_parallel_size=$pp")
}
