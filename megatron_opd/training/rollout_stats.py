"""Per-sample facts of a step's rollouts, and the regime metrics made from them.

Prune-OPD pays off when responses are long and drift happens along them: the counters
here say whether a run is in that regime, and whether the mechanisms that claim to save
time did anything. Per sample (on the last pipeline stage, from the scored batch):

- ``response_length`` and ``hit_cap`` (ended at the step's token budget without EOS);
- ``first_drift``: response index of the first drift event (-1: none), and
  ``num_drift``;
- ``after_weight_zero``: generated tokens whose release weight ``clamp(1 - w_drop *
  cumsum(bad), 0, 1)`` is 0 (what the released objective still trains with ``w_base``,
  and what ``truncate`` mode cuts);
- ``stopped_early``: the online stop ended the sample's generation before EOS or the
  budget; ``stop_position``: response index of its stop point (-1: none).

:func:`rollout_metrics` turns the ``[n, 7]`` table of the whole data-parallel batch into
plain-float metrics (lengths, fraction at the cap, first-drift position as a fraction of
the response, tokens after weight 0, samples stopped / truncated).
"""

from __future__ import annotations

import torch

from megatron_opd.prune.weights import weights_from_counts

COLUMNS = (
    "response_length",
    "hit_cap",
    "first_drift",
    "num_drift",
    "after_weight_zero",
    "stopped_early",
    "stop_position",
)
"""Columns of the per-sample table, in order."""


def sample_stats(
    batch,
    *,
    eos_id: int,
    max_new_tokens: int,
    w_drop: float,
    positive_eps: float = 1e-8,
    stop_position: torch.Tensor | None = None,
    stopped_early: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[b, 7]`` int64 per-sample table (:data:`COLUMNS`) of a scored batch.

    Args:
        batch: a RolloutBatch with ``extras["bad_events"]`` (``[b, s]``, from prune).
        eos_id: the id that ends a response.
        max_new_tokens: this step's token budget (``hit_cap`` compares with it).
        w_drop: the release's weight drop per drift event.
        stop_position: ``[b]`` column of each sample's stop point in ``batch`` coordinates
            (-1: none), or None.
        stopped_early: ``[b]`` bool from the online stop, or None (no chunked rollout).
    """
    device = batch.tokens.device
    b, s = batch.tokens.shape
    valid = batch.response_mask().to(device)
    bad = batch.extras["bad_events"].to(device).bool() & valid
    starts = batch.prompt_lengths.to(device)
    lengths = batch.response_lengths.to(device)
    last = (starts + lengths - 1).clamp(min=0, max=max(s - 1, 0))
    ends_eos = batch.tokens.gather(1, last[:, None])[:, 0] == eos_id
    hit_cap = (lengths >= max_new_tokens) & ~ends_eos
    columns = torch.arange(s, device=device)
    first = torch.where(bad, columns, s).amin(dim=1) if s else torch.zeros(b, dtype=torch.long)
    first_drift = torch.where(first < s, first - starts, -1)
    release_weight = weights_from_counts(bad.to(torch.int64).cumsum(dim=1), w_drop)
    after_zero = (valid & (release_weight <= positive_eps)).sum(dim=1)
    stop = torch.full((b,), -1, dtype=torch.int64, device=device)
    if stop_position is not None:
        stop_position = stop_position.to(device)
        stop = torch.where(stop_position >= 0, stop_position - starts, -1)
    early = torch.zeros(b, dtype=torch.int64, device=device)
    if stopped_early is not None:
        early = stopped_early.to(device).to(torch.int64)
    return torch.stack(
        [lengths.to(torch.int64), hit_cap.to(torch.int64), first_drift.to(torch.int64),
         bad.sum(dim=1), after_zero, early, stop],
        dim=1,
    )  # fmt: skip


def _quantile(values: torch.Tensor, q: float) -> float:
    if values.numel() == 0:
        return float("nan")
    return float(torch.quantile(values.to(torch.float64), q))


def rollout_metrics(table: torch.Tensor) -> dict[str, float]:
    """Metrics of a ``[n, 7]`` table (every data-parallel rank's samples)."""
    table = table.to(torch.int64).cpu()
    n = max(table.shape[0], 1)
    lengths = table[:, 0].to(torch.float64)
    first = table[:, 2]
    drifted = first >= 0
    position = first[drifted].to(torch.float64) / lengths[drifted].clamp(min=1.0)
    total = max(float(lengths.sum()), 1.0)
    return {
        "response_length_mean": float(lengths.mean()) if table.shape[0] else 0.0,
        "response_length_p10": _quantile(lengths, 0.1),
        "response_length_p50": _quantile(lengths, 0.5),
        "response_length_p90": _quantile(lengths, 0.9),
        "response_length_max": float(lengths.max()) if table.shape[0] else 0.0,
        "samples_at_cap_fraction": float(table[:, 1].sum()) / n,
        "samples_with_drift_fraction": float(drifted.sum()) / n,
        "first_drift_frac_p25": _quantile(position, 0.25),
        "first_drift_frac_p50": _quantile(position, 0.5),
        "first_drift_frac_p75": _quantile(position, 0.75),
        "tokens_after_weight_zero_fraction": float(table[:, 4].sum()) / total,
        "samples_stopped": float(table[:, 5].sum()),
        "samples_truncated": float((table[:, 6] >= 0).sum()),
    }
