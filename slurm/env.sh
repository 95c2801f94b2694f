# shellcheck shell=bash
# Environment for megatron_opd on H100 nodes (NCCL, Transformer Engine, PyTorch).
# Sourced by slurm/common.sh before srun; every value can be overridden by exporting it
# before sbatch (sbatch passes the submitting environment on by default).

# --- Megatron / CUDA ----------------------------------------------------------------
# One hardware queue per device: Megatron's TP communication overlap relies on kernels
# being issued in program order (it refuses to overlap without this).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# Fewer fragmentation OOMs with variable-length rollouts (sequence lengths change every step).
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# The CPU side is data loading and Python; one thread per rank avoids 8 x nproc threads.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# HF tokenizers fork-safety warning spam in every rank.
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

# --- Transformer Engine ---------------------------------------------------------------
# cuDNN fused attention (FP8-capable on H100); flash-attn stays available as a fallback.
export NVTE_FUSED_ATTN=${NVTE_FUSED_ATTN:-1}
export NVTE_FLASH_ATTN=${NVTE_FLASH_ATTN:-1}
# Leave SMs free for overlapped TP communication during the LayerNorm kernels.
export NVTE_FWD_LAYERNORM_SM_MARGIN=${NVTE_FWD_LAYERNORM_SM_MARGIN:-16}
export NVTE_BWD_LAYERNORM_SM_MARGIN=${NVTE_BWD_LAYERNORM_SM_MARGIN:-16}

# --- NCCL -------------------------------------------------------------------------------
# WARN shows only problems; INFO prints topology and transports (use when debugging hangs).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# A dead peer surfaces as an error the job can exit on, not a silent hang.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# Avoid recordStream on NCCL tensors (lower memory with overlapped collectives).
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
# Longer InfiniBand retry timeout (2^22 us x 4.096) so transient fabric hiccups do not abort.
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
# NVLink SHARP (NVLS) reserves extra GPU memory per communicator; OPD holds two models
# on every GPU, so it is off unless asked for.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
# Cluster-specific; set them in the submitting shell if the defaults pick the wrong NICs:
#   NCCL_SOCKET_IFNAME (bootstrap interface, e.g. eth0 or ^lo,docker)
#   NCCL_IB_HCA        (InfiniBand HCAs, e.g. mlx5)
