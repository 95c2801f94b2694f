"""Operations over logits whose vocabulary is sharded over a tensor-parallel group.

Megatron's output layer leaves each TP rank with ``[s, b, V/TP]`` (or ``[b, s, V/TP]``)
logits: rank ``r`` holds global ids ``[r * V/TP, (r + 1) * V/TP)``. On-policy distillation
needs, per token, the top-K ids and their log-probs, log-probs at arbitrary ids (the
sampled token, the other model's top-K), the log-sum-exp, the entropy and the overlap of
two top-K sets. Gathering the full vocabulary for that would move ``V`` values per token;
every op here moves ``O(K * TP)``:

- top-K: each rank takes its exact local top-K (ties to the lower id, see
  :mod:`.topk_select`), all-gathers the ``K * TP`` (value, id) candidates and keeps the best
  ``K`` under (value descending, id ascending): ``2 K TP`` values per token.
- log-sum-exp: each rank reduces its shard to ``(max m_r, sum exp(x - m_r))``; the pairs
  are all-gathered and combined, ``lse = M + log(sum_r s_r exp(m_r - M))``.
- values at ids: the owning rank contributes the value, the others zero, summed over ranks.
  The fused top-K + log-probs op sends ``2K + 1`` values per token and rank: the local max is
  already among its top-K candidates.

All ops flatten the leading dims to tokens and walk them in chunks, so the only fp32 copy is
one chunk (bf16 logits stay bf16 in memory). Megatron's padding ids (``>= vocab_size``) are
never read. ``temperature`` divides the logits first; outputs are float32 (float64 for
float64 input). The differentiable ops send the gradient to the shard that owns each entry,
assuming (as Megatron's cross entropy does) that every TP rank computes the same loss from
the replicated outputs. Each op is a collective: call it on every rank of ``tp_group`` with
the same token layout, ids and options; ``tp_group`` None or of size 1 means no
communication. Bad arguments raise the same ``ValueError`` on every rank (see
:mod:`.shard`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_opd.ops.shard import (
    VocabShard,
    all_gather_stacked,
    chunk_ranges,
    chunk_tokens_for,
    compute_dtype,
    make_shard,
    raise_if_nonfinite,
    scaled_chunk,
)
from megatron_opd.ops.topk_select import local_topk, merge_topk, topk_membership

# ---------------------------------------------------------------------------------------
# per-chunk math on one shard


def _softmax_stats(x: torch.Tensor, writable: bool):
    """``(max [c], sum exp(x - max) [c], non-finite [c] bool)`` of ``x [c, v]``."""
    rows, width = x.shape
    if width == 0:
        return (
            x.new_full((rows,), float("-inf")),
            x.new_zeros(rows),
            torch.zeros(rows, dtype=torch.bool, device=x.device),
        )
    low, high = torch.aminmax(x, dim=-1)
    bad = ~(torch.isfinite(low) & torch.isfinite(high))
    shifted = x.sub_(high[:, None]) if writable else x - high[:, None]
    return high, shifted.exp_().sum(dim=-1), bad


def _combine_logsumexp(maxes: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """``[c]`` global log-sum-exp from per-rank ``maxes``/``sums`` ``[TP, c]``."""
    top = maxes.amax(dim=0)
    return top + torch.log((sums * torch.exp(maxes - top)).sum(dim=0))


def _gather_owned(x: torch.Tensor, cols: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
    """``x[i, cols[i, j]]`` where ``owned``, else 0; ``[c, n]``."""
    if x.shape[1] == 0:
        return x.new_zeros(cols.shape)
    return torch.where(owned, x.gather(1, cols), 0.0)


def _local_columns(global_ids: torch.Tensor, shard: VocabShard):
    """Shard-local column of each id (0 where not owned) and the ownership mask."""
    local = global_ids - shard.vocab_start
    owned = (local >= 0) & (local < shard.num_valid)
    return torch.where(owned, local, 0), owned


# ---------------------------------------------------------------------------------------
# top-K (no gradient)


def _topk_impl(
    flat: torch.Tensor,
    shard: VocabShard,
    k: int,
    temperature: float,
    chunk_tokens: int,
    with_logsumexp: bool,
):
    num_tokens = flat.shape[0]
    dtype = compute_dtype(flat.dtype)
    values = torch.empty(num_tokens, k, dtype=dtype, device=flat.device)
    ids = torch.empty(num_tokens, k, dtype=torch.long, device=flat.device)
    lse = torch.empty(num_tokens, dtype=dtype, device=flat.device) if with_logsumexp else None
    bad = torch.zeros(num_tokens, dtype=torch.bool, device=flat.device)
    fill_id = shard.padded_vocab_size
    for start, end in chunk_ranges(num_tokens, chunk_tokens):
        x, writable = scaled_chunk(flat[start:end, : shard.num_valid], temperature)
        cand_values, cand_ids = local_topk(x, k, shard.vocab_start, fill_id)
        rows_bad = torch.zeros(end - start, dtype=torch.bool, device=flat.device)
        if x.shape[1]:
            # NaN shows up in topk (ranked largest), +inf too; -inf only in the minimum.
            real_max = cand_values[:, : min(k, x.shape[1])].amax(dim=-1)
            rows_bad = ~(torch.isfinite(x.amin(dim=-1)) & torch.isfinite(real_max))
        packed = cand_values
        if with_logsumexp:
            local_max = cand_values.amax(dim=-1)
            if x.shape[1]:
                shifted = x.sub_(local_max[:, None]) if writable else x - local_max[:, None]
                local_sum = shifted.exp_().sum(dim=-1)
            else:
                local_sum = x.new_zeros(end - start)
            packed = torch.cat([cand_values, local_sum[:, None]], dim=1)
        packed = torch.where(rows_bad[:, None], float("nan"), packed)
        gathered = all_gather_stacked(packed, shard)  # [TP, c, k (+1)]
        gathered_ids = all_gather_stacked(cand_ids, shard)  # [TP, c, k]
        bad[start:end] = torch.isnan(gathered).any(dim=2).any(dim=0)
        all_values = gathered[..., :k].permute(1, 0, 2).reshape(end - start, -1)
        all_ids = gathered_ids.permute(1, 0, 2).reshape(end - start, -1)
        values[start:end], ids[start:end] = merge_topk(all_values, all_ids, k)
        if with_logsumexp:
            lse[start:end] = _combine_logsumexp(gathered[..., :k].amax(dim=2), gathered[..., k])
    return values, ids, lse, bad


def vocab_parallel_topk(
    logits: torch.Tensor,
    k: int,
    tp_group: dist.ProcessGroup | None,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global top-``k`` of ``logits / temperature`` over the real vocabulary.

    Args:
        logits: ``[..., V_local]`` this rank's shard (e.g. ``[s, b, V/TP]``), any float dtype.
        k: entries to keep, ``1 <= k <= vocab_size``.
        tp_group: the tensor-parallel group the vocabulary is split over (None: unsplit).
        temperature: logits are divided by it first.
        vocab_size: real vocabulary; ids ``>= vocab_size`` (Megatron padding) never win.
            Default: the padded size ``V_local * TP``.
        chunk_size: tokens per chunk (default: ~16 MiB of fp32 per chunk).

    Returns:
        ``(values [..., k], global_ids [..., k])``, identical on every rank: the scaled
        logits sorted descending, ties broken toward the lower id (as a stable descending
        sort of the full vocabulary would). No gradient.
    """
    shard = make_shard(
        logits, tp_group, vocab_size=vocab_size, temperature=temperature, chunk_size=chunk_size, k=k
    )
    flat = logits.detach().reshape(-1, shard.local_size)
    values, ids, _, bad = _topk_impl(
        flat, shard, k, float(temperature), chunk_tokens_for(chunk_size, shard.local_size), False
    )
    raise_if_nonfinite(bad, "logits", shard)
    lead = logits.shape[:-1]
    return values.view(*lead, k), ids.view(*lead, k)


def vocab_parallel_topk_log_probs(
    logits: torch.Tensor,
    k: int,
    tp_group: dist.ProcessGroup | None,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` ids, their log-probs and the log-sum-exp in one pass over the shard.

    Same arguments as :func:`vocab_parallel_topk`. Communicates ``(2k + 1) * TP`` values
    per token.

    Returns:
        ``(log_probs [..., k], global_ids [..., k], logsumexp [...])`` of
        ``softmax(logits / temperature)`` over the real vocabulary, ids ordered as in
        :func:`vocab_parallel_topk`. No gradient (use :func:`vocab_parallel_log_probs` at
        these ids for a differentiable loss).
    """
    shard = make_shard(
        logits, tp_group, vocab_size=vocab_size, temperature=temperature, chunk_size=chunk_size, k=k
    )
    flat = logits.detach().reshape(-1, shard.local_size)
    values, ids, lse, bad = _topk_impl(
        flat, shard, k, float(temperature), chunk_tokens_for(chunk_size, shard.local_size), True
    )
    raise_if_nonfinite(bad, "logits", shard)
    lead = logits.shape[:-1]
    return (values - lse[:, None]).view(*lead, k), ids.view(*lead, k), lse.view(lead)


def topk_overlap(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    k: int,
    tp_group: dist.ProcessGroup | None,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlap of the student's and the teacher's top-``k`` sets per token.

    Args:
        student_logits: ``[..., V_local]`` student shard.
        teacher_logits: ``[..., V_local]`` teacher shard, same shape (same vocabulary).
        k, tp_group, temperature, vocab_size, chunk_size: as in :func:`vocab_parallel_topk`.

    Returns:
        ``(overlap_ratio [...] float32 = |S ∩ T| / k, in_teacher [..., k] bool)``;
        ``in_teacher[..., j]`` says whether the student's j-th top id (in
        :func:`vocab_parallel_topk` order) is among the teacher's top-``k``. A caller that
        already has both id sets uses :func:`topk_membership` instead.
    """
    student = make_shard(
        student_logits,
        tp_group,
        name="student_logits",
        vocab_size=vocab_size,
        temperature=temperature,
        chunk_size=chunk_size,
        k=k,
    )
    make_shard(
        teacher_logits,
        tp_group,
        name="teacher_logits",
        vocab_size=vocab_size,
        temperature=temperature,
        chunk_size=chunk_size,
        k=k,
    )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} differ; the student and the teacher must share one "
            "(equally padded) vocabulary and the same token layout"
        )
    chunk_tokens = chunk_tokens_for(chunk_size, student.local_size)
    lead = student_logits.shape[:-1]
    ids = []
    for name, logits in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        flat = logits.detach().reshape(-1, student.local_size)
        _, model_ids, _, bad = _topk_impl(flat, student, k, float(temperature), chunk_tokens, False)
        raise_if_nonfinite(bad, name, student)
        ids.append(model_ids.view(*lead, k))
    return topk_membership(ids[0], ids[1])


# ---------------------------------------------------------------------------------------
# differentiable ops


class _VocabParallelGather(torch.autograd.Function):
    """``logits[..., ids] / T`` over shards; the gradient goes to the owning shard."""

    @staticmethod
    def forward(ctx, flat, ids, shard, temperature):
        cols, owned = _local_columns(ids, shard)
        dtype = compute_dtype(flat.dtype)
        picked = _gather_owned(flat[:, : shard.num_valid], cols, owned).to(dtype) / temperature
        if shard.distributed:
            dist.all_reduce(picked, group=shard.tp_group)
        raise_if_nonfinite(~torch.isfinite(picked).all(dim=-1), "logits (at global_ids)", shard)
        ctx.save_for_backward(cols, owned)
        ctx.meta = (flat.shape, flat.dtype, shard, temperature)
        return picked

    @staticmethod
    def backward(ctx, grad_picked):
        cols, owned = ctx.saved_tensors
        shape, dtype, shard, temperature = ctx.meta
        grad = torch.zeros(shape, dtype=dtype, device=grad_picked.device)
        contribution = torch.where(owned, grad_picked / temperature, 0.0).to(dtype)
        grad.scatter_add_(1, cols, contribution)
        return grad, None, None, None


class _VocabParallelLogSoftmax(torch.autograd.Function):
    """``(logits[..., ids] / T [N, n], logsumexp(logits / T) [N])``, chunked, differentiable."""

    @staticmethod
    def forward(ctx, flat, ids, shard, temperature, chunk_tokens):
        num_tokens, num_ids = ids.shape
        dtype = compute_dtype(flat.dtype)
        picked = torch.empty(num_tokens, num_ids, dtype=dtype, device=flat.device)
        lse = torch.empty(num_tokens, dtype=dtype, device=flat.device)
        bad = torch.zeros(num_tokens, dtype=torch.bool, device=flat.device)
        cols, owned = _local_columns(ids, shard)
        for start, end in chunk_ranges(num_tokens, chunk_tokens):
            x, writable = scaled_chunk(flat[start:end, : shard.num_valid], temperature)
            local = _gather_owned(x, cols[start:end], owned[start:end])
            local_max, local_sum, rows_bad = _softmax_stats(x, writable)
            packed = torch.cat([local, local_max[:, None], local_sum[:, None]], dim=1)
            packed = torch.where(rows_bad[:, None], float("nan"), packed)
            gathered = all_gather_stacked(packed, shard)  # [TP, c, n + 2]
            bad[start:end] = torch.isnan(gathered).any(dim=2).any(dim=0)
            picked[start:end] = gathered[..., :num_ids].sum(dim=0)
            lse[start:end] = _combine_logsumexp(gathered[..., num_ids], gathered[..., num_ids + 1])
        raise_if_nonfinite(bad, "logits", shard)
        ctx.save_for_backward(flat, cols, owned, lse)
        ctx.meta = (shard, temperature, chunk_tokens)
        return picked, lse

    @staticmethod
    def backward(ctx, grad_picked, grad_lse):
        flat, cols, owned, lse = ctx.saved_tensors
        shard, temperature, chunk_tokens = ctx.meta
        grad = torch.zeros_like(flat)
        width = shard.num_valid
        for start, end in chunk_ranges(flat.shape[0], chunk_tokens):
            if width == 0:
                break
            x, writable = scaled_chunk(flat[start:end, :width], temperature)
            # d lse / d x = softmax(x); d picked / d x = one-hot at the owned ids.
            shifted = x.sub_(lse[start:end, None]) if writable else x - lse[start:end, None]
            chunk_grad = shifted.exp_().mul_(grad_lse[start:end, None])
            if cols.shape[1]:
                owned_grad = torch.where(owned[start:end], grad_picked[start:end], 0.0)
                chunk_grad.scatter_add_(1, cols[start:end], owned_grad.to(chunk_grad.dtype))
            if temperature != 1.0:
                chunk_grad.div_(temperature)
            grad[start:end, :width] = chunk_grad
        return grad, None, None, None, None


class _VocabParallelEntropy(torch.autograd.Function):
    """Entropy of ``softmax(logits / T)`` per token ``[N]``, chunked, differentiable."""

    @staticmethod
    def forward(ctx, flat, shard, temperature, chunk_tokens):
        num_tokens = flat.shape[0]
        dtype = compute_dtype(flat.dtype)
        entropy = torch.empty(num_tokens, dtype=dtype, device=flat.device)
        lse = torch.empty(num_tokens, dtype=dtype, device=flat.device)
        bad = torch.zeros(num_tokens, dtype=torch.bool, device=flat.device)
        for start, end in chunk_ranges(num_tokens, chunk_tokens):
            x, writable = scaled_chunk(flat[start:end, : shard.num_valid], temperature)
            rows = end - start
            if x.shape[1]:
                low, high = torch.aminmax(x, dim=-1)
                rows_bad = ~(torch.isfinite(low) & torch.isfinite(high))
                shifted = x.sub_(high[:, None]) if writable else x - high[:, None]
                weights = shifted.exp()
                local_sum = weights.sum(dim=-1)
                # sum_v exp(x_v - m) (x_v - m): the exp-weighted mean's numerator.
                local_moment = weights.mul_(shifted).sum(dim=-1)
            else:
                high = x.new_full((rows,), float("-inf"))
                local_sum = local_moment = x.new_zeros(rows)
                rows_bad = torch.zeros(rows, dtype=torch.bool, device=flat.device)
            packed = torch.stack([high, local_sum, local_moment], dim=1)
            packed = torch.where(rows_bad[:, None], float("nan"), packed)
            gathered = all_gather_stacked(packed, shard)  # [TP, c, 3]
            bad[start:end] = torch.isnan(gathered).any(dim=2).any(dim=0)
            maxes, sums, moments = gathered.unbind(dim=2)
            top = maxes.amax(dim=0)
            scale = torch.exp(maxes - top)
            # Shift each rank's moment from its own max to the global one; empty shards
            # (max -inf, sum 0) contribute nothing.
            shifted_moments = torch.where(scale > 0, (moments + (maxes - top) * sums) * scale, 0.0)
            total = (sums * scale).sum(dim=0)
            log_total = torch.log(total)
            lse[start:end] = top + log_total
            entropy[start:end] = log_total - shifted_moments.sum(dim=0) / total
        raise_if_nonfinite(bad, "logits", shard)
        ctx.save_for_backward(flat, lse, entropy)
        ctx.meta = (shard, temperature, chunk_tokens)
        return entropy

    @staticmethod
    def backward(ctx, grad_entropy):
        flat, lse, entropy = ctx.saved_tensors
        shard, temperature, chunk_tokens = ctx.meta
        grad = torch.zeros_like(flat)
        width = shard.num_valid
        for start, end in chunk_ranges(flat.shape[0], chunk_tokens):
            if width == 0:
                break
            x, writable = scaled_chunk(flat[start:end, :width], temperature)
            # dH/dx_v = -p_v (log p_v + H)
            log_p = x.sub_(lse[start:end, None]) if writable else x - lse[start:end, None]
            p = log_p.exp()
            chunk_grad = p.mul_(log_p.add_(entropy[start:end, None]))
            chunk_grad.mul_((-grad_entropy[start:end] / temperature)[:, None])
            grad[start:end, :width] = chunk_grad
        return grad, None, None, None


def vocab_parallel_gather(
    logits: torch.Tensor,
    global_ids: torch.Tensor,
    tp_group: dist.ProcessGroup | None,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """``logits / temperature`` at arbitrary global ids, differentiable.

    Args:
        logits: ``[..., V_local]`` this rank's shard.
        global_ids: ``[..., n]`` integer ids in ``[0, vocab_size)``, same leading dims,
            identical on every rank.

    Returns:
        ``[..., n]`` float32 values, identical on every rank. The gradient of each entry
        lands on the shard that owns its id only. Reads ``n`` values per token (no pass
        over the shard); communicates ``n`` values per token.
    """
    shard = make_shard(
        logits,
        tp_group,
        vocab_size=vocab_size,
        temperature=temperature,
        chunk_size=None,
        global_ids=global_ids,
    )
    flat = logits.reshape(-1, shard.local_size)
    ids = global_ids.reshape(flat.shape[0], global_ids.shape[-1]).long()
    picked = _VocabParallelGather.apply(flat, ids, shard, float(temperature))
    return picked.view(global_ids.shape)


def vocab_parallel_logsumexp(
    logits: torch.Tensor,
    tp_group: dist.ProcessGroup | None,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``logsumexp(logits / temperature)`` over the real vocabulary, ``[...]``, differentiable.

    ``logits`` is ``[..., V_local]``; the result is identical on every rank.
    Communicates ``2 * TP`` values per token.
    """
    shard = make_shard(
        logits, tp_group, vocab_size=vocab_size, temperature=temperature, chunk_size=chunk_size
    )
    flat = logits.reshape(-1, shard.local_size)
    no_ids = torch.empty(flat.shape[0], 0, dtype=torch.long, device=flat.device)
    _, lse = _VocabParallelLogSoftmax.apply(
        flat, no_ids, shard, float(temperature), chunk_tokens_for(chunk_size, shard.local_size)
    )
    return lse.view(logits.shape[:-1])


def vocab_parallel_log_probs(
    logits: torch.Tensor,
    global_ids: torch.Tensor,
    tp_group: dist.ProcessGroup | None,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``log_softmax(logits / temperature)`` at global ids, ``[..., n]``, differentiable.

    Args:
        logits: ``[..., V_local]`` this rank's shard.
        global_ids: ``[..., n]`` ids in ``[0, vocab_size)``, same leading dims, identical
            on every rank (e.g. ``tokens[..., None]`` for the sampled token: then this is
            minus Megatron's ``vocab_parallel_cross_entropy``).

    Communicates ``(n + 2) * TP`` values per token; one pass over the shard forward and
    one backward (the softmax is recomputed per chunk, not stored).
    """
    shard = make_shard(
        logits,
        tp_group,
        vocab_size=vocab_size,
        temperature=temperature,
        chunk_size=chunk_size,
        global_ids=global_ids,
    )
    flat = logits.reshape(-1, shard.local_size)
    ids = global_ids.reshape(flat.shape[0], global_ids.shape[-1]).long()
    picked, lse = _VocabParallelLogSoftmax.apply(
        flat, ids, shard, float(temperature), chunk_tokens_for(chunk_size, shard.local_size)
    )
    return (picked - lse[:, None]).view(global_ids.shape)


def vocab_parallel_entropy(
    logits: torch.Tensor,
    tp_group: dist.ProcessGroup | None,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` over the real vocabulary, ``[...]``.

    Differentiable; communicates ``3 * TP`` values per token.
    """
    shard = make_shard(
        logits, tp_group, vocab_size=vocab_size, temperature=temperature, chunk_size=chunk_size
    )
    flat = logits.reshape(-1, shard.local_size)
    entropy = _VocabParallelEntropy.apply(
        flat, shard, float(temperature), chunk_tokens_for(chunk_size, shard.local_size)
    )
    return entropy.view(logits.shape[:-1])
