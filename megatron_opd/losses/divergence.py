"""OPD losses that differentiate a divergence directly (no policy gradient).

All run over a handful of ids per position, with full-vocabulary log-probs gathered at
those ids (the vocabulary itself stays sharded and unseen here). A distribution over
the ids is either renormalised over them, or keeps the ids' probabilities and adds a
tail bucket holding ``1 - sum`` (``tail_bucket``), for teacher and student alike:

- forward KL over the teacher's top-K: ``KL(P_T || Q_s)`` (verl, NeMo-RL);
- generalised JSD (GKD): ``beta KL(P_T || M) + (1 - beta) KL(Q_s || M)`` with
  ``M = beta P_T + (1 - beta) Q_s``; ``beta = 0`` is ``KL(P_T || Q_s)`` and ``beta = 1``
  is ``KL(Q_s || P_T)`` (TRL's convention; these are the limits of JSD / beta and
  JSD / (1 - beta), not of JSD itself, which vanishes at both ends);
- reverse KL over the id set: ``KL(Q_s || P_T)``.

Each per-token divergence is multiplied by the loss weight and summed over valid tokens.
"""

from __future__ import annotations

import math

import torch

from megatron_opd.losses.common import (
    bucket_log_probs,
    check_token_tensors,
    finish,
    kl_divergence,
    masked_token_mean,
    token_weights,
)


def _prepare(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    id_mask: torch.Tensor | None,
    loss_weights: torch.Tensor | None,
    valid_mask: torch.Tensor,
    tail_bucket: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_token_tensors(
        {
            "student_log_probs": student_log_probs,
            "teacher_log_probs": teacher_log_probs,
            "id_mask": id_mask,
        },
        {"loss_weights": loss_weights, "valid_mask": valid_mask},
    )
    mask = (
        torch.ones_like(student_log_probs, dtype=torch.bool) if id_mask is None else id_mask.bool()
    )
    log_q, bucket_mask = bucket_log_probs(student_log_probs.float(), mask, tail_bucket)
    log_p, _ = bucket_log_probs(teacher_log_probs.detach().float(), mask, tail_bucket)
    return log_p, log_q, bucket_mask, token_weights(loss_weights, valid_mask)


def forward_topk_kl_loss(
    *,
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    loss_weights: torch.Tensor | None,
    valid_mask: torch.Tensor,
    tail_bucket: bool = True,
    id_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``KL(teacher || student)`` over the teacher's top-K.

    Args:
        student_log_probs: ``[b, s, K]`` current student log-probs at the teacher's
            top-K ids (grad).
        teacher_log_probs: ``[b, s, K]`` the teacher's top-K log-probs.
        loss_weights: ``[b, s]`` (None: 1 on valid tokens).
        valid_mask: ``[b, s]`` bool.
        tail_bucket: add the ``1 - sum`` bucket (else renormalise over the K ids).
        id_mask: ``[b, s, K]`` optional slot mask (default: all slots).
    """
    log_p, log_q, mask, lw = _prepare(
        student_log_probs, teacher_log_probs, id_mask, loss_weights, valid_mask, tail_bucket
    )
    kl = kl_divergence(log_p, log_q, mask)
    metrics = {"opd/forward_kl": masked_token_mean(kl.detach(), valid_mask)}
    return finish(kl * lw, valid_mask, metrics)


def gkd_jsd_loss(
    *,
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    loss_weights: torch.Tensor | None,
    valid_mask: torch.Tensor,
    beta: float = 0.5,
    tail_bucket: bool = True,
    id_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Generalised JSD(beta) over the teacher's top-K (shapes as
    :func:`forward_topk_kl_loss`)."""
    if not (math.isfinite(beta) and 0.0 <= beta <= 1.0):
        raise ValueError(f"loss.jsd_beta must be in [0, 1], got {beta}")
    log_p, log_q, mask, lw = _prepare(
        student_log_probs, teacher_log_probs, id_mask, loss_weights, valid_mask, tail_bucket
    )
    if beta == 0.0:
        jsd = kl_divergence(log_p, log_q, mask)
    elif beta == 1.0:
        jsd = kl_divergence(log_q, log_p, mask)
    else:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        jsd = beta * kl_divergence(log_p, log_m, mask) + (1.0 - beta) * kl_divergence(
            log_q, log_m, mask
        )
    metrics = {"opd/jsd": masked_token_mean(jsd.detach(), valid_mask)}
    return finish(jsd * lw, valid_mask, metrics)


def topk_reverse_kl_loss(
    *,
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    id_mask: torch.Tensor,
    loss_weights: torch.Tensor | None,
    valid_mask: torch.Tensor,
    tail_bucket: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``KL(student || teacher)`` over the id set, differentiated directly.

    Args:
        student_log_probs: ``[b, s, m]`` current student log-probs at the id set (grad).
        teacher_log_probs: ``[b, s, m]`` teacher log-probs there.
        id_mask: ``[b, s, m]`` bool slot mask of the id set.
        loss_weights: ``[b, s]`` (None: 1 on valid tokens).
        valid_mask: ``[b, s]`` bool.
        tail_bucket: add the ``1 - sum`` bucket (else renormalise over the set).
    """
    log_p, log_q, mask, lw = _prepare(
        student_log_probs, teacher_log_probs, id_mask, loss_weights, valid_mask, tail_bucket
    )
    kl = kl_divergence(log_q, log_p, mask)
    metrics = {"opd/reverse_kl": masked_token_mean(kl.detach(), valid_mask)}
    return finish(kl * lw, valid_mask, metrics)
