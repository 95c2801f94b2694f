"""Per-sample early stop during chunked generation (our "beyond" #1, spec section 5).

The rollout engine generates ``C`` tokens at a time, scores each new chunk with the
teacher, and feeds the chunk's drift events here. The stopper keeps, per sample, the
running count of drift events, the current run of consecutive drift events and the
effective length, so the weights of each new chunk continue exactly where the previous
chunk ended:

    w[t] = clamp(1 - w_drop * (count_before_chunk + cumsum_in_chunk(bad)[t]), 0, 1)

which is bitwise what :func:`~megatron_opd.prune.weights.reliability_weights` gives on
the concatenated sequence (same integer counts, same float32 arithmetic).

A sample should stop when nothing it could still generate matters for training:

- its weight reached 0 (<= positive_eps) and ``w_base == 0``: every later loss weight
  is 0 (``reason = WEIGHT_ZERO``);
- or it spent a configured drift budget (``reason = DRIFT_BUDGET``), or had a configured
  number of drift events in a row (``reason = CONSECUTIVE``). These two change the
  training data on purpose when ``w_base > 0``: they drop the weak ``w_base`` tail.

Rows may leave the running batch: each chunk comes with ``sample_index [r]``, the
sample each of its rows belongs to. Invalid (padding) columns inside a chunk neither
count nor reset a run of drift events; they get weight 0, as in the batch form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_opd.prune.weights import (
    ReliabilityWeights,
    check_weight_params,
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
        drift_budget: int | None = None,
        max_consecutive_bad: int | None = None,
        positive_eps: float = 1e-8,
        keep_history: bool = True,
        device: torch.device | str = "cpu",
    ) -> None:
        check_weight_params(w_drop, w_base)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for name, value in (
            ("drift_budget", drift_budget),
            ("max_consecutive_bad", max_consecutive_bad),
        ):
            if value is not None and value < 1:
                raise ValueError(f"prune.{name} must be >= 1 or None, got {value}")
        self.batch_size = batch_size
        self.w_drop = w_drop
        self.w_base = w_base
        self.drift_budget = drift_budget
        self.max_consecutive_bad = max_consecutive_bad
        self.positive_eps = positive_eps
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
        self._history: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [
            [] for _ in range(batch_size)
        ]

    @classmethod
    def from_config(cls, batch_size: int, config, **kwargs) -> OnlineStopper:
        """Build from a ``prune`` section (:class:`~megatron_opd.config.prune.PruneConfig`)."""
        return cls(
            batch_size,
            w_drop=config.w_drop,
            w_base=config.w_base,
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

        count_before = self.num_bad_events[sample_index]
        cumulative_in_chunk = bad.to(torch.int64).cumsum(dim=-1)
        cumulative_bad = count_before[:, None] + cumulative_in_chunk
        weights = torch.where(valid, weights_from_counts(cumulative_bad, self.w_drop), 0.0)
        loss_weights = torch.where(valid, weights + self.w_base, 0.0)

        run_end, run_max = self._runs(bad, valid, cumulative_in_chunk, sample_index)
        new_count = cumulative_bad[:, -1] if bad.shape[1] else count_before
        self.num_bad_events[sample_index] = new_count
        self.consecutive_bad[sample_index] = run_end
        self.effective_length[sample_index] += (valid & (weights > self.positive_eps)).sum(dim=-1)
        self.num_tokens[sample_index] += bad.shape[1]

        reason = torch.zeros_like(new_count)
        if self.w_base == 0 and self.w_drop > 0:
            weight_now = weights_from_counts(new_count, self.w_drop)
            reason = torch.where(weight_now <= self.positive_eps, WEIGHT_ZERO, reason)
        if self.drift_budget is not None:
            reason = torch.where(
                (reason == NOT_STOPPED) & (new_count >= self.drift_budget), DRIFT_BUDGET, reason
            )
        if self.max_consecutive_bad is not None:
            reason = torch.where(
                (reason == NOT_STOPPED) & (run_max >= self.max_consecutive_bad), CONSECUTIVE, reason
            )
        old_reason = self.stop_reason[sample_index]
        self.stop_reason[sample_index] = torch.where(old_reason != NOT_STOPPED, old_reason, reason)

        if self.keep_history:
            for row, sample in enumerate(sample_index.tolist()):
                self._history[sample].append((weights[row], loss_weights[row], valid[row]))
        return ChunkWeights(
            weights=weights,
            loss_weights=loss_weights,
            should_stop=self.stop_reason[sample_index] != NOT_STOPPED,
        )

    def _runs(
        self,
        bad: torch.Tensor,
        valid: torch.Tensor,
        cumulative_in_chunk: torch.Tensor,
        sample_index: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run of consecutive drift events at the chunk's end, and its longest run ``[r]``.

        A valid good token resets the run; invalid columns are skipped. The run at column
        j is the number of bad events since the last reset (plus the carried run when
        there was no reset in this chunk)."""
        carried = self.consecutive_bad[sample_index]
        rows, cols = bad.shape
        if cols == 0:
            return carried, carried
        column = torch.arange(cols, device=bad.device).expand(rows, cols)
        reset = valid & ~bad
        last_reset = torch.where(reset, column, -1).cummax(dim=-1).values
        count_at_reset = cumulative_in_chunk.gather(-1, last_reset.clamp(min=0))
        run = torch.where(
            last_reset >= 0,
            cumulative_in_chunk - count_at_reset,
            carried[:, None] + cumulative_in_chunk,
        )
        return run[:, -1], torch.maximum(run.max(dim=-1).values, carried)

    def result(self) -> ReliabilityWeights:
        """Weights of every sample's tokens so far, right-padded to ``[b, max columns]``:
        equal to ``reliability_weights`` on each sample's concatenated chunks."""
        if not self.keep_history:
            raise ValueError("this OnlineStopper was built with keep_history=False")
        length = int(self.num_tokens.max().item())
        device = self.num_tokens.device
        weights = torch.zeros(self.batch_size, length, dtype=torch.float32, device=device)
        loss_weights = torch.zeros_like(weights)
        for sample, chunks in enumerate(self._history):
            if chunks:
                w = torch.cat([c[0] for c in chunks])
                weights[sample, : w.numel()] = w
                loss_weights[sample, : w.numel()] = torch.cat([c[1] for c in chunks])
        return ReliabilityWeights(
            weights=weights,
            loss_weights=loss_weights,
            effective_length=self.effective_length.clone(),
            num_bad_events=self.num_bad_events.clone(),
        )
