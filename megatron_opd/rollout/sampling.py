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
    # Gumbel-max ("exponential race"): argmax(logit - log E) with E = -log U ~ Exp(1)
    # draws id j with probability softmax(logits)_j, like torch.multinomial, at a fraction
    # of its CPU cost per decode step (torch.rand is vectorised; multinomial and
    # exponential_ are not). U in [0, 1): E > 0, and U = 0 gives E = inf, a loss.
    filtered = top_p_filter(scaled, top_p)
    uniform = torch.rand(
        filtered.shape, generator=generator, dtype=filtered.dtype, device=filtered.device
    )
    return (filtered - uniform.log_().neg_().log_()).argmax(dim=-1)
