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
    return _gumbel_argmax(top_p_filter(scaled, top_p), generator, logits.shape[-1])


def _gumbel_argmax(scores: torch.Tensor, generator, width: int) -> torch.Tensor:
    """``[a]`` ids drawn from ``softmax(scores [a, v])``.

    Gumbel-max ("exponential race"): argmax(score - log E) with E = -log U ~ Exp(1) draws
    id j with probability softmax(scores)_j, like torch.multinomial, at a fraction of its
    CPU cost per decode step (torch.rand is vectorised; multinomial and exponential_ are
    not). U in [0, 1): E > 0, and U = 0 gives E = inf, a loss. The uniforms are drawn for
    ``width >= v`` columns (the padded vocabulary) so the draws do not depend on how many
    padding columns a caller cut off.
    """
    uniform = torch.rand(
        scores.shape[0], width, generator=generator, dtype=scores.dtype, device=scores.device
    )[:, : scores.shape[-1]]
    return (scores - uniform.log_().neg_().log_()).argmax(dim=-1)


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
    if temperature == 0.0:
        ids = x.argmax(dim=-1)
    else:
        ids = _gumbel_argmax(top_p_filter(scaled, top_p), generator, width)
    lse = torch.logsumexp(scaled, dim=-1, keepdim=True)
    log_probs = scaled.gather(1, ids[:, None])[:, 0] - lse[:, 0]
    if not top_k:
        return ids, log_probs, None, None
    if top_k >= real:
        topk_ids = torch.arange(top_k, device=x.device).expand(x.shape[0], top_k)
        return ids, log_probs, topk_ids, scaled - lse
    values, topk_ids = exact_topk(scaled, top_k)
    return ids, log_probs, topk_ids, values - lse
