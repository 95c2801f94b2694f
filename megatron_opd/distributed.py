"""Process-group set-up from torchrun or SLURM, and the ParallelGroups handed to everything.

``init_distributed`` reads the launcher's environment (:mod:`megatron_opd.launch_env`),
creates the default process group (NCCL on GPU, gloo on CPU, with a short timeout so a
dead rank fails the job quickly),
lets Megatron-Core build its TP/PP/DP/CP groups, and returns one :class:`ParallelGroups`.
Code below the trainer takes that object (or one of its groups) as an argument and never
calls Megatron's global ``parallel_state`` getters.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_opd.config.parallel import ParallelConfig
from megatron_opd.launch_env import LaunchEnv, read_launch_env
from megatron_opd.platform import Platform, detect_platform


@dataclass(frozen=True, kw_only=True)
class ParallelGroups:
    """The process groups and ranks of this process, passed explicitly to every layer."""

    platform: Platform
    """Device and backend."""
    world_size: int
    """All processes."""
    rank: int
    """This process's global rank."""
    tp_group: dist.ProcessGroup | None
    """Tensor-parallel group (the vocabulary is sharded over it)."""
    pp_group: dist.ProcessGroup | None
    """Pipeline-parallel group."""
    dp_group: dist.ProcessGroup | None
    """Data-parallel group (without context parallel)."""
    dp_cp_group: dist.ProcessGroup | None
    """Data-parallel group including context-parallel ranks (gradient reduction)."""
    cp_group: dist.ProcessGroup | None
    """Context-parallel group."""
    embedding_group: dist.ProcessGroup | None
    """First and last PP stage (tied embedding gradients)."""
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    cp_rank: int
    cp_size: int
    pp_global_ranks: tuple[int, ...]
    """Global ranks of this process's pipeline group, first stage to last."""

    @property
    def is_first_stage(self) -> bool:
        """True on the first pipeline stage (holds the embedding)."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """True on the last pipeline stage (holds the logits)."""
        return self.pp_rank == self.pp_size - 1

    @property
    def last_stage_global_rank(self) -> int:
        """Global rank of the last stage in this pipeline (source of truncation lengths)."""
        return self.pp_global_ranks[-1]

    @property
    def first_stage_global_rank(self) -> int:
        """Global rank of the first stage in this pipeline."""
        return self.pp_global_ranks[0]

    def vocab_partition(self, padded_vocab_size: int) -> tuple[int, int]:
        """``[start, end)`` of the vocabulary this TP rank holds (Megatron's VocabUtility)."""
        if padded_vocab_size % self.tp_size:
            raise ValueError(
                f"padded vocabulary {padded_vocab_size} is not divisible by "
                f"tensor_parallel_size {self.tp_size}; pad the vocabulary to a multiple of "
                "make_vocab_size_divisible_by * tensor_parallel_size"
            )
        per_rank = padded_vocab_size // self.tp_size
        return self.tp_rank * per_rank, (self.tp_rank + 1) * per_rank


def init_distributed(
    config: ParallelConfig,
    *,
    seed: int = 1234,
    launch_env: LaunchEnv | None = None,
) -> ParallelGroups:
    """Create the default process group (if needed) and Megatron's parallel groups.

    Safe to call again in the same process after :func:`destroy_model_parallel` (tests
    re-initialise with other layouts over one world group).
    """
    from megatron.core import parallel_state, tensor_parallel

    launch = launch_env or read_launch_env()
    platform = detect_platform(local_rank=launch.local_rank, force_cpu=config.force_cpu)
    timeout = timedelta(seconds=config.timeout_seconds)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=platform.backend,
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timeout,
        )
    world_size = dist.get_world_size()
    if world_size % config.model_parallel_size:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_parallel_size * "
            f"pipeline_parallel_size * context_parallel_size = {config.model_parallel_size}; "
            "change parallel.* or the number of processes"
        )
    destroy_model_parallel()  # a previous layout's groups, if any
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=config.tensor_parallel_size,
        pipeline_model_parallel_size=config.pipeline_parallel_size,
        context_parallel_size=config.context_parallel_size,
        # Megatron takes whole minutes; the default group's timeout above is the tight one.
        distributed_timeout_minutes=max(1, -(-config.timeout_seconds // 60)),
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    return _collect_groups(platform)


def _collect_groups(platform: Platform) -> ParallelGroups:
    from megatron.core import parallel_state as ps

    pp_group = ps.get_pipeline_model_parallel_group()
    return ParallelGroups(
        platform=platform,
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=pp_group,
        dp_group=ps.get_data_parallel_group(),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        cp_group=ps.get_context_parallel_group(),
        embedding_group=ps.get_embedding_group(check_initialized=False),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        cp_rank=ps.get_context_parallel_rank(),
        cp_size=ps.get_context_parallel_world_size(),
        pp_global_ranks=tuple(dist.get_process_group_ranks(pp_group)),
    )


def destroy_model_parallel() -> None:
    """Tear down Megatron's groups (the default group stays).

    Megatron's ``destroy_model_parallel`` only forgets its groups; c10d still holds them,
    and each gloo group keeps its own threads (~3 per group, dozens of groups per
    ``init_distributed``), so a process that initialises repeatedly (a test worker, a
    sweep) would pile up thousands of threads. Every group but the default one is
    destroyed here as well.
    """
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        world = dist.GroupMember.WORLD
        for group in list(dist.distributed_c10d._world.pg_map):
            if group is not world:
                dist.destroy_process_group(group)


def destroy_distributed() -> None:
    """Tear down Megatron's groups and the default process group."""
    destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
