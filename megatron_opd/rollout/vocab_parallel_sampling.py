"""A decode step's sampling on this rank's vocabulary shard, without gathering the logits.

At tensor parallelism ``TP > 1`` the output layer leaves each rank ``[a, V / TP]`` logits.
Gathering them (``[a, V]`` per rank per decode step) and sampling on the whole row costs
every rank the whole vocabulary's work plus the all-gather. :func:`vocab_parallel_sample_step`
keeps the per-rank work to the shard's (one exact top-K and one ``exp``-and-sum pass, the
floor measured by ``bench/rollout_bench.py --tp 2``) and exchanges a few numbers per row:

1. each rank sends its exact top-``k`` (values, global ids), its row max ``m_r`` and
   ``s_r = sum exp(x - m_r)`` in ONE all-gather of ``[a, 2k + 2]`` float64;
2. every rank merges the same table into the global top-``k`` (value descending, lower id
   first) and ``lse = log sum_r s_r exp(m_r - lse)``, and draws the same uniform ``u``
   per row from its generator (seeded alike on the TP ranks);
3. head: the draw of :func:`~megatron_opd.rollout.sampling.draw` over "the 16 most likely
   ids first, then the rest in id order" picks from the global top-16 on every rank;
4. tail (rows whose ``u`` is past the head's mass): the rest in id order is rank 0's
   shard, then rank 1's, ...; each rank's tail mass follows from the table (``s_r
   exp(m_r - lse)`` minus its head ids' probabilities), so all ranks agree which rank
   owns the row's draw; the owner searches its shard (:func:`~megatron_opd.rollout.
   sampling.tail_pick` on its kept ``exp`` pass) and ONE all-reduce of ``[a, 2]`` (id and
   logit) tells the others. No all-reduce when no row reaches the tail.

The ids are those :func:`~megatron_opd.rollout.sampling.sample_step` draws from the
gathered logits with the same generator (same ordering, same uniforms), up to float
rounding of the sums near a boundary (tested against it at TP = 2 and 3). Top-p needs
the sorted vocabulary and is not done here (the engine gathers the logits for it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_opd.ops.softmax_functions import combine_logsumexp
from megatron_opd.ops.topk_select import local_topk, merge_topk
from megatron_opd.rollout.sampling import HEAD, head_pick, shifted_exp, tail_pick


def vocab_parallel_sample_step(
    local_logits: torch.Tensor,
    *,
    temperature: float,
    generator: torch.Generator | None,
    vocab_size: int,
    tp_group: dist.ProcessGroup,
    top_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:func:`~megatron_opd.rollout.sampling.sample_step` (``top_p = 1``) on this rank's
    ``[a, V_padded / TP]`` shard; the same four results on every rank of ``tp_group``.

    Args:
        local_logits: this rank's columns of the logits (any float dtype; Megatron's
            padding columns at ids >= ``vocab_size`` are never read).
        temperature: the sampling temperature (0 = greedy).
        generator: the replica's generator, seeded alike on every rank of ``tp_group``.
        vocab_size: the real (unpadded) vocabulary size.
        tp_group: the tensor-parallel group the vocabulary is split over.
        top_k: student top-K to record, ``< vocab_size`` (0: none).
    """
    if not 0 <= top_k < vocab_size:
        raise ValueError(
            f"top_k={top_k} must be below vocab_size={vocab_size}; record the whole "
            "vocabulary from gathered logits"
        )
    rank, size = dist.get_rank(tp_group), dist.get_world_size(tp_group)
    rows, local = local_logits.shape
    start = rank * local
    valid = max(0, min(local, vocab_size - start))
    x = local_logits[:, :valid].float()
    scaled = x / temperature if temperature not in (0.0, 1.0) else x
    k = min(max(top_k, HEAD if temperature else 1), vocab_size)
    values, ids = local_topk(scaled, k, start, local * size)
    shifted = shifted_exp(scaled, values[:, :1])
    # 1. One exchange: top-k values and ids, row max and sum exp(x - max), per row.
    payload = torch.cat(
        [values.double(), ids.double(), values[:, :1].double(), shifted.sums.double()], dim=1
    )
    parts = [torch.empty_like(payload) for _ in range(size)]
    dist.all_gather(parts, payload, group=tp_group)
    table = torch.stack(parts)  # [TP, a, 2k + 2]
    maxes, sums = table[:, :, 2 * k].float(), table[:, :, 2 * k + 1].float()
    lse = combine_logsumexp(maxes, sums)[:, None]  # [a, 1]
    all_values = table[:, :, :k].permute(1, 0, 2).reshape(rows, size * k).float()
    all_ids = table[:, :, k : 2 * k].permute(1, 0, 2).reshape(rows, size * k).long()
    values, ids = merge_topk(all_values, all_ids, k)

    if temperature == 0.0:
        next_ids, picked = ids[:, 0], values[:, 0]
    else:
        u = torch.rand(rows, 1, generator=generator, device=x.device)
        h = min(HEAD, vocab_size)
        next_ids, column, mass, tail = head_pick(values[:, :h], ids[:, :h], lse, u)
        picked = values[:, :h].gather(1, column)[:, 0]
        if h < vocab_size and tail.numel():
            next_ids, picked = _tail_draw(
                shifted, scaled, start, valid, local, rank, tp_group, ids[:, :h],
                values[:, :h], lse, maxes, sums, u - mass, tail, next_ids, picked,
            )  # fmt: skip
    log_probs = picked - lse[:, 0]
    if not top_k:
        return next_ids, log_probs, None, None
    return next_ids, log_probs, ids[:, :top_k], values[:, :top_k] - lse


def _tail_draw(
    shifted, scaled, start, valid, local, rank, tp_group, head_ids, head_values, lse,
    maxes, sums, rest, tail, next_ids, picked,
):  # fmt: skip
    """Step 4 of the module docstring: the tail rows' ids and logits on every rank."""
    size = maxes.shape[0]
    # Each rank's mass outside the head, for every row (the same table on every rank).
    head_probs = (head_values - lse).exp()  # [a, h]
    owner_of_head = head_ids // local  # [a, h]
    in_head = torch.zeros_like(sums).scatter_add_(0, owner_of_head.T.contiguous(),
                                                  head_probs.T.contiguous())  # fmt: skip
    shard_mass = (sums * (maxes - lse[:, 0]).exp()).nan_to_num_(0.0)
    tail_mass = (shard_mass - in_head).clamp_(min=0.0)  # [TP, a]
    cum = tail_mass.cumsum(dim=0)
    total = cum[-1]
    target = torch.minimum(rest[:, 0].clamp(min=0), total * (1 - 1e-6))
    owner = (cum <= target).sum(dim=0).clamp_(max=size - 1)  # [a]
    result = torch.zeros(next_ids.shape[0], 2, dtype=torch.float64, device=next_ids.device)
    mine = tail[(owner.index_select(0, tail) == rank) & (total.index_select(0, tail) > 0)]
    if mine.numel() and valid:
        exp = shifted.exp.index_select(0, mine)
        # Zero this shard's head ids (the head was drawn from already).
        cols = head_ids.index_select(0, mine) - start
        owned = (cols >= 0) & (cols < valid)
        flat = (torch.arange(mine.numel(), device=cols.device)[:, None] * valid + cols)[owned]
        exp.view(-1).index_fill_(0, flat, 0.0)
        before = cum.index_select(1, mine)[rank] - tail_mass.index_select(1, mine)[rank]
        local_target = target.index_select(0, mine) - before
        # exp = probability * exp(lse - shift); the shift is this rank's row max.
        scale = (lse.index_select(0, mine)[:, 0] - maxes[rank].index_select(0, mine)).exp()
        col, _ = tail_pick(exp, (local_target * scale)[:, None])
        result[mine, 0] = (col + start).double()
        result[mine, 1] = scaled.index_select(0, mine).gather(1, col[:, None])[:, 0].double()
    dist.all_reduce(result, group=tp_group)
    drawn = tail[total.index_select(0, tail) > 0]
    next_ids, picked = next_ids.clone(), picked.clone()
    next_ids[drawn] = result[drawn, 0].long()
    picked[drawn] = result[drawn, 1].float()
    return next_ids, picked
