"""Per-step Prune-OPD metrics (plain floats, keys under ``prune/``)."""

from __future__ import annotations

import torch


def _quantile(values: torch.Tensor, q: float) -> float:
    if values.numel() == 0:
        return 0.0
    return float(torch.quantile(values.to(torch.float64), q).item())


def prune_metrics(
    *,
    valid_mask: torch.Tensor,
    bad_events: torch.Tensor,
    weights: torch.Tensor,
    effective_lengths: torch.Tensor,
    overlap_ratio: torch.Tensor | None = None,
    budget: int | None = None,
    kept_lengths: torch.Tensor | None = None,
) -> dict[str, float]:
    """Summary of one step.

    Args:
        valid_mask: ``[b, s]`` bool, response tokens.
        bad_events: ``[b, s]`` bool drift events.
        weights: ``[b, s]`` reliability weights.
        effective_lengths: ``[b]`` effective lengths.
        overlap_ratio: ``[b, s]`` overlap ratios (None when the metric is top-p accept).
        budget: the response budget used for this step's rollout.
        kept_lengths: ``[b]`` tokens kept per row by the trimming plan (None: no trimming).

    Returns:
        ``prune/overlap_ratio`` (mean over response tokens), ``prune/bad_event_rate``,
        ``prune/mean_weight``, ``prune/effective_length_{mean,p50,p90}``, ``prune/budget``,
        ``prune/trimmed_fraction`` (response tokens cut by trimming / response tokens).
    """
    valid = valid_mask.bool()
    num_valid = max(int(valid.sum().item()), 1)
    lengths = effective_lengths.to(torch.float64)
    metrics = {
        "prune/bad_event_rate": float((bad_events.bool() & valid).sum().item()) / num_valid,
        "prune/mean_weight": float(weights.to(torch.float64)[valid].sum().item()) / num_valid,
        "prune/effective_length_mean": float(lengths.mean().item()) if lengths.numel() else 0.0,
        "prune/effective_length_p50": _quantile(lengths, 0.5),
        "prune/effective_length_p90": _quantile(lengths, 0.9),
    }
    if overlap_ratio is not None:
        metrics["prune/overlap_ratio"] = (
            float(overlap_ratio.to(torch.float64)[valid].sum().item()) / num_valid
        )
    if budget is not None:
        metrics["prune/budget"] = float(budget)
    if kept_lengths is not None:
        positions = torch.arange(valid.shape[1], device=valid.device)
        trimmed = valid & (positions[None, :] >= kept_lengths.to(valid.device)[:, None])
        metrics["prune/trimmed_fraction"] = float(trimmed.sum().item()) / num_valid
    return metrics
