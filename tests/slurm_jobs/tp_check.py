"""One task of tp_check.sbatch: TP=2 collectives launched by srun, results as JSON lines.

Each rank prints ``RESULT {...}`` with its launch layout, the sum of ``rank + 1`` over the
TP group, and two vocab-parallel results over its shard of fixed random logits: Megatron's
cross-entropy and megatron_opd's log-probability of the target. The test recomputes the
full-vocabulary loss in its own process.
"""

import json
import sys

import torch

from megatron_opd.config.parallel import ParallelConfig
from megatron_opd.distributed import destroy_distributed, init_distributed, read_launch_env

SEQ_LEN, BATCH, VOCAB, SEED = 3, 2, 16, 0


def fixed_logits_and_targets() -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[s, b, V]`` and targets ``[s, b]``; identical in every process."""
    generator = torch.Generator().manual_seed(SEED)
    logits = torch.randn(SEQ_LEN, BATCH, VOCAB, generator=generator)
    targets = torch.randint(0, VOCAB, (SEQ_LEN, BATCH), generator=generator)
    return logits, targets


def main() -> None:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_opd.ops.vocab_parallel import vocab_parallel_log_probs

    launch = read_launch_env()
    groups = init_distributed(ParallelConfig(tensor_parallel_size=2, timeout_seconds=180))
    try:
        summed = torch.tensor([float(groups.rank + 1)])
        torch.distributed.all_reduce(summed, group=groups.tp_group)

        logits, targets = fixed_logits_and_targets()
        start, end = groups.vocab_partition(VOCAB)
        # Megatron overwrites its logits argument in place: hand it a copy.
        loss = vocab_parallel_cross_entropy(logits[..., start:end].clone(), targets)
        target_log_probs = vocab_parallel_log_probs(
            logits[..., start:end], targets[..., None], groups.tp_group
        )[..., 0]

        result = {
            "python": sys.executable,
            "rank": groups.rank,
            "world_size": groups.world_size,
            "launch_rank": launch.rank,
            "local_rank": launch.local_rank,
            "master_addr": launch.master_addr,
            "tp_rank": groups.tp_rank,
            "tp_size": groups.tp_size,
            "vocab_partition": [start, end],
            "tp_allreduce_sum": summed.item(),
            "vocab_parallel_ce": loss.tolist(),
            "opd_target_log_probs": target_log_probs.tolist(),
        }
        print("RESULT " + json.dumps(result), flush=True)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
