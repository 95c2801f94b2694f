"""Per-sample early stop during chunked generation (our "beyond" #1, spec section 5).

The rollout engine generates ``C`` tokens at a time, scores each new chunk with the
teacher, and feeds the chunk's drift events here. The stopper keeps, per sample, the
running count of drift events, the current run of consecutive drift events, whether the
sample passed its stop point, and the effective length, so the weights of each new chunk
continue exactly where the previous chunk ended (:func:`~megatron_opd.prune.weights.
chunk_weights`, the same arithmetic as the whole-sequence
:func:`~megatron_opd.prune.weights.reliability_weights`, bitwise).

A sample should stop when it reached its stop point (:class:`~megatron_opd.prune.weights.
WeightRule`):

- ``released`` mode: its weight reached 0 and ``w_base == 0``, so every later loss weight
  is 0 (``reason = WEIGHT_ZERO``); with ``w_base > 0`` nothing ever stops;
- ``truncate`` mode: its weight reached 0 (``WEIGHT_ZERO``), it spent ``drift_budget``
  drift events (``DRIFT_BUDGET``), or had ``max_consecutive_bad`` in a row
  (``CONSECUTIVE``); the tokens after the stop point are cut from training as well.

Rows may leave the running batch: each chunk comes with ``sample_index [r]``, the
sample each of its rows belongs to. Invalid (padding) columns inside a chunk neither
count nor reset a run of drift events; they get weight 0, as in the batch form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_opd.prune.weights import (
    ReliabilityWeights,
    WeightRule,
    chunk_weights,
    weights_from_counts,
)

NOT_STOPPED = 0
WEIGHT_ZERO = 1
DRIFT_BUDGET = 2
CONSECUTIVE = 3


@dataclass(kw_only=True)
class ChunkWeights:
    """Weights of the rows of one chunk."""

    weights: torch.Tensor
    """``[r, c]`` float32 weights of the chunk's tokens (0 off valid)."""

    loss_weights: torch.Tensor
    """``[r, c]`` float32 ``weights + w_base`` on valid tokens, 0 elsewhere."""

    should_stop: torch.Tensor
    """``[r]`` bool: the row's sample should stop generating."""


class OnlineStopper:
    """Running drift state of ``batch_size`` samples fed chunk by chunk."""

    def __init__(
        self,
        batch_size: int,
        *,
        w_drop: float,
        w_base: float,
        mode: str = "released",
        drift_budget: int | None = None,
        max_consecutive_bad: int | None = None,
        positive_eps: float = 1e-8,
        keep_history: bool = True,
        device: torch.device | str = "cpu",
    ) -> None:
        self.rule = WeightRule(
            w_drop=w_drop,
            w_base=w_base,
            positive_eps=positive_eps,
            mode=mode,
            drift_budget=drift_budget,
            max_consecutive_bad=max_consecutive_bad,
        )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.keep_history = keep_history
        zeros = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self.num_bad_events = zeros.clone()
        """``[b]`` drift events so far."""
        self.consecutive_bad = zeros.clone()
        """``[b]`` drift events in a row at the end of the tokens so far."""
        self.effective_length = zeros.clone()
        """``[b]`` valid tokens so far with weight > positive_eps."""
        self.num_tokens = zeros.clone()
        """``[b]`` columns fed so far (valid or not)."""
        self.stop_reason = zeros.clone()
        """``[b]`` first reason to stop (NOT_STOPPED, WEIGHT_ZERO, DRIFT_BUDGET, CONSECUTIVE)."""
        self.stop_position = zeros - 1
        """``[b]`` column (counted from the first chunk) of the stop point, -1 if none."""
        self._history: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        """Per chunk fed: ``(sample_index [r], first column [r], weights [r, c], loss
        weights [r, c])``, placed by :meth:`result` (one record per chunk, not per row)."""

    @classmethod
    def from_config(cls, batch_size: int, config, **kwargs) -> OnlineStopper:
        """Build from a ``prune`` section (:class:`~megatron_opd.config.prune.PruneConfig`)."""
        return cls(
            batch_size,
            w_drop=config.w_drop,
            w_base=config.w_base,
            mode=config.mode,
            drift_budget=config.drift_budget,
            max_consecutive_bad=config.max_consecutive_bad,
            positive_eps=config.positive_eps,
            **kwargs,
        )

    @property
    def should_stop(self) -> torch.Tensor:
        """``[b]`` bool: the sample should stop (sticky once True)."""
        return self.stop_reason != NOT_STOPPED

    def should_stop_rows(self, sample_index: torch.Tensor) -> torch.Tensor:
        """``[r]`` bool for the samples ``sample_index`` (the rows still running)."""
        return self.should_stop[sample_index]

    def could_stop_within(self, tokens: int, sample_index: torch.Tensor) -> bool:
        """Whether any of the samples ``sample_index [r]`` could reach a stop point within
        its next ``tokens`` columns: the stop rules applied to the worst case, every
        column valid and a drift event. Every rule is monotone in the events, so the
        worst case stops somewhere in the columns iff it stops at the last one: the rules
        (:meth:`WeightRule.stop_points`, as in :func:`chunk_weights`) are evaluated there
        only (the same verdict as feeding ``tokens`` all-drift columns, tested)."""
        rule = self.rule
        if not rule.can_stop or tokens <= 0 or sample_index.numel() == 0:
            return False
        index = sample_index.to(device=self.num_bad_events.device, dtype=torch.int64)
        count = self.num_bad_events[index] + tokens
        weight = weights_from_counts(count, rule.w_drop)
        stop = rule.stop_points(weight, count, self.consecutive_bad[index] + tokens)
        return bool((stop & ~self.should_stop[index]).any())

    def _continued(self, bad: torch.Tensor, valid: torch.Tensor, sample_index: torch.Tensor):
        """:func:`chunk_weights` of ``[r, c]`` columns after the samples' state so far."""
        return chunk_weights(
            bad,
            valid,
            self.rule,
            count_before=self.num_bad_events[sample_index],
            run_before=self.consecutive_bad[sample_index],
            stopped_before=self.should_stop[sample_index],
        )

    def update(
        self,
        bad_events: torch.Tensor,
        valid_mask: torch.Tensor,
        sample_index: torch.Tensor | None = None,
    ) -> ChunkWeights:
        """Feed one chunk.

        Args:
            bad_events: ``[r, c]`` bool drift events of the chunk's new tokens.
            valid_mask: ``[r, c]`` bool, True on generated (non-padding) tokens.
            sample_index: ``[r]`` int, the sample of each row (distinct); None means all
                ``batch_size`` samples in order.
        """
        if bad_events.dim() != 2 or bad_events.shape != valid_mask.shape:
            raise ValueError(
                f"bad_events {tuple(bad_events.shape)} and valid_mask "
                f"{tuple(valid_mask.shape)} must both be [r, c]"
            )
        rows = bad_events.shape[0]
        if sample_index is None:
            if rows != self.batch_size:
                raise ValueError(
                    f"chunk has {rows} rows but the stopper tracks {self.batch_size} samples; "
                    "pass sample_index for a partial batch"
                )
            sample_index = torch.arange(rows, device=self.num_bad_events.device)
        sample_index = sample_index.to(device=self.num_bad_events.device, dtype=torch.int64)
        if sample_index.shape != (rows,):
            raise ValueError(
                f"sample_index must be [{rows}] (one per row), got {tuple(sample_index.shape)}"
            )
        if rows and (
            int(sample_index.min()) < 0
            or int(sample_index.max()) >= self.batch_size
            or sample_index.unique().numel() != rows
        ):
            raise ValueError(
                f"sample_index must hold distinct sample ids in [0, {self.batch_size}), "
                f"got {sample_index.tolist()}"
            )
        valid = valid_mask.bool().to(sample_index.device)
        bad = bad_events.bool().to(sample_index.device) & valid
        out = self._continued(bad, valid, sample_index)
        if bad.shape[1] and bool(out.stop_here.any()):  # most chunks stop no row
            columns = torch.arange(bad.shape[1], device=bad.device)
            first_stop = torch.where(out.stop_here, columns, -1).amax(dim=-1)
            start = self.num_tokens[sample_index]
            new_stop = first_stop >= 0
            self.stop_position[sample_index] = torch.where(
                new_stop, start + first_stop, self.stop_position[sample_index]
            )
            reason = self._reason(out, first_stop.clamp(min=0))
            self.stop_reason[sample_index] = torch.where(
                new_stop, reason, self.stop_reason[sample_index]
            )
        self.num_bad_events[sample_index] = out.count_after
        self.consecutive_bad[sample_index] = out.run_after
        positive = valid & (out.weights > self.rule.positive_eps)
        self.effective_length[sample_index] += positive.sum(dim=-1)
        if self.keep_history and bad.shape[1]:
            start = self.num_tokens[sample_index]
            self._history.append((sample_index.clone(), start, out.weights, out.loss_weights))
        self.num_tokens[sample_index] += bad.shape[1]
        return ChunkWeights(
            weights=out.weights,
            loss_weights=out.loss_weights,
            should_stop=self.stop_reason[sample_index] != NOT_STOPPED,
        )

    def _reason(self, out, column: torch.Tensor) -> torch.Tensor:
        """``[r]`` reason of a stop at ``column`` of the chunk: weight zero, else the
        drift budget, else consecutive drift events."""
        rule = self.rule
        at = column[:, None]
        reason = torch.full_like(column, CONSECUTIVE)
        if rule.drift_budget is not None:
            spent = out.cumulative_bad.gather(-1, at)[:, 0] >= rule.drift_budget
            reason = torch.where(spent, DRIFT_BUDGET, reason)
        if rule.stops_at_weight_zero:
            zero = out.weights.gather(-1, at)[:, 0] <= rule.positive_eps
            reason = torch.where(zero, WEIGHT_ZERO, reason)
        return reason

    def result(self) -> ReliabilityWeights:
        """Weights of every sample's tokens so far, right-padded to ``[b, max columns]``:
        equal to ``reliability_weights`` on each sample's concatenated chunks."""
        if not self.keep_history:
            raise ValueError("this OnlineStopper was built with keep_history=False")
        length = int(self.num_tokens.max().item())
        device = self.num_tokens.device
        weights = torch.zeros(self.batch_size, length, dtype=torch.float32, device=device)
        loss_weights = torch.zeros_like(weights)
        for rows, start, chunk_w, chunk_lw in self._history:
            columns = start[:, None] + torch.arange(chunk_w.shape[1], device=device)
            weights[rows[:, None], columns] = chunk_w
            loss_weights[rows[:, None], columns] = chunk_lw
        return ReliabilityWeights(
            weights=weights,
            loss_weights=loss_weights,
            effective_length=self.effective_length.clone(),
            num_bad_events=self.num_bad_events.clone(),
            stop_position=self.stop_position.clone(),
        )
