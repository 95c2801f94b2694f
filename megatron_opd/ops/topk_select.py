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

The shard's ``torch.topk`` reads only part of a wide row (:func:`topk_by_blocks`): the
K + 1 largest values all lie in the m >= K + 1 column blocks with the largest maxima
whenever the m-th block maximum is above the (m+1)-th, so one vectorized ``amax`` pass and a
``torch.topk`` over those blocks give the same K + 1 values (``bench/ops_bench.py`` and
``bench/rollout_bench.py`` print the floors with either top-K).
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
        values, cols = topk_by_blocks(x, kept + 1)
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


PRUNE_BLOCK = 64
"""Columns per block of :func:`topk_by_blocks` (fastest of 32-1024 measured at V / TP =
75,968, 16-1,024 rows, one CPU thread)."""

PRUNE_SLACK = 8
"""Blocks read beyond ``n`` (:func:`topk_by_blocks`): bf16 block maxima often tie at one
boundary (6 of 12 random rows at V = 76,005), rarely at nine in a row (0 of 12)."""


def topk_by_blocks(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(x [c, v], n)`` (sorted) read from the column blocks of
    :data:`PRUNE_BLOCK` with the largest maxima.

    Exact: when a row's ``m``-th largest block maximum is above its ``(m+1)``-th for some
    ``m >= n``, every value outside those ``m`` blocks has at least ``n`` values above it
    (the maxima), so the row's top-``n`` values are the top-``n`` of those blocks. The
    ``n +`` :data:`PRUNE_SLACK` best blocks are read, so a row is unsure only when its
    maxima tie at every boundary from the ``n``-th to the last one read (NaN ranks first,
    as in ``torch.topk``, and compares False: a row with NaN there is unsure). An unsure
    row takes ``torch.topk`` over the whole row, as does a row block too narrow to gain
    (the blocks read above a quarter of ``v``), and any tensor off the CPU: measured on CPU
    only, and a CUDA ``torch.topk`` is a radix select that reads the row once anyway,
    where this path would add a host sync per call. Among equal values the ids returned may
    differ from ``torch.topk``'s, which does not specify them either (:func:`local_topk`
    resolves ties at the K-th value exactly).
    """
    rows, width = x.shape
    blocks = width // PRUNE_BLOCK
    m = n + PRUNE_SLACK
    if 4 * m * PRUNE_BLOCK > width or rows == 0 or x.device.type != "cpu":
        return torch.topk(x, n, dim=-1, largest=True, sorted=True)
    full = blocks * PRUNE_BLOCK
    maxima = x[:, :full].reshape(rows, blocks, PRUNE_BLOCK).amax(dim=-1)
    if full < width:
        maxima = torch.cat([maxima, x[:, full:].amax(dim=-1, keepdim=True)], dim=1)
    best = torch.topk(maxima, m + 1, dim=-1, largest=True, sorted=True)
    cols = best.indices[:, :m, None] * PRUNE_BLOCK + torch.arange(PRUNE_BLOCK, device=x.device)
    cols = cols.view(rows, m * PRUNE_BLOCK)
    candidates = x.gather(1, cols.clamp(max=width - 1))
    if full < width:
        candidates.masked_fill_(cols >= width, float("-inf"))  # the last block's overhang
    values, picked = torch.topk(candidates, n, dim=-1, largest=True, sorted=True)
    cols = cols.gather(1, picked)
    separated = (best.values[:, n - 1 : m] > best.values[:, n:]).any(dim=-1)
    unsure = (~separated).nonzero()[:, 0]
    if unsure.numel():
        whole = torch.topk(x.index_select(0, unsure), n, dim=-1, largest=True, sorted=True)
        values[unsure], cols[unsure] = whole.values, whole.indices
    return values, cols


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
