"""Exact top-K with the lower-id tie break, one shard at a time, then across shards.

``torch.topk`` does not say which of several equal values it returns, and bf16 logits tie
often (8 bits of mantissa over a 150k vocabulary). The global answer must be the one a
stable sort of the whole vocabulary gives: value descending, then id ascending. That holds
if (1) each shard returns *its* exact top-K under that order, and (2) the K*TP candidates
are merged under the same order, because a global winner is always a winner of its shard.

(1) costs nothing extra: ``torch.topk`` is asked for K + 1 values, and a row is ambiguous
only when the K-th and the (K+1)-th tie (otherwise the K-set is unique, whatever order
topk put its ties in). Those rows (rare in float32, common in bf16) are redone exactly:
everything above the K-th value, plus the lowest-id entries equal to it.
"""

from __future__ import annotations

import torch


def local_topk(
    x: torch.Tensor, k: int, vocab_start: int, fill_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """This shard's exact top-``k`` of ``x`` ``[c, v]`` as ``([c, k] values, [c, k] ids)``.

    Ids are global (``vocab_start`` + column). With fewer than ``k`` columns the missing
    entries are ``-inf`` with id ``fill_id`` (they sort last and never win). The order of
    the ``k`` entries is unspecified; :func:`merge_topk` orders them.
    """
    rows, width = x.shape
    kept = min(k, width)
    if kept == 0 or rows == 0:
        values = x.new_full((rows, k), float("-inf"))
        ids = torch.full((rows, k), fill_id, dtype=torch.long, device=x.device)
        return values, ids
    if kept == width:
        values, cols = x, torch.arange(width, device=x.device).expand(rows, width)
        values, cols = values.clone(), cols.clone()
    else:
        # One more than needed: the row is ambiguous iff the K-th and (K+1)-th values tie.
        values, cols = torch.topk(x, kept + 1, dim=-1, largest=True, sorted=True)
        ambiguous = (values[:, kept - 1] == values[:, kept]).nonzero().squeeze(1)
        values, cols = values[:, :kept].contiguous(), cols[:, :kept].contiguous()
        if ambiguous.numel():
            rows_x = x.index_select(0, ambiguous)
            threshold = values.index_select(0, ambiguous)[:, kept - 1 :]
            above = rows_x > threshold
            needed = kept - above.sum(dim=-1, keepdim=True)
            equal = rows_x == threshold
            take = above | (equal & (equal.cumsum(dim=-1) <= needed))
            exact_cols = take.nonzero()[:, 1].view(-1, kept)
            cols[ambiguous] = exact_cols
            values[ambiguous] = rows_x.gather(1, exact_cols)
    ids = cols + vocab_start
    if kept < k:
        values = torch.cat([values, values.new_full((rows, k - kept), float("-inf"))], dim=1)
        filler = torch.full((rows, k - kept), fill_id, dtype=torch.long, device=x.device)
        ids = torch.cat([ids, filler], dim=1)
    return values, ids


def merge_topk(
    values: torch.Tensor, ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of candidates ``[c, m]`` ordered by (value descending, id ascending)."""
    if values.shape[-1] == k and k > 1:
        # One shard's candidates (TP = 1) come sorted by value from torch.topk: only rows
        # that are not strictly decreasing (ties, or the exact-tie repair) need the sort.
        unordered = (values[:, 1:] >= values[:, :-1]).any(dim=-1).nonzero()[:, 0]
        if unordered.numel() == 0:
            return values, ids
        values, ids = values.clone(), ids.clone()
        values[unordered], ids[unordered] = _sorted_by_value_then_id(
            values[unordered], ids[unordered], k
        )
        return values, ids
    return _sorted_by_value_then_id(values, ids, k)


def _sorted_by_value_then_id(
    values: torch.Tensor, ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    by_id = ids.argsort(dim=-1)
    values_by_id = values.gather(-1, by_id)
    order = torch.sort(values_by_id, dim=-1, descending=True, stable=True).indices[:, :k]
    pick = by_id.gather(-1, order)
    return values.gather(-1, pick), ids.gather(-1, pick)


def exact_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of one unsplit ``[c, v]`` row block ordered by (value descending, id
    ascending): :func:`local_topk` + :func:`merge_topk` without the vocabulary-parallel
    ops' argument exchange and checks (a rollout's per-decode-step top-K)."""
    values, ids = local_topk(x, k, 0, x.shape[-1])
    return merge_topk(values, ids, k)


def topk_membership(
    student_ids: torch.Tensor, teacher_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlap of two id sets per position.

    Args:
        student_ids: ``[..., k]`` ids (the student's top-K).
        teacher_ids: ``[..., k2]`` ids (the teacher's top-K), same leading dims.

    Returns:
        ``(overlap_ratio [...] float32 = |S ∩ T| / k, in_teacher [..., k] bool)``, where
        ``in_teacher[..., j]`` says whether ``student_ids[..., j]`` is among ``teacher_ids``.
    """
    if student_ids.shape[:-1] != teacher_ids.shape[:-1]:
        raise ValueError(
            f"student ids {tuple(student_ids.shape)} and teacher ids "
            f"{tuple(teacher_ids.shape)} must share their leading dims"
        )
    in_teacher = (student_ids.unsqueeze(-1) == teacher_ids.unsqueeze(-2)).any(dim=-1)
    k = student_ids.shape[-1]
    overlap_ratio = in_teacher.sum(dim=-1, dtype=torch.float32) / max(k, 1)
    return overlap_ratio, in_teacher
