"""OPD as policy gradient: a teacher-derived reward used directly as the PPO advantage.

Top-K reverse-KL reward (the authors' release, "only_stu" / "student_p" by default). At
each response position t and each id j of the id set (see ``id_set.py``):

    r[t, j] = -(log pi_s_old(j) - log pi_T(j)) * w[t, j] * lw[t]

where ``pi_s_old`` are the rollout-time student log-probs (detached), ``w`` the
softmax over the (masked) id set of the rollout-time student log-probs (``student_p``),
of the teacher log-probs (``teacher_p``), or ``1 / |set|`` (``none``), and ``lw`` the Prune-OPD
loss weight. No critic, no group baseline: ``A = r``. The loss is the PPO clipped
surrogate of the *current* student log-probs at the same ids against the old ones,
summed over the id set and token-mean aggregated (Megatron divides the returned sum by
the number of valid tokens).

Sampled-token reverse KL (Thinking Machines / slime form): the same surrogate on the
sampled token's log-prob with ``A[t] = lw[t] * r[t]``,

    k1: r = log pi_T(x_t) - log pi_s_old(x_t)
    k3: r = -(exp(d) - 1 - d),  d = log pi_T(x_t) - log pi_s_old(x_t)

Multiplying the advantage by ``lw >= 0`` is the same as multiplying the per-token loss
by it: the clipped surrogate is positively homogeneous in ``A``.
"""

from __future__ import annotations

import torch

from megatron_opd.losses.common import (
    check_token_tensors,
    finish,
    masked_log_softmax,
    masked_token_mean,
    ppo_clipped_surrogate,
    token_weights,
)

REWARD_WEIGHTS = ("student_p", "teacher_p", "none")


def topk_rewards(
    *,
    old_student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    id_mask: torch.Tensor,
    loss_weights: torch.Tensor | None,
    valid_mask: torch.Tensor,
    reward_weight: str = "student_p",
) -> torch.Tensor:
    """``[b, s, m]`` detached advantages of the top-K reverse-KL reward (module essay);
    0 on masked ids and off valid tokens."""
    if reward_weight not in REWARD_WEIGHTS:
        raise ValueError(
            f"loss.reward_weight must be one of {list(REWARD_WEIGHTS)}, got {reward_weight!r}"
        )
    old = old_student_log_probs.detach().float()
    teacher = teacher_log_probs.detach().float()
    mask = id_mask.bool()
    if reward_weight == "student_p":
        weight = masked_log_softmax(old, mask).exp()
    elif reward_weight == "teacher_p":
        weight = masked_log_softmax(teacher, mask).exp()
    else:  # uniform over the id set: the release's softmax of zeros, 1 / |set|
        weight = masked_log_softmax(torch.zeros_like(old), mask).exp()
    lw = token_weights(loss_weights, valid_mask)
    reward = -torch.where(mask, old - teacher, 0.0) * weight
    return torch.where(mask, reward * lw[..., None], 0.0)


def topk_reverse_kl_pg_loss(
    *,
    student_log_probs: torch.Tensor,
    old_student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    id_mask: torch.Tensor,
    loss_weights: torch.Tensor | None,
    valid_mask: torch.Tensor,
    reward_weight: str = "student_p",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_ratio_c: float | None = 3.0,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The release's top-K OPD loss.

    Args:
        student_log_probs: ``[b, s, m]`` current student log-probs at the id set (grad).
        old_student_log_probs: ``[b, s, m]`` rollout-time student log-probs there.
        teacher_log_probs: ``[b, s, m]`` teacher log-probs there.
        id_mask: ``[b, s, m]`` bool, which slots belong to the id set.
        loss_weights: ``[b, s]`` Prune-OPD loss weights (None: 1 on valid tokens).
        valid_mask: ``[b, s]`` bool, response tokens.

    Returns:
        ``(loss_sum, num_valid_tokens, metrics)``.
    """
    check_token_tensors(
        {
            "student_log_probs": student_log_probs,
            "old_student_log_probs": old_student_log_probs,
            "teacher_log_probs": teacher_log_probs,
            "id_mask": id_mask,
        },
        {"loss_weights": loss_weights, "valid_mask": valid_mask},
    )
    valid = valid_mask.bool()
    mask = id_mask.bool() & valid[..., None]
    advantages = topk_rewards(
        old_student_log_probs=old_student_log_probs,
        teacher_log_probs=teacher_log_probs,
        id_mask=mask,
        loss_weights=loss_weights,
        valid_mask=valid,
        reward_weight=reward_weight,
    )
    elementwise, clipped, log_ratio = ppo_clipped_surrogate(
        student_log_probs,
        old_student_log_probs.detach(),
        advantages,
        mask,
        clip_low=clip_low,
        clip_high=clip_high,
        clip_ratio_c=clip_ratio_c,
    )
    with torch.no_grad():
        unweighted = -torch.where(
            mask, old_student_log_probs.float() - teacher_log_probs.float(), 0.0
        )
        metrics = {
            "opd/advantage_sum_per_token": masked_token_mean(advantages.sum(-1), valid),
            "opd/topk_log_ratio_teacher_student": masked_token_mean(unweighted.sum(-1), valid),
            "opd/clip_fraction": clipped.sum() / mask.sum().clamp(min=1),
            "opd/ppo_kl": masked_token_mean(-log_ratio.sum(-1), valid),
            "opd/id_set_size": masked_token_mean(mask.sum(-1).float(), valid),
        }
    return finish(elementwise.sum(dim=-1), valid, metrics)


def sampled_rewards(
    *,
    old_student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    kl_estimator: str = "k1",
) -> torch.Tensor:
    """``[b, s]`` detached per-token reward from the sampled token (module essay)."""
    delta = teacher_log_probs.detach().float() - old_student_log_probs.detach().float()
    if kl_estimator == "k1":
        return delta
    if kl_estimator == "k3":
        return -(torch.expm1(delta) - delta)
    raise ValueError(f"loss.kl_estimator must be k1 or k3, got {kl_estimator!r}")


def sampled_reverse_kl_pg_loss(
    *,
    student_log_probs: torch.Tensor,
    old_student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    loss_weights: torch.Tensor | None,
    valid_mask: torch.Tensor,
    kl_estimator: str = "k1",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_ratio_c: float | None = 3.0,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Sampled-token reverse KL as a per-token advantage in the PPO surrogate.

    Args:
        student_log_probs: ``[b, s]`` current student log-prob of the sampled token (grad).
        old_student_log_probs: ``[b, s]`` rollout-time student log-prob of it.
        teacher_log_probs: ``[b, s]`` teacher log-prob of it.
        loss_weights: ``[b, s]`` (None: 1 on valid tokens).
        valid_mask: ``[b, s]`` bool.
    """
    check_token_tensors(
        {},
        {
            "student_log_probs": student_log_probs,
            "old_student_log_probs": old_student_log_probs,
            "teacher_log_probs": teacher_log_probs,
            "loss_weights": loss_weights,
            "valid_mask": valid_mask,
        },
    )
    valid = valid_mask.bool()
    reward = sampled_rewards(
        old_student_log_probs=old_student_log_probs,
        teacher_log_probs=teacher_log_probs,
        kl_estimator=kl_estimator,
    )
    advantages = torch.where(valid, reward * token_weights(loss_weights, valid), 0.0)
    per_token, clipped, log_ratio = ppo_clipped_surrogate(
        student_log_probs,
        old_student_log_probs.detach(),
        advantages,
        valid,
        clip_low=clip_low,
        clip_high=clip_high,
        clip_ratio_c=clip_ratio_c,
    )
    with torch.no_grad():
        metrics = {
            "opd/sampled_reverse_kl": masked_token_mean(-reward, valid),
            "opd/advantage": masked_token_mean(advantages, valid),
            "opd/clip_fraction": masked_token_mean(clipped.float(), valid),
            "opd/ppo_kl": masked_token_mean(-log_ratio, valid),
        }
    return finish(per_token, valid, metrics)
