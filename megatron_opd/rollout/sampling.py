"""Picking the next token from full-vocabulary logits: temperature, top-p, greedy.

Pure tensor code shared by every engine and by tests. Sampling draws from an explicit
``torch.Generator`` so that all tensor-parallel ranks of a replica, seeded alike and fed
identical (gathered) logits, draw identical tokens without a broadcast.
"""

from __future__ import annotations

from typing import NamedTuple

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
    return draw(top_p_filter(scaled, top_p), generator)


HEAD = 16
"""Ids a draw looks at first: the :data:`HEAD` most likely (see :func:`draw`)."""

TAIL_BLOCK = 512
"""Columns per block of the tail search (see :func:`tail_pick`)."""


class ShiftedExp(NamedTuple):
    """A row block's ``exp`` pass, kept for the draw's tail (see :func:`shifted_exp`)."""

    lse: torch.Tensor
    """``[a, 1]`` ``logsumexp(x)``."""
    exp: torch.Tensor
    """``[a, v]`` ``exp(x - shift)``: probabilities times ``sums``."""
    sums: torch.Tensor
    """``[a, 1]`` row sums of ``exp``."""


def shifted_exp(
    x: torch.Tensor, row_max: torch.Tensor, workspace: torch.Tensor | None = None
) -> ShiftedExp:
    """``logsumexp(x [a, v])`` given the row maxima, and the ``exp`` pass behind it.

    The same arithmetic as ``torch.logsumexp`` (shift by the row max, one ``exp`` and one
    ``sum``, ``log`` plus the shift; an infinite max shifts by 0), so ``lse`` is
    bit-identical to it (tested); but the max comes from the top-K a decode step computes
    anyway instead of a pass of its own, and the shifted ``exp`` is kept: the draw's tail
    reads its probabilities from it instead of a second ``exp`` over the vocabulary.

    ``workspace``: a float32 buffer of at least ``x``'s rows and columns to write the
    ``exp`` into. A decode loop passes the same one every step: a fresh
    multi-megabyte tensor per step costs the page faults of new memory (measured ~2x the
    ``exp`` itself at B = 64, V = 75,968 on CPU).
    """
    exp, shift = exp_minus_max(x, row_max, workspace)
    sums = exp.sum(dim=-1, keepdim=True)
    return ShiftedExp(lse=sums.log().add_(shift), exp=exp, sums=sums)


def exp_minus_max(
    x: torch.Tensor, row_max: torch.Tensor, workspace: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(exp(x - shift) [a, v], shift [a, 1])``: the shift is the row max, 0 where it is
    infinite (as ``torch.logsumexp`` shifts); written into ``workspace`` when given."""
    shift = row_max.masked_fill(row_max.abs() == float("inf"), 0.0)
    if workspace is None:
        return (x - shift).exp_(), shift
    return torch.sub(x, shift, out=workspace[: x.shape[0], : x.shape[1]]).exp_(), shift


def block_sums(values: torch.Tensor) -> torch.Tensor:
    """``[r, ceil(w / TAIL_BLOCK)]`` float32 sums of ``values [r, w]``'s column blocks."""
    rows, width = values.shape
    full = width // TAIL_BLOCK * TAIL_BLOCK
    parts = [values[:, :full].reshape(rows, -1, TAIL_BLOCK).sum(-1)]
    if full < width:
        parts.append(values[:, full:].sum(-1, keepdim=True))
    return torch.cat(parts, dim=1)


def block_pick(
    values: torch.Tensor,
    sums: torch.Tensor,
    rows: torch.Tensor,
    rest: torch.Tensor,
    exclude: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse CDF in column order by blocks: ``([r] column, [r, 1] float32 row total)``.

    Args:
        values: ``[R, w]`` non-negative weights (probabilities, or probabilities times a
            per-row constant), read only in the one block each row's draw falls in.
        sums: ``[R, blocks]`` their :func:`block_sums`.
        rows: ``[r]`` the rows of ``values`` to draw in.
        rest: ``[r, 1]`` the target, in ``values``' units.
        exclude: ``([r, h] columns, [r, h] their values)`` left out of the draw (the head
            that was drawn from first), or None.

    The column is the first whose cumulative weight exceeds ``min(rest, total * (1 -
    1e-6))``: float64 prefix sums of the (float32) block sums pick the block, then a
    float64 scan of that block picks the column. A row with no weight left (total 0) gets
    an arbitrary column; the caller checks the total.
    """
    width = values.shape[1]
    ends = sums.index_select(0, rows).double()
    if exclude is not None:
        ends.scatter_add_(1, exclude[0] // TAIL_BLOCK, -exclude[1].double()).clamp_(min=0.0)
    ends = ends.cumsum_(dim=-1)  # [r, blocks]
    total = ends[:, -1:].float()
    target = torch.minimum(rest.clamp(min=0), total * (1 - 1e-6))
    block = torch.searchsorted(ends.float(), target, right=True).clamp_(max=ends.shape[1] - 1)
    before = torch.where(block > 0, ends.gather(1, (block - 1).clamp(min=0)), 0.0)
    columns = block * TAIL_BLOCK + torch.arange(TAIL_BLOCK, device=values.device)
    inside = values[rows[:, None], columns.clamp(max=width - 1)]
    outside = columns >= width
    if exclude is not None:
        outside |= (columns[:, :, None] == exclude[0][:, None, :]).any(dim=-1)
    cdf = (inside.masked_fill_(outside, 0.0).double().cumsum_(dim=-1) + before).float()
    offset = torch.searchsorted(cdf, target, right=True).clamp_(max=TAIL_BLOCK - 1)
    return columns.gather(1, offset)[:, 0].clamp(max=width - 1), total


def tail_pick(probs: torch.Tensor, rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF pick in id order: ``([r] column, [r, 1] float32 row total)``.

    ``probs [r, w]`` float32 (>= 0), ``rest [r, 1]`` the uniform's remainder. The column is
    the first whose cumulative probability (float64 prefix sums rounded to float32, as
    torch's CPU ``cumsum`` of float32 computes them) exceeds ``min(rest, total * (1 -
    1e-6))``. A row of up to :data:`TAIL_BLOCK` columns is scanned whole. A longer row is
    not (:func:`block_pick`: one read of the row for its block sums, where a scan costs
    about four). The block sums' float32 rounding can move a boundary by about 1e-7 of
    the mass, so for V > :data:`TAIL_BLOCK` + :data:`HEAD` a draw may differ from the
    whole-row scan's with about that probability (same distribution). A row with no mass
    (total 0) gets an arbitrary column; the caller checks the total.
    """
    rows, width = probs.shape
    if width <= TAIL_BLOCK:
        cdf = probs.cumsum(dim=-1)
        total = cdf[:, -1:]
        target = torch.minimum(rest.clamp(min=0), total * (1 - 1e-6))
        return torch.searchsorted(cdf, target, right=True)[:, 0].clamp(max=width - 1), total
    everyone = torch.arange(rows, device=probs.device)
    return block_pick(probs, block_sums(probs), everyone, rest)


def draw(
    scores: torch.Tensor,
    generator: torch.Generator | None,
    *,
    lse: torch.Tensor | None = None,
    head: tuple[torch.Tensor, torch.Tensor] | None = None,
    shifted: ShiftedExp | None = None,
    u: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[a]`` ids drawn from ``softmax(scores [a, v])``, one uniform per row.

    Inverse-CDF sampling over the ids ordered "the :data:`HEAD` most likely first (value
    descending, lower id first), then the rest in id order": exact for any order, and
    with this one the uniform ``u`` usually lands in the head, whose probabilities come
    from the top-K and the log-sum-exp that a decode step computes anyway. Only the rows
    whose ``u`` falls past the head's mass (for a peaked policy, few) pay one more ``exp``
    over their vocabulary and a block search (:func:`tail_pick`). Per decode step at
    V = 151,936 the whole step (with its block-pruned top-K) measured 0.4-0.6x one
    ``torch.topk`` plus one ``torch.logsumexp``, and 1.2x those passes with the pruned
    top-K (``bench/rollout_bench.py``, docs/results.md); Gumbel-max (V uniforms, two logs)
    cost 3.6x the former. Draws do not depend on padding columns at -inf.

    Args:
        scores: ``[a, v]`` float logits (temperature applied; -inf ids are never drawn).
        generator: the replica's generator (tensor-parallel ranks seeded alike draw alike).
        lse: ``[a, 1]`` ``logsumexp(scores)`` when the caller has it.
        head: ``([a, h], [a, h])`` values and ids of the exact top-``h`` of ``scores``
            (:func:`~megatron_opd.ops.topk_select.exact_topk` order), ``h >= HEAD`` or
            the whole row, when the caller has it; only the first :data:`HEAD` are used.
        shifted: :func:`shifted_exp` of ``scores`` (then ``lse`` is its ``lse``); a row
            longer than :data:`TAIL_BLOCK` draws its tail from it, zeroing its head ids
            in place (the caller must not reuse it).
        u: ``[a, 1]`` float32 uniforms to use instead of drawing them from ``generator``.
    """
    from megatron_opd.ops.topk_select import exact_topk

    rows, width = scores.shape
    if shifted is not None:
        lse = shifted.lse
    h = min(HEAD, width)
    if head is None:
        head = exact_topk(scores, h)
    values, ids = head[0][:, :h], head[1][:, :h]
    if lse is None:
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    if u is None:
        u = torch.rand(rows, 1, generator=generator, dtype=scores.dtype, device=scores.device)
    head_cdf = (values - lse).exp().cumsum(dim=-1)
    mass = head_cdf[:, -1:]
    # right=True: the first id whose cumulative probability exceeds u (never a 0-prob id).
    pick = torch.searchsorted(head_cdf, torch.minimum(u, mass * (1 - 1e-6)), right=True)
    out = ids.gather(1, pick.clamp(max=h - 1))[:, 0]
    tail = (u[:, 0] >= mass[:, 0]).nonzero()[:, 0]
    if h < width and tail.numel():
        if shifted is not None and width > TAIL_BLOCK:
            # Probabilities times the row sum: scale the target instead of the row. When
            # many rows go past the head, searching all rows beats copying the tail's.
            rows_in = torch.arange(rows, device=scores.device) if 2 * tail.numel() >= rows else tail
            probs = shifted.exp if rows_in is not tail else shifted.exp.index_select(0, tail)
            rest = (u - mass).index_select(0, rows_in) * shifted.sums.index_select(0, rows_in)
        else:
            rows_in = tail
            if tail.numel() == rows:
                probs = (scores - lse).exp_()
            else:
                probs = (scores.index_select(0, tail) - lse.index_select(0, tail)).exp_()
            rest = (u - mass).index_select(0, tail)
        tail_ids = ids.index_select(0, rows_in)
        probs.scatter_(1, tail_ids, 0.0)
        picked, total = tail_pick(probs, rest)
        if rows_in is not tail:
            picked, total = picked.index_select(0, tail), total.index_select(0, tail)
        # A tail with no mass left (u past the head only by rounding) keeps the head's pick.
        has_mass = total[:, 0] > 0
        out[tail[has_mass]] = picked[has_mass]
    return out


def sample_step(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
    vocab_size: int | None,
    top_k: int = 0,
    workspace: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One decode step's vocabulary work on ``[a, V_padded]`` logits.

    Returns ``(ids [a], log_probs [a], topk_ids [a, k], topk_log_probs [a, k])`` (the last
    two None for ``top_k = 0``): the next ids (as :func:`sample_next_tokens`, same draws),
    their log-probs under the sampling policy ``log_softmax(logits / temperature)`` (the
    raw logits when greedy) and its exact top-K (value descending, lower id first; every
    id in id order when ``top_k`` is the vocabulary). Padding columns (ids >=
    ``vocab_size``) are never read: one top-K and one ``exp``-and-sum over the real columns
    (the log-sum-exp takes its max from the top-K), plus the sampler's draws.
    ``workspace``: ``[>= a, min(vocab_size, V_padded)]`` float32 scratch reused across
    steps (see :func:`shifted_exp`).
    """
    from megatron_opd.ops.topk_select import exact_topk

    width = logits.shape[-1]
    real = min(vocab_size or width, width)
    x = logits[:, :real].float()
    scaled = x / temperature if temperature not in (0.0, 1.0) else x
    values = topk_ids = shifted = None
    if 0 < top_k < real or (temperature != 0.0 and top_p >= 1.0):
        # The head of the draw and the recorded top-K in one pass; its first column is
        # the row max, which the log-sum-exp then needs no pass of its own for.
        k = min(max(top_k, HEAD), real) if top_k < real else min(HEAD, real)
        values, topk_ids = exact_topk(scaled, k)
        shifted = shifted_exp(scaled, values[:, :1], workspace)
        lse = shifted.lse
    else:
        lse = torch.logsumexp(scaled, dim=-1, keepdim=True)
    if temperature == 0.0:
        ids = x.argmax(dim=-1)
    elif top_p < 1.0:
        ids = draw(top_p_filter(scaled, top_p), generator)
    else:
        ids = draw(scaled, generator, head=(values, topk_ids), shifted=shifted)
    log_probs = scaled.gather(1, ids[:, None])[:, 0] - lse[:, 0]
    if not top_k:
        return ids, log_probs, None, None
    if top_k >= real:
        topk_ids = torch.arange(top_k, device=x.device).expand(x.shape[0], top_k)
        return ids, log_probs, topk_ids, scaled - lse
    return ids, log_probs, topk_ids[:, :top_k], values[:, :top_k] - lse
