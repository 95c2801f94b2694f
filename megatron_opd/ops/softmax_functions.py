"""The differentiable vocab-parallel ops: autograd Functions and their per-chunk math.

All three work on flattened logits ``[N, V_local]`` (one rank's shard) and read only the
shard's real columns (``VocabShard.num_valid``); padding columns get a zero gradient.

- :class:`VocabParallelGather`: ``x[i, ids[i, j]]`` for ``x = logits / T``. The owning rank
  contributes the value, the others zero, one all-reduce. Backward: scatter to the owner.
- :class:`VocabParallelLogSoftmax`: ``(x at ids [N, n], logsumexp(x) [N])``. Per chunk a
  rank sends ``n + 2`` numbers per token (its values at owned ids, its max ``m_r`` and
  ``sum exp(x - m_r)``); ``lse = M + log sum_r s_r exp(m_r - M)``. Backward recomputes the
  softmax chunk by chunk from the saved logits (no ``[N, V]`` probabilities are stored):
  ``dx = softmax(x) * g_lse + onehot(ids) * g_ids``.
- :class:`VocabParallelEntropy`: ``H = lse - E_p[x]``; each rank also sends the first
  moment ``sum exp(x - m_r) (x - m_r)``. Backward: ``dH/dx = -p (log p + H)``.

``-inf`` logits are a mask (probability 0, zero gradient). NaN and ``+inf`` poison the
exchanged row (see :mod:`.shard`); a row that is ``-inf`` everywhere has no distribution and
is reported the same way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_opd.ops.shard import (
    VocabShard,
    all_gather_stacked,
    chunk_ranges,
    compute_dtype,
    raise_if_nonfinite,
    scaled_chunk,
)


def poisoned(values: torch.Tensor) -> torch.Tensor:
    """``[c]`` bool: entries that are NaN or ``+inf`` (``-inf`` is a legitimate mask)."""
    return torch.isnan(values) | (values == float("inf"))


def finite_or_zero(values: torch.Tensor) -> torch.Tensor:
    """Shift that keeps ``x - shift`` defined when a shard's row is all ``-inf``."""
    return torch.where(torch.isfinite(values), values, 0.0)


def combine_logsumexp(maxes: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """``[c]`` global log-sum-exp from per-rank ``maxes`` / ``sums`` ``[TP, c]``.

    A rank whose row is empty or all ``-inf`` has max ``-inf`` and sum 0 and adds nothing.
    """
    top = maxes.amax(dim=0)
    return top + torch.log((sums * torch.exp(maxes - finite_or_zero(top))).sum(dim=0))


def softmax_stats(x: torch.Tensor, writable: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(max [c], sum exp(x - max) [c])`` of this shard's ``x [c, v]`` (max -inf if empty)."""
    rows, width = x.shape
    if width == 0:
        return x.new_full((rows,), float("-inf")), x.new_zeros(rows)
    high = x.amax(dim=-1)
    shift = finite_or_zero(high)[:, None]
    shifted = x.sub_(shift) if writable else x - shift
    return high, shifted.exp_().sum(dim=-1)


def _local_columns(global_ids: torch.Tensor, shard: VocabShard):
    """Shard-local column of each id (0 where not owned) and the ownership mask."""
    local = global_ids - shard.vocab_start
    owned = (local >= 0) & (local < shard.num_valid)
    return torch.where(owned, local, 0), owned


def _gather_owned(x: torch.Tensor, cols: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
    """``x[i, cols[i, j]]`` where ``owned``, else 0; ``[c, n]``."""
    if x.shape[1] == 0:
        return x.new_zeros(cols.shape)
    return torch.where(owned, x.gather(1, cols), 0.0)


def gather_at_ids(flat: torch.Tensor, ids: torch.Tensor, shard: VocabShard, temperature: float):
    """:class:`VocabParallelGather`'s forward without autograd: ``(picked [N, n], local
    columns, owned)`` (a no-grad caller skips the autograd Function's own cost)."""
    cols, owned = _local_columns(ids, shard)
    dtype = compute_dtype(flat.dtype)
    picked = _gather_owned(flat[:, : shard.num_valid], cols, owned).to(dtype) / temperature
    if shard.distributed:
        dist.all_reduce(picked, group=shard.tp_group)
    raise_if_nonfinite(poisoned(picked).any(dim=-1), "logits (at global_ids)", shard)
    return picked, cols, owned


class VocabParallelGather(torch.autograd.Function):
    """``(logits / T)[i, ids[i, j]]`` ``[N, n]``; the gradient goes to the owning shard."""

    @staticmethod
    def forward(ctx, flat, ids, shard: VocabShard, temperature: float):
        picked, cols, owned = gather_at_ids(flat, ids, shard, temperature)
        ctx.save_for_backward(cols, owned)
        ctx.meta = (flat.shape, flat.dtype, temperature)
        return picked

    @staticmethod
    def backward(ctx, grad_picked):
        cols, owned = ctx.saved_tensors
        shape, dtype, temperature = ctx.meta
        grad = torch.zeros(shape, dtype=dtype, device=grad_picked.device)
        contribution = torch.where(owned, grad_picked / temperature, 0.0).to(dtype)
        grad.scatter_add_(1, cols, contribution)
        return grad, None, None, None


def _log_softmax_chunk(flat, lse, start: int, end: int, width: int, temperature: float):
    """``flat[start:end, :width] / temperature - lse[start:end, None]``, a fresh ``[c, width]``
    buffer the caller may overwrite (the backward passes recompute the softmax per chunk)."""
    x, writable = scaled_chunk(flat[start:end, :width], temperature)
    return x.sub_(lse[start:end, None]) if writable else x - lse[start:end, None]


class VocabParallelLogSoftmax(torch.autograd.Function):
    """``((logits / T) at ids [N, n], logsumexp(logits / T) [N])``, chunked."""

    @staticmethod
    def forward(ctx, flat, ids, shard: VocabShard, temperature: float, chunk_tokens: int):
        num_tokens, num_ids = ids.shape
        dtype = compute_dtype(flat.dtype)
        picked = torch.empty(num_tokens, num_ids, dtype=dtype, device=flat.device)
        lse = torch.empty(num_tokens, dtype=dtype, device=flat.device)
        bad = torch.zeros(num_tokens, dtype=torch.bool, device=flat.device)
        cols, owned = _local_columns(ids, shard)
        for start, end in chunk_ranges(num_tokens, chunk_tokens):
            x, writable = scaled_chunk(flat[start:end, : shard.num_valid], temperature)
            local = _gather_owned(x, cols[start:end], owned[start:end])
            local_max, local_sum = softmax_stats(x, writable)
            del x  # free this chunk's buffer before the next chunk allocates one
            packed = torch.cat([local, local_max[:, None], local_sum[:, None]], dim=1)
            packed = torch.where(poisoned(local_max)[:, None], float("nan"), packed)
            gathered = all_gather_stacked(packed, shard)  # [TP, c, n + 2]
            picked[start:end] = gathered[..., :num_ids].sum(dim=0)
            lse[start:end] = combine_logsumexp(gathered[..., num_ids], gathered[..., num_ids + 1])
            bad[start:end] = ~torch.isfinite(lse[start:end])
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
            shifted = _log_softmax_chunk(flat, lse, start, end, width, temperature)
            chunk_grad = shifted.exp_().mul_(grad_lse[start:end, None])
            if cols.shape[1]:
                owned_grad = torch.where(owned[start:end], grad_picked[start:end], 0.0)
                chunk_grad.scatter_add_(1, cols[start:end], owned_grad.to(chunk_grad.dtype))
            if temperature != 1.0:
                chunk_grad.div_(temperature)
            grad[start:end, :width] = chunk_grad
            del shifted, chunk_grad  # one chunk buffer alive at a time
        return grad, None, None, None, None


def _entropy_stats(x: torch.Tensor, writable: bool):
    """``(max, sum exp(x - max), sum exp(x - max) (x - max))``, each ``[c]``."""
    rows, width = x.shape
    if width == 0:
        return x.new_full((rows,), float("-inf")), x.new_zeros(rows), x.new_zeros(rows)
    high = x.amax(dim=-1)
    shift = finite_or_zero(high)[:, None]
    shifted = x.sub_(shift) if writable else x - shift
    # Masked (-inf) entries: exp gives 0, and 0 * finfo.min stays 0 where 0 * -inf is NaN.
    shifted.clamp_(min=torch.finfo(shifted.dtype).min)
    weights = shifted.exp()
    return high, weights.sum(dim=-1), weights.mul_(shifted).sum(dim=-1)


class VocabParallelEntropy(torch.autograd.Function):
    """Entropy of ``softmax(logits / T)`` per token ``[N]``, chunked."""

    @staticmethod
    def forward(ctx, flat, shard: VocabShard, temperature: float, chunk_tokens: int):
        num_tokens = flat.shape[0]
        dtype = compute_dtype(flat.dtype)
        entropy = torch.empty(num_tokens, dtype=dtype, device=flat.device)
        lse = torch.empty(num_tokens, dtype=dtype, device=flat.device)
        bad = torch.zeros(num_tokens, dtype=torch.bool, device=flat.device)
        for start, end in chunk_ranges(num_tokens, chunk_tokens):
            x, writable = scaled_chunk(flat[start:end, : shard.num_valid], temperature)
            high, local_sum, local_moment = _entropy_stats(x, writable)
            del x  # free this chunk's buffer before the next chunk allocates one
            packed = torch.stack([high, local_sum, local_moment], dim=1)
            packed = torch.where(poisoned(high)[:, None], float("nan"), packed)
            maxes, sums, moments = all_gather_stacked(packed, shard).unbind(dim=2)  # [TP, c]
            top = finite_or_zero(maxes.amax(dim=0))
            scale = torch.exp(maxes - top)
            # Move each rank's moment from its own max to the global one; a rank with
            # nothing (max -inf, sum 0) contributes nothing.
            moved = torch.where(scale > 0, (moments + (maxes - top) * sums) * scale, 0.0)
            total = (sums * scale).sum(dim=0)
            log_total = torch.log(total)
            lse[start:end] = top + log_total
            entropy[start:end] = log_total - moved.sum(dim=0) / total
            bad[start:end] = ~(torch.isfinite(lse[start:end]) & torch.isfinite(entropy[start:end]))
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
            log_p = _log_softmax_chunk(flat, lse, start, end, width, temperature)
            log_p.clamp_(min=torch.finfo(log_p.dtype).min)  # masked entries: p = 0, grad 0
            p = log_p.exp()
            # dH/dx_v = -p_v (log p_v + H)
            chunk_grad = p.mul_(log_p.add_(entropy[start:end, None]))
            chunk_grad.mul_((-grad_entropy[start:end] / temperature)[:, None])
            grad[start:end, :width] = chunk_grad
            del log_p, p, chunk_grad  # at most two chunk buffers alive at a time
        return grad, None, None, None
