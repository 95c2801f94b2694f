"""One entry point for the trainer's ``loss_func``: pick the OPD loss by ``loss.kind``.

The trainer gathers per-token tensors (vocabulary-parallel) and passes them by name;
which names each kind needs is listed in :data:`REQUIRED_TENSORS`. The configuration
knobs (clip ranges, estimator, beta, ...) come from :class:`LossConfig`.
"""

from __future__ import annotations

import torch

from megatron_opd.config.prune import LossConfig
from megatron_opd.losses.divergence import (
    forward_topk_kl_loss,
    gkd_jsd_loss,
    topk_reverse_kl_loss,
)
from megatron_opd.losses.policy_gradient import (
    sampled_reverse_kl_pg_loss,
    topk_reverse_kl_pg_loss,
)

REQUIRED_TENSORS: dict[str, tuple[str, ...]] = {
    "topk_reverse_kl_pg": (
        "student_log_probs",
        "old_student_log_probs",
        "teacher_log_probs",
        "id_mask",
        "valid_mask",
    ),
    "sampled_reverse_kl_pg": (
        "student_log_probs",
        "old_student_log_probs",
        "teacher_log_probs",
        "valid_mask",
    ),
    "forward_topk_kl": ("student_log_probs", "teacher_log_probs", "valid_mask"),
    "gkd_jsd": ("student_log_probs", "teacher_log_probs", "valid_mask"),
    "topk_reverse_kl": ("student_log_probs", "teacher_log_probs", "id_mask", "valid_mask"),
}
"""Tensors each ``loss.kind`` needs; every kind also takes ``loss_weights`` (optional,
None = unweighted) and the top-K divergences an optional ``id_mask``."""

_OPTIONAL_TENSORS: dict[str, tuple[str, ...]] = {
    "topk_reverse_kl_pg": ("loss_weights",),
    "sampled_reverse_kl_pg": ("loss_weights",),
    "forward_topk_kl": ("loss_weights", "id_mask"),
    "gkd_jsd": ("loss_weights", "id_mask"),
    "topk_reverse_kl": ("loss_weights",),
}


def opd_loss(
    loss_config: LossConfig, **tensors: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss_sum, num_valid_tokens, metrics)`` of the loss ``loss_config.kind``.

    Tensor shapes are documented on each loss function (``megatron_opd.losses``).
    """
    kind = loss_config.kind
    if kind not in REQUIRED_TENSORS:
        raise ValueError(f"loss.kind must be one of {list(REQUIRED_TENSORS)}, got {kind!r}")
    required = REQUIRED_TENSORS[kind]
    allowed = set(required) | set(_OPTIONAL_TENSORS[kind])
    missing = [name for name in required if tensors.get(name) is None]
    unknown = sorted(set(tensors) - allowed)
    if missing or unknown:
        raise ValueError(
            f"loss.kind={kind!r} needs tensors {list(required)} (optional: "
            f"{list(_OPTIONAL_TENSORS[kind])}); missing {missing}, unexpected {unknown}"
        )
    kwargs = dict(tensors)
    kwargs.setdefault("loss_weights", None)
    clip = {
        "clip_low": loss_config.clip_low,
        "clip_high": loss_config.clip_high,
        "clip_ratio_c": loss_config.clip_ratio_c,
    }
    if kind == "topk_reverse_kl_pg":
        return topk_reverse_kl_pg_loss(**kwargs, reward_weight=loss_config.reward_weight, **clip)
    if kind == "sampled_reverse_kl_pg":
        return sampled_reverse_kl_pg_loss(**kwargs, kl_estimator=loss_config.kl_estimator, **clip)
    if kind == "forward_topk_kl":
        return forward_topk_kl_loss(**kwargs, tail_bucket=loss_config.tail_bucket)
    if kind == "gkd_jsd":
        return gkd_jsd_loss(
            **kwargs, beta=loss_config.jsd_beta, tail_bucket=loss_config.tail_bucket
        )
    return topk_reverse_kl_loss(**kwargs, tail_bucket=loss_config.tail_bucket)
