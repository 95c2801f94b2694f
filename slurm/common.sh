# shellcheck shell=bash
# Sourced by the slurm/*.sbatch scripts: rendezvous variables and the one srun that starts
# one task per GPU on every node of the allocation.
#
# Every task runs the megatron_opd entry point directly; the trainer reads SLURM_PROCID,
# SLURM_NTASKS and SLURM_LOCALID itself (megatron_opd/distributed.py read_launch_env), so
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
  opd_model_args
}

# The loaded model's facts as Megatron-LM flags, for tools that take them (pretrain_gpt.py
# style). Fills the array MODEL_ARGS from NUM_LAYERS, HIDDEN_SIZE, ..., QK_LAYERNORM,
# QKV_BIAS, TIE_WORD_EMBEDDINGS (opd_source_model calls it after loading a model file).
opd_model_args() {
  local flag
  for flag in QK_LAYERNORM QKV_BIAS TIE_WORD_EMBEDDINGS; do
    case ${!flag:?the model file sets no $flag} in
      true | false) ;;
      *)
        echo "$flag=${!flag} in the model file: expected true or false" >&2
        exit 2
        ;;
    esac
  done
  MODEL_ARGS=(
    --swiglu
    --normalization RMSNorm
    --norm-epsilon "${RMS_NORM_EPS:?}"
    --position-embedding-type rope
    --rotary-base "${ROPE_THETA:?}"
    --num-layers "${NUM_LAYERS:?}"
    --hidden-size "${HIDDEN_SIZE:?}"
    --ffn-hidden-size "${FFN_HIDDEN_SIZE:?}"
    --num-attention-heads "${NUM_ATTENTION_HEADS:?}"
  )
  if [ "${NUM_KV_HEADS:?}" != "$NUM_ATTENTION_HEADS" ]; then
    MODEL_ARGS+=(--group-query-attention --num-query-groups "$NUM_KV_HEADS")
  fi
  MODEL_ARGS+=(
    --kv-channels "${HEAD_DIM:?}"
    --vocab-size "${VOCAB_SIZE:?}"
    --max-position-embeddings "${MAX_POSITION_EMBEDDINGS:?}"
    --disable-bias-linear # no bias on the linear layers, except q/k/v in Qwen2 below
  )
  [ "$QK_LAYERNORM" = false ] || MODEL_ARGS+=(--qk-layernorm)
  [ "$QKV_BIAS" = false ] || MODEL_ARGS+=(--add-qkv-bias)
  [ "$TIE_WORD_EMBEDDINGS" = true ] || MODEL_ARGS+=(--untie-embeddings-and-output-weights)
}

# srun the given command once per GPU on every node (NUM_NODES x TASKS_PER_NODE tasks).
opd_srun() {
  local srun_args=(
    --nodes="$NUM_NODES"
    --ntasks-per-node="$TASKS_PER_NODE"
    --kill-on-bad-exit=1 # one failed rank ends the step instead of hanging in NCCL
    --label
    --chdir="$REPO_DIR"
  )
  if [ -n "${CONTAINER_IMAGE:-}" ]; then
    srun_args+=(
      --container-image="$CONTAINER_IMAGE"
      --container-mounts="${CONTAINER_MOUNTS:-$REPO_DIR:$REPO_DIR}"
      --container-workdir="$REPO_DIR"
      --no-container-mount-home
    )
  fi
  if [ -n "${EXTRA_SRUN_ARGS:-}" ]; then
    local extra
    read -r -a extra <<<"$EXTRA_SRUN_ARGS"
    srun_args+=("${extra[@]}")
  fi
  echo "[$(date +%FT%T)] job $SLURM_JOB_ID: $NUM_NODES node(s) x $TASKS_PER_NODE task(s)," \
    "master $MASTER_ADDR:$MASTER_PORT${CONTAINER_IMAGE:+, image $CONTAINER_IMAGE}"
  echo "+ srun ${srun_args[*]} $*"
  srun "${srun_args[@]}" "$@"
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
