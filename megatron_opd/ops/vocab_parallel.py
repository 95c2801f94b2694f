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
one chunk (bf16 logits stay bf16 in memory; a non-contiguous view such as a transposed
``[b, s, V/TP]`` is copied once by the flattening, so pass Megatron's contiguous output).
Megatron's padding ids (``>= vocab_size``) are never read. ``temperature`` divides the
logits first; outputs are float32 (float64 for float64 input). The differentiable ops send
the gradient to the shard that owns each entry, assuming (as Megatron's cross entropy does)
that every TP rank computes the same loss from the replicated outputs.

``-inf`` logits mark masked ids (probability 0, never in a top-K); NaN, ``+inf``, a token
with every id masked or with fewer than ``k`` unmasked ids raise ``ValueError``. Each op is
a collective: call it on every rank of ``tp_group`` with the same token layout, ids and
options; ``tp_group`` None or of size 1 means no communication. Bad arguments raise the same
``ValueError`` on every rank (see :mod:`.shard`).
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
from megatron_opd.ops.softmax_functions import (
    VocabParallelEntropy,
    VocabParallelGather,
    VocabParallelLogSoftmax,
    combine_logsumexp,
    finite_or_zero,
    gather_at_ids,
    poisoned,
)
from megatron_opd.ops.topk_select import local_topk, merge_topk, topk_membership

# ---------------------------------------------------------------------------------------
# top-K (no gradient)


_SHORT_FLOATS = (torch.bfloat16, torch.float16)


def _local_candidates(
    raw: torch.Tensor, k: int, shard: VocabShard, temperature: float, with_logsumexp: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """This shard's part of a top-K exchange for one chunk ``raw [c, v]`` (real columns).

    Returns ``(packed [c, k (+1)], ids [c, k])``: the local top-``k`` scaled values (and,
    with ``with_logsumexp``, ``sum exp(x - local max)``), NaN on rows holding NaN / +inf.
    A function of its own so every chunk-sized temporary is freed on return.
    """
    dtype = compute_dtype(raw.dtype)
    # bf16/fp16 are ranked as stored: dividing them by T in fp32 keeps both their order
    # and their ties (their spacing is far above fp32 rounding), so no fp32 copy is made.
    if temperature == 1.0 or raw.dtype in _SHORT_FLOATS:
        ranked = raw
    else:
        ranked = raw / temperature
    ranked_values, ids = local_topk(ranked, k, shard.vocab_start, shard.padded_vocab_size)
    values = ranked_values.to(dtype)
    if ranked is raw and temperature != 1.0:
        values = values / temperature
    # NaN ranks above everything in torch.topk, so a poisoned row shows it here.
    rows_bad = poisoned(values).any(dim=-1)
    packed = values
    if with_logsumexp:
        # One torch.logsumexp pass over the shard (the floor of this op is that and the
        # top-K); the exchanged ``sum exp(x - local max)`` follows from it exactly enough
        # (lse - max is in [0, log V]). Short floats are summed in fp32.
        x = scaled_chunk(raw, temperature)[0] if raw.dtype in _SHORT_FLOATS else ranked
        local_max = finite_or_zero(values.amax(dim=-1))
        sums = torch.exp(torch.logsumexp(x, dim=-1) - local_max)
        packed = torch.cat([values, sums[:, None]], dim=1)
    return torch.where(rows_bad[:, None], float("nan"), packed), ids


def _topk_impl(
    flat: torch.Tensor,
    shard: VocabShard,
    k: int,
    temperature: float,
    chunk_tokens: int,
    with_logsumexp: bool,
):
    """Chunked global top-``k`` of ``flat [N, V_local] / temperature``.

    Every chunk's local candidates (``[c, k (+1)]`` values and ids) are kept, and all of
    them are exchanged in ONE all-gather at the end: the per-chunk collectives would cost
    a communication round trip per ~16 MiB chunk, often more than the chunk's top-K. The
    ids travel inside the float payload when the compute dtype holds them exactly.

    Returns ``(values [N, k], ids [N, k], logsumexp [N] or None, bad [N])``; ``bad`` is
    identical on every rank (NaN / +inf, or fewer than ``k`` entries above ``-inf``).
    """
    num_tokens = flat.shape[0]
    dtype = compute_dtype(flat.dtype)
    width = k + 1 if with_logsumexp else k
    packed = torch.empty(num_tokens, width, dtype=dtype, device=flat.device)
    cand_ids = torch.empty(num_tokens, k, dtype=torch.long, device=flat.device)
    for start, end in chunk_ranges(num_tokens, chunk_tokens):
        packed[start:end], cand_ids[start:end] = _local_candidates(
            flat[start:end, : shard.num_valid], k, shard, temperature, with_logsumexp
        )
    # float32 holds every integer up to 2**24, float64 up to 2**53.
    exact_ids = shard.padded_vocab_size <= (2**24 if dtype == torch.float32 else 2**53)
    if not shard.distributed:  # one shard: nothing to exchange, no payload to pack
        gathered, gathered_ids = packed[None], cand_ids[None]
    elif exact_ids:
        payload = torch.cat([packed, cand_ids.to(dtype)], dim=1)
        gathered_all = all_gather_stacked(payload, shard)  # [TP, N, width + k]
        gathered = gathered_all[..., :width]
        gathered_ids = gathered_all[..., width:].long()
    else:
        gathered = all_gather_stacked(packed, shard)  # [TP, N, k (+1)]
        gathered_ids = all_gather_stacked(cand_ids, shard)  # [TP, N, k]
    candidates = gathered.shape[0] * k
    all_values = gathered[..., :k].permute(1, 0, 2).reshape(num_tokens, candidates)
    all_ids = gathered_ids.permute(1, 0, 2).reshape(num_tokens, candidates)
    values, ids = merge_topk(all_values, all_ids, k)
    bad = torch.isnan(gathered).any(dim=2).any(dim=0)
    bad |= (values == float("-inf")).any(dim=-1)
    lse = None
    if with_logsumexp:
        lse = combine_logsumexp(gathered[..., :k].amax(dim=2), gathered[..., k])
        bad |= ~torch.isfinite(lse)
    return values, ids, lse, bad


def _checked_topk(logits, k, tp_group, temperature, vocab_size, chunk_size, with_logsumexp):
    """:func:`_topk_impl` over every token of ``logits [..., V_local]``, arguments checked.

    Returns ``(values [N, k], ids [N, k], logsumexp [N] or None)``; raises on bad rows.
    """
    shard = make_shard(
        logits, tp_group, vocab_size=vocab_size, temperature=temperature, chunk_size=chunk_size, k=k
    )
    flat = logits.detach().reshape(-1, shard.local_size)
    chunk_tokens = chunk_tokens_for(chunk_size, shard.local_size)
    values, ids, lse, bad = _topk_impl(
        flat, shard, k, float(temperature), chunk_tokens, with_logsumexp
    )
    raise_if_nonfinite(bad, "logits", shard)
    return values, ids, lse


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
    values, ids, _ = _checked_topk(
        logits, k, tp_group, temperature, vocab_size, chunk_size, with_logsumexp=False
    )
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
    values, ids, lse = _checked_topk(
        logits, k, tp_group, temperature, vocab_size, chunk_size, with_logsumexp=True
    )
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


def _flat_and_ids(logits, global_ids, tp_group, temperature, vocab_size, chunk_size):
    """Checked ``(shard, flat logits [N, V_local], ids [N, n] long)`` of an op at ids."""
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
    return shard, flat, ids


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
    shard, flat, ids = _flat_and_ids(logits, global_ids, tp_group, temperature, vocab_size, None)
    if torch.is_grad_enabled() and flat.requires_grad:
        picked = VocabParallelGather.apply(flat, ids, shard, float(temperature))
    else:  # the same forward without the autograd Function's cost (scoring, no grad)
        picked = gather_at_ids(flat, ids, shard, float(temperature))[0]
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
    _, lse = VocabParallelLogSoftmax.apply(
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
    shard, flat, ids = _flat_and_ids(
        logits, global_ids, tp_group, temperature, vocab_size, chunk_size
    )
    picked, lse = VocabParallelLogSoftmax.apply(
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
    entropy = VocabParallelEntropy.apply(
        flat, shard, float(temperature), chunk_tokens_for(chunk_size, shard.local_size)
    )
    return entropy.view(logits.shape[:-1])
