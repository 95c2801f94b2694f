"""Prune-OPD: drift signal, reliability weights, response budget, online stop, trimming.

Pure tensor code: no process groups, no Megatron imports.
"""

from megatron_opd.prune.budget import ResponseBudget
from megatron_opd.prune.compat import (
    drift_events,
    overlap_ratio,
    teacher_top_p_accept,
    teacher_top_p_bad_events,
)
from megatron_opd.prune.metrics import prune_metrics
from megatron_opd.prune.online_stop import (
    CONSECUTIVE,
    DRIFT_BUDGET,
    NOT_STOPPED,
    WEIGHT_ZERO,
    ChunkWeights,
    OnlineStopper,
)
from megatron_opd.prune.trimming import MicroBatchPlan, TrimPlan, kept_lengths, plan_trimming
from megatron_opd.prune.weights import ReliabilityWeights, reliability_weights

__all__ = [
    "CONSECUTIVE",
    "DRIFT_BUDGET",
    "NOT_STOPPED",
    "WEIGHT_ZERO",
    "ChunkWeights",
    "MicroBatchPlan",
    "OnlineStopper",
    "ReliabilityWeights",
    "ResponseBudget",
    "TrimPlan",
    "drift_events",
    "kept_lengths",
    "overlap_ratio",
    "plan_trimming",
    "prune_metrics",
    "reliability_weights",
    "teacher_top_p_accept",
    "teacher_top_p_bad_events",
]
