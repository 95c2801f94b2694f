"""Pieces shared by the OPD losses: input checks, masked distributions over a small id
set (with an optional tail bucket), KL between such distributions, the PPO clipped
surrogate, and the ``(loss, num_tokens, metrics)`` return of Megatron's loss contract.

Numerics: masked ids never produce NaN, not even in gradients. Masked entries are
replaced by finite values *before* any log/exp, and a row whose id set is empty (an
empty intersection is common) is computed on zeros and then masked out.
"""

from __future__ import annotations

import torch

_TINY = 1e-12
"""Smallest tail-bucket probability (a top-K mass that rounds to >= 1 leaves no tail)."""


def check_token_tensors(
    per_id: dict[str, torch.Tensor | None],
    per_token: dict[str, torch.Tensor | None],
) -> tuple[int, int]:
    """ValueError unless every per-id tensor is ``[b, s, m]`` with one shape and every
    per-token tensor is ``[b, s]``; returns ``(b, s)``."""
    reference_name, reference = None, None
    for name, tensor in per_id.items():
        if tensor is None:
            continue
        if tensor.dim() != 3:
            raise ValueError(f"{name} must be [b, s, m], got shape {tuple(tensor.shape)}")
        if reference is None:
            reference_name, reference = name, tensor
        elif tensor.shape != reference.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but {reference_name} has "
                f"{tuple(reference.shape)}; they must agree"
            )
    leading = None if reference is None else reference.shape[:2]
    for name, tensor in per_token.items():
        if tensor is None:
            continue
        if leading is None:
            reference_name, leading = name, tensor.shape
        if tensor.dim() != 2 or tensor.shape != leading:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, expected [b, s] = {tuple(leading)} "
                f"(from {reference_name})"
            )
    assert leading is not None
    return int(leading[0]), int(leading[1])


def token_weights(loss_weights: torch.Tensor | None, valid_mask: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` float32 loss weights, 0 off ``valid_mask`` (all 1 on it when None)."""
    valid = valid_mask.bool()
    if loss_weights is None:
        return valid.to(torch.float32)
    return torch.where(valid, loss_weights.to(torch.float32), 0.0)


def finish(
    per_token_loss: torch.Tensor, valid_mask: torch.Tensor, metrics: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(sum of per-token loss over valid tokens, num valid tokens as int32, metrics)``:
    Megatron's ``calculate_per_token_loss=True`` contract (token mean = loss / num)."""
    valid = valid_mask.bool()
    loss = torch.where(valid, per_token_loss, 0.0).sum()
    num_tokens = valid.sum().to(torch.int32)
    return loss, num_tokens, {k: v.detach() for k, v in metrics.items()}


def masked_token_mean(values: torch.Tensor, valid_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values [b, s]`` over valid tokens (0 when there are none)."""
    valid = valid_mask.bool()
    return torch.where(valid, values, 0.0).sum() / valid.sum().clamp(min=1)


def masked_log_softmax(log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``log_probs [.., m]`` renormalised over the True entries of ``mask``; 0 elsewhere
    (and everywhere on rows without a True entry)."""
    has_any = mask.any(dim=-1, keepdim=True)
    safe = torch.where(mask, log_probs, float("-inf"))
    safe = torch.where(has_any, safe, 0.0)
    return torch.where(mask, torch.log_softmax(safe, dim=-1), 0.0)


def bucket_log_probs(
    log_probs: torch.Tensor, mask: torch.Tensor, tail_bucket: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """A distribution over the masked ids of ``log_probs [.., m]`` (full-vocabulary
    log-probs at those ids).

    ``tail_bucket=False``: renormalised over the ids. ``tail_bucket=True``: the ids keep
    their probabilities and one extra bucket holds ``1 - sum(p)``.

    Returns ``(log_dist [.., m(+1)], bucket_mask [.., m(+1)])``; masked buckets hold 0.
    """
    if not tail_bucket:
        return masked_log_softmax(log_probs, mask), mask
    has_any = mask.any(dim=-1, keepdim=True)
    safe = torch.where(mask, log_probs, float("-inf"))
    safe = torch.where(has_any, safe, 0.0)
    mass_log = torch.where(has_any, torch.logsumexp(safe, dim=-1, keepdim=True), float("-inf"))
    tail = (-torch.expm1(mass_log)).clamp(min=_TINY).log()
    log_dist = torch.cat([torch.where(mask, log_probs, 0.0), tail], dim=-1)
    bucket_mask = torch.cat([mask, torch.ones_like(mask[..., :1])], dim=-1)
    return log_dist, bucket_mask


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``KL(P || Q) = sum_j p_j (log p_j - log q_j)`` over the masked buckets ``[.., m]``."""
    p = torch.where(mask, log_p.exp(), 0.0)
    return torch.where(mask, p * (log_p - log_q), 0.0).sum(dim=-1)


def ppo_clipped_surrogate(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    clip_ratio_c: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Elementwise PPO clipped surrogate (verl's form, dual clip for negative advantages).

        ratio = exp(clamp(log_probs - old_log_probs, -20, 20))
        l     = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high))
        l     = min(l, -A * clip_ratio_c)  where A < 0 (dual clip)

    Returns ``(loss, clipped, log_ratio)``, all shaped like the inputs and 0 / False off
    ``mask``; ``clipped`` marks elements where the clipped term is the active one.
    """
    log_ratio = torch.where(mask, log_probs - old_log_probs, 0.0).clamp(-20.0, 20.0)
    advantages = torch.where(mask, advantages, 0.0)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped_term = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped_term)
    if clip_ratio_c is not None:
        dual = torch.minimum(loss, -advantages * clip_ratio_c)
        loss = torch.where(advantages < 0, dual, loss)
    clipped = (clipped_term > unclipped) & mask
    return torch.where(mask, loss, 0.0), clipped, log_ratio
