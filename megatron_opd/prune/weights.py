"""Monotone reliability weights from drift events (the core of Prune-OPD).

Every drift event on a valid token lowers the weight of that token and of all later
ones by ``w_drop``; the weight never recovers:

    w[t]  = clamp(1 - w_drop * cumsum(bad & valid)[t], 0, 1),   0 on padding
    lw[t] = w[t] + w_base                                       on valid tokens, else 0

``lw`` multiplies the per-token loss (or reward). The effective (reliable) length is
the number of valid tokens with ``w > positive_eps``; once ``w`` reaches 0 and
``w_base == 0`` nothing later in the sequence can affect training, which is what the
online stopper and the trimming plan exploit.

The arithmetic from running counts is one helper, :func:`weights_from_counts`, shared
with :class:`~megatron_opd.prune.online_stop.OnlineStopper` so the streaming and the
whole-sequence results are bitwise equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(kw_only=True)
class ReliabilityWeights:
    """Weights of one batch of sequences."""

    weights: torch.Tensor
    """``[b, s]`` float32: monotone non-increasing weights in [0, 1]; 0 off valid tokens."""

    loss_weights: torch.Tensor
    """``[b, s]`` float32: ``weights + w_base`` on valid tokens, 0 elsewhere."""

    effective_length: torch.Tensor
    """``[b]`` int64: valid tokens with weight > ``positive_eps``."""

    num_bad_events: torch.Tensor
    """``[b]`` int64: drift events on valid tokens."""


def check_weight_params(w_drop: float, w_base: float) -> None:
    """ValueError unless ``w_drop`` and ``w_base`` are finite and >= 0."""
    for name, value in (("w_drop", w_drop), ("w_base", w_base)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"prune.{name} must be a finite number >= 0, got {value}")


def weights_from_counts(cumulative_bad: torch.Tensor, w_drop: float) -> torch.Tensor:
    """float32 ``clamp(1 - w_drop * cumulative_bad, 0, 1)`` for an int count tensor."""
    return (1.0 - w_drop * cumulative_bad.to(torch.float32)).clamp(0.0, 1.0)


def reliability_weights(
    bad_events: torch.Tensor,
    valid_mask: torch.Tensor,
    w_drop: float,
    w_base: float,
    *,
    positive_eps: float = 1e-8,
) -> ReliabilityWeights:
    """Weights, loss weights and effective lengths of a batch.

    Args:
        bad_events: ``[b, s]`` bool, drift events (ignored off ``valid_mask``).
        valid_mask: ``[b, s]`` bool, True on response tokens.
        w_drop: weight lost per drift event (>= 0).
        w_base: constant added to the weight on valid tokens (>= 0).
        positive_eps: weights above this count towards the effective length.
    """
    check_weight_params(w_drop, w_base)
    if bad_events.shape != valid_mask.shape or bad_events.dim() != 2:
        raise ValueError(
            f"bad_events {tuple(bad_events.shape)} and valid_mask {tuple(valid_mask.shape)} "
            "must both be [b, s]"
        )
    valid = valid_mask.bool()
    bad = bad_events.bool() & valid
    cumulative_bad = bad.to(torch.int64).cumsum(dim=-1)
    weights = torch.where(valid, weights_from_counts(cumulative_bad, w_drop), 0.0)
    loss_weights = torch.where(valid, weights + w_base, 0.0)
    effective_length = (valid & (weights > positive_eps)).sum(dim=-1)
    return ReliabilityWeights(
        weights=weights,
        loss_weights=loss_weights,
        effective_length=effective_length,
        num_bad_events=bad.sum(dim=-1),
    )
