"""Compatibility of student and teacher at each response position: the drift signal.

Two signals, both computed from per-token top-K tensors (the vocabulary is never seen):

- ``overlap_ratio[t] = |S_t ∩ T_t| / K`` with ``S_t``, ``T_t`` the student's and the
  teacher's top-K ids. Membership is found by sorting the teacher's ids and binary
  searching the student's, so memory stays ``O(b * s * K)`` instead of ``O(b * s * K^2)``.
- ``teacher_top_p_accept[t]``: is the sampled token inside the teacher's top-p accept
  set (the shortest prefix of the teacher's top-K, sorted by probability, whose
  cumulative probability reaches p; all K when the top-K mass never reaches p)?

A drift ("bad") event is ``overlap_ratio < tau`` or "sampled token not accepted", and
only ever on valid (response, non-padding) tokens: :func:`drift_events`.

Alignment follows :class:`~megatron_opd.rollout.batch.RolloutBatch`: entry ``t`` of every
tensor is about predicting ``tokens[:, t]``, so ``sampled_ids`` is ``tokens`` itself.
"""

from __future__ import annotations

import math

import torch


def _check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}; "
            "they must agree"
        )


def _check_mask(valid_mask: torch.Tensor, leading: torch.Size, name: str = "valid_mask") -> None:
    if valid_mask.shape != leading:
        raise ValueError(
            f"{name} has shape {tuple(valid_mask.shape)}, expected {tuple(leading)} "
            "(one entry per token)"
        )


def _check_probability(name: str, value: float) -> None:
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {value}")


def overlap_ratio(
    student_topk_ids: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    valid_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Share of the student's top-K ids that are also among the teacher's top-K.

    Args:
        student_topk_ids: ``[b, s, k]`` int, the student's top-K ids.
        teacher_topk_ids: ``[b, s, k]`` int, the teacher's top-K ids.
        valid_mask: ``[b, s]`` bool, True on response tokens.

    Returns:
        ``(ratio [b, s] float32, in_teacher [b, s, k] bool)``: ``in_teacher[..., j]`` says
        whether ``student_topk_ids[..., j]`` is in the teacher's set; ratio is its mean
        over k. Both are 0 / False off ``valid_mask``.
    """
    _check_same_shape("student_topk_ids", student_topk_ids, "teacher_topk_ids", teacher_topk_ids)
    if student_topk_ids.dim() != 3:
        raise ValueError(
            f"student_topk_ids must be [b, s, k], got shape {tuple(student_topk_ids.shape)}"
        )
    _check_mask(valid_mask, student_topk_ids.shape[:2])
    k = student_topk_ids.shape[-1]
    student_topk_ids = student_topk_ids.to(teacher_topk_ids.dtype)
    sorted_teacher = teacher_topk_ids.sort(dim=-1).values.contiguous()
    position = torch.searchsorted(sorted_teacher, student_topk_ids.contiguous())
    found = sorted_teacher.gather(-1, position.clamp(max=k - 1)) == student_topk_ids
    valid = valid_mask.bool()
    in_teacher = found & valid[..., None]
    ratio = in_teacher.sum(dim=-1).to(torch.float32) / k
    return ratio, in_teacher


def teacher_top_p_accept(
    sampled_ids: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_log_probs: torch.Tensor,
    p: float,
) -> torch.Tensor:
    """Whether each sampled token is in the teacher's top-p accept set.

    The accept set is the shortest prefix of the teacher's top-K (sorted by probability,
    any input order is fine) whose cumulative probability reaches ``p``; when the top-K
    mass never reaches ``p`` all K ids are accepted.

    Args:
        sampled_ids: ``[b, s]`` int, the sampled token at each position (``tokens``).
        teacher_topk_ids: ``[b, s, k]`` int.
        teacher_topk_log_probs: ``[b, s, k]`` float, the teacher's full-vocabulary
            log-probs at ``teacher_topk_ids``.
        p: the threshold, in (0, 1].

    Returns:
        ``[b, s]`` bool, True where the sampled token is accepted. Values off the response
        are meaningless; the drift event is ``~accept & valid_mask``
        (:func:`teacher_top_p_bad_events`).
    """
    _check_probability("p (prune.threshold)", p)
    _check_same_shape(
        "teacher_topk_ids", teacher_topk_ids, "teacher_topk_log_probs", teacher_topk_log_probs
    )
    if teacher_topk_ids.dim() != 3 or sampled_ids.shape != teacher_topk_ids.shape[:2]:
        raise ValueError(
            f"sampled_ids {tuple(sampled_ids.shape)} must be [b, s] and teacher_topk_ids "
            f"{tuple(teacher_topk_ids.shape)} must be [b, s, k] with the same b, s"
        )
    k = teacher_topk_ids.shape[-1]
    log_probs, order = teacher_topk_log_probs.float().sort(dim=-1, descending=True, stable=True)
    ids = teacher_topk_ids.gather(-1, order)
    cumulative = log_probs.exp().cumsum(dim=-1)
    crossed = cumulative >= p
    # Prefix length: one past the first crossing, or all K when the mass never reaches p.
    first_crossing = torch.where(
        crossed.any(dim=-1),
        crossed.to(torch.int64).argmax(dim=-1),
        torch.full_like(ids[..., 0], k - 1),
    )
    rank = torch.arange(k, device=ids.device)
    accepted = rank <= first_crossing[..., None]
    return ((ids == sampled_ids[..., None]) & accepted).any(dim=-1)


def teacher_top_p_bad_events(
    sampled_ids: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_log_probs: torch.Tensor,
    p: float,
    valid_mask: torch.Tensor,
) -> torch.Tensor:
    """``[b, s]`` bool drift events: valid tokens whose sampled id the teacher's top-p set
    rejects (see :func:`teacher_top_p_accept`)."""
    _check_mask(valid_mask, sampled_ids.shape)
    accept = teacher_top_p_accept(sampled_ids, teacher_topk_ids, teacher_topk_log_probs, p)
    return ~accept & valid_mask.bool()


def drift_events(
    *,
    metric: str,
    threshold: float,
    valid_mask: torch.Tensor,
    student_topk_ids: torch.Tensor | None = None,
    teacher_topk_ids: torch.Tensor | None = None,
    sampled_ids: torch.Tensor | None = None,
    teacher_topk_log_probs: torch.Tensor | None = None,
    overlap: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Bad events of the configured metric (``prune.metric`` / ``prune.threshold``).

    ``overlap``: the ``[b, s]`` overlap ratio of these top-K ids when the caller already
    has it (scoring computes it for the logs); it is reused instead of recomputed.

    Returns:
        ``(bad [b, s] bool, overlap [b, s] float32 or None)``; ``overlap`` is the overlap
        ratio when ``metric == "overlap"`` (a metric worth logging), else None.
    """
    if metric == "overlap":
        _check_probability("tau (prune.threshold)", threshold)
        if overlap is not None:
            _check_mask(valid_mask, overlap.shape)
            return (overlap < threshold) & valid_mask.bool(), overlap
        if student_topk_ids is None or teacher_topk_ids is None:
            raise ValueError("metric 'overlap' needs student_topk_ids and teacher_topk_ids")
        ratio, _ = overlap_ratio(student_topk_ids, teacher_topk_ids, valid_mask)
        return (ratio < threshold) & valid_mask.bool(), ratio
    if metric == "teacher_top_p_accept":
        if sampled_ids is None or teacher_topk_ids is None or teacher_topk_log_probs is None:
            raise ValueError(
                "metric 'teacher_top_p_accept' needs sampled_ids, teacher_topk_ids and "
                "teacher_topk_log_probs"
            )
        bad = teacher_top_p_bad_events(
            sampled_ids, teacher_topk_ids, teacher_topk_log_probs, threshold, valid_mask
        )
        return bad, None
    raise ValueError(f"prune.metric must be 'overlap' or 'teacher_top_p_accept', got {metric!r}")
