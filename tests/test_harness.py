"""The multi-process harness and distributed init (gloo, CPU)."""

import time

import pytest
import torch
import torch.distributed as dist

from megatron_opd.config.parallel import ParallelConfig
from megatron_opd.distributed import init_distributed, read_launch_env
from megatron_opd.testing.multiprocess import DistributedPool, DistributedRankError, run_distributed


def _layout(tp, pp):
    groups = init_distributed(ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp))
    value = torch.tensor([float(groups.rank)])
    dist.all_reduce(value, group=groups.tp_group)
    return {
        "tp": (groups.tp_rank, groups.tp_size),
        "pp": (groups.pp_rank, groups.pp_size),
        "dp": (groups.dp_rank, groups.dp_size),
        "tp_sum": value.item(),
        "last": groups.is_last_stage,
        "pp_ranks": groups.pp_global_ranks,
        "vocab": groups.vocab_partition(256),
    }


def test_layouts_two_ranks():
    out = run_distributed(_layout, 2, 2, 1)
    assert [o["tp"] for o in out] == [(0, 2), (1, 2)]
    assert all(o["tp_sum"] == 1.0 for o in out)
    assert [o["vocab"] for o in out] == [(0, 128), (128, 256)]
    out = run_distributed(_layout, 2, 1, 2)
    assert [o["pp"] for o in out] == [(0, 2), (1, 2)]
    assert [o["last"] for o in out] == [False, True]
    assert out[0]["pp_ranks"] == (0, 1)
    out = run_distributed(_layout, 2, 1, 1)
    assert [o["dp"] for o in out] == [(0, 2), (1, 2)]


def _fail_on_rank_one():
    rank = dist.get_rank()
    if rank == 1:
        raise RuntimeError("boom on rank one")
    dist.barrier()  # rank 0 would block here forever without the harness
    return rank


def test_failure_on_one_rank_fails_fast_with_its_traceback():
    pool = DistributedPool(2)
    try:
        start = time.monotonic()
        with pytest.raises(DistributedRankError, match="boom on rank one"):
            pool.run(_fail_on_rank_one, timeout_s=60)
        assert time.monotonic() - start < 30
    finally:
        pool.close()


def test_launch_env_from_slurm_and_torchrun():
    env = read_launch_env(
        {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
         "SLURM_JOB_NODELIST": "node07", "SLURM_JOB_ID": "1234"}
    )  # fmt: skip
    assert (env.rank, env.world_size, env.local_rank) == (3, 8, 1)
    assert env.master_addr == "node07" and env.master_port == 29500 + 234
    env = read_launch_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                           "MASTER_ADDR": "h", "MASTER_PORT": "7"})  # fmt: skip
    assert (env.rank, env.world_size, env.master_addr, env.master_port) == (1, 2, "h", 7)


def test_parallel_config_errors_name_the_field():
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        ParallelConfig(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="sequence_parallel"):
        ParallelConfig(sequence_parallel=True)


def _threads_after_init_cycles(cycles):
    import gc
    import os

    from megatron_opd.distributed import destroy_model_parallel

    counts = []
    for _ in range(cycles):
        init_distributed(ParallelConfig(tensor_parallel_size=2), seed=0)
        destroy_model_parallel()
        gc.collect()
        counts.append(len(os.listdir(f"/proc/{os.getpid()}/task")))
    return counts


def test_repeated_init_and_teardown_does_not_pile_up_gloo_threads():
    # Megatron's teardown alone left ~50 gloo threads per init in the process (a test
    # worker reached 1000+), slowing everything on a 2-core machine.
    for counts in run_distributed(_threads_after_init_cycles, 2, 4):
        assert counts[-1] <= counts[0] + 2, counts
