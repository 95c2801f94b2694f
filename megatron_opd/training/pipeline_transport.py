"""Moving decisions made on the last pipeline stage to every stage.

Logits, and so overlap ratios, reliability weights and the trimming plan, exist only on
the last pipeline stage. Every stage must nevertheless run the same schedule over
micro-batches of the same shapes (the shapes fix the p2p transfers), so the plan is
broadcast over the pipeline group *before* ``forward_backward_func`` starts. A tensor of
unknown size travels as two broadcasts: its shape, then its data.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_opd.distributed import ParallelGroups
from megatron_opd.scoring import broadcast_from_last_stage as broadcast_tensors_from_last_stage


def broadcast_from_last_stage(tensor: torch.Tensor | None, groups: ParallelGroups) -> torch.Tensor:
    """The last stage's ``tensor`` on every stage of this pipeline (other stages pass
    None); one tensor of :func:`megatron_opd.scoring.broadcast_from_last_stage`."""
    return broadcast_tensors_from_last_stage([tensor], groups)[0]


def gather_across_data_parallel(tensor: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """Concatenate a 1-D tensor of possibly different lengths from every DP rank (in DP
    rank order)."""
    if groups.dp_size == 1:
        return tensor
    device = tensor.device
    size = torch.tensor([tensor.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(groups.dp_size)]
    dist.all_gather(sizes, size, group=groups.dp_group)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=tensor.dtype, device=device)
    padded[: tensor.numel()] = tensor
    pieces = [torch.zeros_like(padded) for _ in range(groups.dp_size)]
    dist.all_gather(pieces, padded, group=groups.dp_group)
    return torch.cat([p[: int(s.item())] for p, s in zip(pieces, sizes)])
