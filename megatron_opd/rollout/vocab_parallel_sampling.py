"""A decode step's sampling on this rank's vocabulary shard, without gathering the logits.

At tensor parallelism ``TP > 1`` the output layer leaves each rank ``[a, V / TP]`` logits.
Gathering them (``[a, V]`` per rank per decode step) and sampling the whole row costs every
rank the whole vocabulary's work plus the all-gather. :func:`vocab_parallel_sample_step`
keeps each rank's work to its shard's (one exact top-K, one ``exp``-and-sum pass, and a
draw that usually stays within the top 16; the floor it is measured against in
``bench/rollout_bench.py``) and makes ONE collective per step, a ``[a, 2k + 4]`` all-gather
(``[a, 4]`` when no top-K is recorded), float32 while the ids fit in its mantissa.

The draw is two-stage: shard ``r`` holds probability mass ``M_r = s_r exp(m_r - lse)``
(``m_r`` its row max, ``s_r = sum exp(x - m_r)``), and every rank draws the same uniforms
``[a, 1 + TP]`` from its generator (seeded alike on the TP ranks).

1. Before any exchange, each rank draws a candidate id from ITS shard's softmax with
   uniform ``u[:, 1 + r]`` (:func:`~megatron_opd.rollout.sampling.draw`: its 16 most likely
   ids first, then the rest in id order);
2. one all-gather of its top-``k`` (values, global ids), ``m_r``, ``s_r``, candidate id and
   candidate logit per row;
3. every rank merges the same table into the global top-``k`` (value descending, lower id
   first) and ``lse``, and takes the candidate of the shard that ``u[:, 0]`` selects
   (inverse CDF over ``M_0, M_1, ...``).

``P(id) = M_r / sum M * p(id) / M_r = p(id)``: exact. The draws are not those of
:func:`~megatron_opd.rollout.sampling.sample_step` on the gathered row (another use of
the uniforms; the one-stage draw would need a second collective per step to tell the
ranks which id the owning shard drew); tests compare them with a single-process
two-stage reference and the softmax. Top-p needs the sorted vocabulary and is not done
here (the engine gathers the logits for it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_opd.ops.softmax_functions import combine_logsumexp
from megatron_opd.ops.topk_select import local_topk, merge_topk
from megatron_opd.rollout.sampling import HEAD, block_pick, block_sums, exp_minus_max


def vocab_parallel_sample_step(
    local_logits: torch.Tensor,
    *,
    temperature: float,
    generator: torch.Generator | None,
    vocab_size: int,
    tp_group: dist.ProcessGroup,
    top_k: int = 0,
    workspace: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:func:`~megatron_opd.rollout.sampling.sample_step` (``top_p = 1``) on this rank's
    ``[a, V_padded / TP]`` shard; the same four results on every rank of ``tp_group``.

    Args:
        local_logits: this rank's columns of the logits (any float dtype; Megatron's
            padding columns at ids >= ``vocab_size`` are never read).
        temperature: the sampling temperature (0 = greedy: the lowest id of the maximum).
        generator: the replica's generator, seeded alike on every rank of ``tp_group``.
        vocab_size: the real (unpadded) vocabulary size.
        tp_group: the tensor-parallel group the vocabulary is split over.
        top_k: student top-K to record, ``< vocab_size`` (0: none).
        workspace: ``[>= a, real columns of this shard]`` float32 scratch reused across
            steps (see :func:`~megatron_opd.rollout.sampling.shifted_exp`).
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
    # Ordered (value descending, lower id first): the draw's head needs that order.
    values, ids = merge_topk(*local_topk(scaled, k, start, local * size), k)
    row_max = values[:, :1]
    exp, _ = exp_minus_max(scaled, row_max, workspace)
    blocks = block_sums(exp)  # the draw's tail search reads them; their sum is s_r
    sums = blocks.sum(dim=-1, keepdim=True)
    # float32 carries every value here exactly, and the ids while they stay below 2**24.
    dtype = torch.float32 if local * size <= 2**24 else torch.float64
    # 1. This shard's candidate (greedy: the merged top-1 decides, no draw).
    candidate = torch.zeros(rows, 2, dtype=dtype, device=x.device)
    if temperature:
        u = torch.rand(rows, 1 + size, generator=generator, device=x.device)
        if valid:
            columns = _draw_in_shard(
                exp, blocks, sums, values, ids - start, u[:, 1 + rank :][:, :1]
            )
            candidate[:, 0] = columns + start
            candidate[:, 1] = scaled.gather(1, columns[:, None])[:, 0]
    # 2. One exchange: row max, sum exp(x - max), candidate, and the top-k values and ids
    # when the global top-k is needed (greedy, or a recorded top-K).
    sent = k if top_k or not temperature else 0
    parts = [row_max, sums, candidate, values[:, :sent], ids[:, :sent]]
    payload = torch.cat([part.to(dtype) for part in parts], dim=1)
    table = payload.new_empty(size * rows, payload.shape[1])
    dist.all_gather_into_tensor(table, payload, group=tp_group)
    table = table.view(size, rows, -1)  # [TP, a, 4 + 2 * sent]
    # 3. The same merge and choice on every rank.
    maxes, sums = table[:, :, 0].float(), table[:, :, 1].float()
    lse = combine_logsumexp(maxes, sums)[:, None]  # [a, 1]
    if sent:
        all_values = table[:, :, 4 : 4 + sent].permute(1, 0, 2).reshape(rows, size * sent)
        all_ids = table[:, :, 4 + sent :].permute(1, 0, 2).reshape(rows, size * sent)
        values, ids = merge_topk(all_values.float(), all_ids.long(), sent)
    if temperature:
        mass = (sums * (maxes - lse[:, 0]).exp()).nan_to_num_(0.0).cumsum_(dim=0)  # [TP, a]
        target = torch.minimum(u[:, 0], mass[-1] * (1 - 1e-6))
        owner = (mass <= target).sum(dim=0).clamp_(max=size - 1)  # first shard past u
        chosen = table[:, :, 2:4].gather(0, owner[None, :, None].expand(1, rows, 2))[0]
        next_ids, picked = chosen[:, 0].long(), chosen[:, 1].float()
    else:
        next_ids, picked = ids[:, 0], values[:, 0]
    log_probs = picked - lse[:, 0]
    if not top_k:
        return next_ids, log_probs, None, None
    return next_ids, log_probs, ids[:, :top_k], values[:, :top_k] - lse


def _draw_in_shard(exp, blocks, sums, values, columns, u):
    """``[a]`` columns drawn from this shard's softmax with uniforms ``u [a, 1]``.

    The order of :func:`~megatron_opd.rollout.sampling.draw` (the shard's 16 most likely
    first, then the rest in id order), in units of ``exp = exp(x - shift)``: the head's
    weights are ``exp`` at its columns, the rest is searched by blocks with the head left
    out of the block sums (no write into ``exp``).
    """
    h = min(HEAD, exp.shape[1])
    head = exp.gather(1, columns[:, :h])
    head_cdf = head.cumsum(dim=-1)
    mass = head_cdf[:, -1:]
    target = u * sums
    # right=True: the first id whose cumulative weight exceeds the target (never weight 0).
    pick = torch.searchsorted(head_cdf, torch.minimum(target, mass * (1 - 1e-6)), right=True)
    out = columns[:, :h].gather(1, pick.clamp(max=h - 1))[:, 0]
    tail = (target[:, 0] >= mass[:, 0]).nonzero()[:, 0]
    if h < exp.shape[1] and tail.numel():
        exclude = (columns[:, :h].index_select(0, tail), head.index_select(0, tail))
        rest = (target - mass).index_select(0, tail)
        picked, total = block_pick(exp, blocks, tail, rest, exclude)
        has_mass = total[:, 0] > 0
        out[tail[has_mass]] = picked[has_mass]
    return out
