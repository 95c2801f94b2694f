"""Parallel layout of a run."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class ParallelConfig:
    """How the student and teacher are split over processes.

    The data-parallel size is derived: world_size / (tp * pp * cp).
    """

    tensor_parallel_size: int = 1
    """Tensor-parallel (TP) ranks per model replica; the vocabulary is sharded over them."""

    pipeline_parallel_size: int = 1
    """Pipeline-parallel (PP) stages; the truncation lengths are broadcast across them."""

    context_parallel_size: int = 1
    """Context-parallel size; accepted for Megatron parity, only 1 is supported now."""

    sequence_parallel: bool = False
    """Megatron sequence parallelism in training (requires TP > 1)."""

    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (Megatron DistributedOptimizer)."""

    timeout_seconds: int = 60
    """Collective timeout; a failing rank makes the others fail after this many seconds."""

    force_cpu: bool = False
    """Run on CPU with gloo even where CUDA is visible (debugging)."""

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "context_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel.{name} must be a positive integer, got {value!r}")
        if self.context_parallel_size != 1:
            raise ValueError("parallel.context_parallel_size > 1 is not supported yet; set it to 1")
        if self.sequence_parallel and self.tensor_parallel_size == 1:
            raise ValueError(
                "parallel.sequence_parallel needs tensor_parallel_size > 1; "
                "set sequence_parallel=false or raise tensor_parallel_size"
            )
        if self.timeout_seconds < 1:
            raise ValueError("parallel.timeout_seconds must be >= 1")

    @property
    def model_parallel_size(self) -> int:
        """Processes per model replica (tp * pp * cp)."""
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.context_parallel_size
