"""Picking the next token from full-vocabulary logits: temperature, top-p, greedy.

Pure tensor code shared by every engine and by tests. Sampling draws from an explicit
``torch.Generator`` so that all tensor-parallel ranks of a replica, seeded alike and fed
identical (gathered) logits, draw identical tokens without a broadcast.
"""

from __future__ import annotations

import torch


def mask_vocab_padding(logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """``[a, V_padded]`` logits with Megatron's padding columns (ids >= vocab_size) at -inf."""
    if vocab_size is None or vocab_size >= logits.shape[-1]:
        return logits
    logits = logits.clone()
    logits[..., vocab_size:] = float("-inf")
    return logits


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely ids whose probability reaches ``top_p``.

    Args:
        logits: ``[a, V]`` float (already divided by the temperature).
        top_p: in (0, 1]; 1 keeps everything.

    Returns:
        ``[a, V]`` logits with the excluded ids at -inf. The most likely id is always
        kept, so a tiny ``top_p`` is greedy.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= top_p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next_tokens(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """``[a]`` int64 next ids from ``[a, V]`` float32 logits (temperature 0 = argmax)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    scaled = logits / temperature if temperature != 1.0 else logits
    return draw(top_p_filter(scaled, top_p), generator)


HEAD = 16
"""Ids a draw looks at first: the :data:`HEAD` most likely (see :func:`draw`)."""


def draw(
    scores: torch.Tensor,
    generator: torch.Generator | None,
    *,
    lse: torch.Tensor | None = None,
    head: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``[a]`` ids drawn from ``softmax(scores [a, v])``, one uniform per row.

    Inverse-CDF sampling over the ids ordered "the :data:`HEAD` most likely first (value
    descending, lower id first), then the rest in id order": exact for any order, and
    with this one the uniform ``u`` usually lands in the head, whose probabilities come
    from the top-K and the log-sum-exp that a decode step computes anyway. Only the rows
    whose ``u`` falls past the head's mass (for a peaked policy, few) pay one more exp
    and cumsum over their vocabulary. Per decode step at V = 151,936 this measured
    1.35-1.7x the floor (one top-K plus one log-sum-exp), where Gumbel-max (V uniforms,
    two logs) cost 3.6x it (``bench/rollout_bench.py``, docs/results.md). Draws do not
    depend on padding columns at -inf.

    Args:
        scores: ``[a, v]`` float logits (temperature applied; -inf ids are never drawn).
        generator: the replica's generator (tensor-parallel ranks seeded alike draw alike).
        lse: ``[a, 1]`` ``logsumexp(scores)`` when the caller has it.
        head: ``([a, h], [a, h])`` values and ids of the exact top-``h`` of ``scores``
            (:func:`~megatron_opd.ops.topk_select.exact_topk` order), ``h >= HEAD`` or
            the whole row, when the caller has it; only the first :data:`HEAD` are used.
    """
    from megatron_opd.ops.topk_select import exact_topk

    rows, width = scores.shape
    h = min(HEAD, width)
    if head is None:
        head = exact_topk(scores, h)
    values, ids = head[0][:, :h], head[1][:, :h]
    if lse is None:
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    u = torch.rand(rows, 1, generator=generator, dtype=scores.dtype, device=scores.device)
    head_cdf = (values - lse).exp().cumsum(dim=-1)
    mass = head_cdf[:, -1:]
    # right=True: the first id whose cumulative probability exceeds u (never a 0-prob id).
    pick = torch.searchsorted(head_cdf, torch.minimum(u, mass * (1 - 1e-6)), right=True)
    out = ids.gather(1, pick.clamp(max=h - 1))[:, 0]
    tail = (u[:, 0] >= mass[:, 0]).nonzero()[:, 0]
    if h < width and tail.numel():
        probs = (scores.index_select(0, tail) - lse.index_select(0, tail)).exp_()
        probs.scatter_(1, ids.index_select(0, tail), 0.0)
        tail_cdf = probs.cumsum_(dim=-1)
        rest = (u.index_select(0, tail) - mass.index_select(0, tail)).clamp(min=0)
        total = tail_cdf[:, -1:]
        picked = torch.searchsorted(tail_cdf, torch.minimum(rest, total * (1 - 1e-6)), right=True)
        # A tail with no mass left (u past the head only by rounding) keeps the head's pick.
        has_mass = total[:, 0] > 0
        out[tail[has_mass]] = picked[has_mass, 0].clamp(max=width - 1)
    return out


def sample_step(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
    vocab_size: int | None,
    top_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One decode step's vocabulary work on ``[a, V_padded]`` logits.

    Returns ``(ids [a], log_probs [a], topk_ids [a, k], topk_log_probs [a, k])`` (the last
    two None for ``top_k = 0``): the next ids (as :func:`sample_next_tokens`, same draws),
    their log-probs under the sampling policy ``log_softmax(logits / temperature)`` (the
    raw logits when greedy) and its exact top-K (value descending, lower id first; every
    id in id order when ``top_k`` is the vocabulary). Padding columns (ids >=
    ``vocab_size``) are never read: one logsumexp and one top-K over the real columns,
    plus the sampler's draws.
    """
    from megatron_opd.ops.topk_select import exact_topk

    width = logits.shape[-1]
    real = min(vocab_size or width, width)
    x = logits[:, :real].float()
    scaled = x / temperature if temperature not in (0.0, 1.0) else x
    lse = torch.logsumexp(scaled, dim=-1, keepdim=True)
    values = topk_ids = None
    if 0 < top_k < real:
        values, topk_ids = exact_topk(scaled, min(max(top_k, HEAD), real))
    if temperature == 0.0:
        ids = x.argmax(dim=-1)
    elif top_p < 1.0:
        ids = draw(top_p_filter(scaled, top_p), generator)
    else:
        ids = draw(scaled, generator, lse=lse, head=None if values is None else (values, topk_ids))
    log_probs = scaled.gather(1, ids[:, None])[:, 0] - lse[:, 0]
    if not top_k:
        return ids, log_probs, None, None
    if top_k >= real:
        topk_ids = torch.arange(top_k, device=x.device).expand(x.shape[0], top_k)
        return ids, log_probs, topk_ids, scaled - lse
    return ids, log_probs, topk_ids[:, :top_k], values[:, :top_k] - lse
