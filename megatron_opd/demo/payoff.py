"""What the payoff benchmark concludes from its runs: accuracy curves against wall time,
their standard errors, time to an accuracy, and the time ratios against plain OPD.

A run's report (``megatron_opd.demo.distill``) holds per-step metrics and greedy held-out
accuracies at steps 0, E, 2E, ... The *training clock* of a run is the sum of its steps'
wall times (rollout, scoring, pruning, training): evaluations, model loading and asset
building are outside it, and are the same for every arm.

Standard error of an accuracy ``p`` measured on ``n`` problems: ``sqrt(p (1 - p) / n)``
(binomial; one seed's evaluation). Curves of several seeds are averaged point by point
(accuracy and clock alike); the spread between seeds is reported beside them.

``time_to_accuracy(curve, target)``: the clock at the first evaluation whose accuracy is
at least ``target`` (None if the curve never gets there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(kw_only=True)
class Curve:
    """Accuracy against the training clock, one point per evaluation."""

    steps: list[int]
    """Training step of each evaluation (0: before training)."""

    seconds: list[float]
    """Training clock at each evaluation (s)."""

    accuracy: list[float]
    """Held-out greedy accuracy at each evaluation."""

    spread: list[float]
    """Half the range between seeds at each evaluation (0 for one seed)."""


def standard_error(p: float, n: int) -> float:
    """Binomial standard error of an accuracy ``p`` on ``n`` problems."""
    if n < 1:
        raise ValueError(f"need n >= 1 problems, got {n}")
    p = min(max(p, 0.0), 1.0)
    return math.sqrt(p * (1.0 - p) / n)


def run_curve(report: dict) -> tuple[list[int], list[float], list[float]]:
    """``(steps, clock, accuracy)`` of one run's report: the evaluation before training,
    every evaluation during it, and the final one (when it is a new step)."""
    clock, total = {0: 0.0}, 0.0
    for record in report["history"]:
        total += record.get("time_step_wall_s", record["time_step_s"])
        clock[int(record["step"])] = total
    points = {0: report["evals"]["student_before"]["pass@1"]}
    for record in report.get("evals_during", []):
        points[int(record["step"])] = record["pass@1"]
    last = int(report["history"][-1]["step"]) if report["history"] else 0
    points.setdefault(last, report["evals"]["student_after"]["pass@1"])
    steps = sorted(points)
    return steps, [clock[s] for s in steps], [points[s] for s in steps]


def mean_curve(reports: list[dict]) -> Curve:
    """Point-by-point mean of several seeds' curves (they must share evaluation steps)."""
    if not reports:
        raise ValueError("mean_curve needs at least one report")
    curves = [run_curve(r) for r in reports]
    steps = curves[0][0]
    if any(c[0] != steps for c in curves):
        raise ValueError("the runs were evaluated at different steps; cannot average them")
    seconds = [sum(c[1][i] for c in curves) / len(curves) for i in range(len(steps))]
    accuracy = [sum(c[2][i] for c in curves) / len(curves) for i in range(len(steps))]
    spread = [
        (max(c[2][i] for c in curves) - min(c[2][i] for c in curves)) / 2 for i in range(len(steps))
    ]
    return Curve(steps=steps, seconds=seconds, accuracy=accuracy, spread=spread)


def time_to_accuracy(curve: Curve, target: float) -> tuple[int, float] | None:
    """``(step, clock)`` of the first evaluation with accuracy >= ``target``, or None."""
    for step, seconds, accuracy in zip(curve.steps, curve.seconds, curve.accuracy):
        if accuracy >= target - 1e-12:
            return step, seconds
    return None


def totals(history: list[dict]) -> dict[str, float]:
    """Sums over a run's steps: wall time per phase, tokens, stops and trimmed tokens."""
    keys = (
        "time_rollout_s", "time_score_s", "time_prune_s", "time_train_s", "time_step_s",
        "time_step_wall_s", "tokens_generated", "tokens_scored", "tokens_trained",
        "tokens_trimmed", "samples_stopped", "samples_truncated",
    )  # fmt: skip
    return {key: sum(float(h.get(key, 0.0)) for h in history) for key in keys}


def payoff_summary(curves: dict[str, Curve], baseline: str, num_problems: int) -> dict:
    """Per arm: final accuracy and its SE, total clock, the clock at which it first reaches
    the baseline's final accuracy minus one SE, and the ratios against the baseline."""
    if baseline not in curves:
        raise ValueError(f"the baseline arm {baseline!r} has no runs")
    base = curves[baseline]
    base_final = base.accuracy[-1]
    base_se = standard_error(base_final, num_problems)
    target = base_final - base_se
    base_total = base.seconds[-1]
    base_reach = time_to_accuracy(base, target)
    summary = {"baseline": baseline, "target_accuracy": target, "baseline_se": base_se}
    for arm, curve in curves.items():
        reach = time_to_accuracy(curve, target)
        final = curve.accuracy[-1]
        summary[arm] = {
            "final_accuracy": final,
            "final_se": standard_error(final, num_problems),
            "final_seed_spread": curve.spread[-1],
            "total_seconds": curve.seconds[-1],
            "time_ratio_total": curve.seconds[-1] / base_total if base_total else float("nan"),
            "reaches_target_at_step": None if reach is None else reach[0],
            "reaches_target_seconds": None if reach is None else reach[1],
            "reach_ratio_vs_baseline_total": None if reach is None else reach[1] / base_total,
            "reach_ratio_vs_baseline_reach": (
                None
                if reach is None or base_reach is None or base_reach[1] == 0
                else reach[1] / base_reach[1]
            ),  # fmt: skip
            "equal_accuracy": abs(final - base_final) <= max(base_se, 1e-12),
        }
    return summary


def mechanism_savings(pruned: dict, plain: dict) -> dict[str, float]:
    """Generated tokens each mechanism saved, estimated sample by sample.

    ``pruned`` and ``plain`` are two runs' ``report["samples"]`` (per-sample tables of every
    step) with the same data and rollout seeds, so row ``i`` of step ``k`` answers the same
    prompt in both. The counterfactual length of a sample is what plain OPD generated for
    that prompt at that step:

    - ``stop``: samples ended by the online stop, ``sum(max(0, L_plain - L))``;
    - ``budget``: samples that ended at the step's budget (not stopped),
      ``sum(max(0, L_plain - L))``;
    - ``trimmed``: not an estimate: generated tokens cut from training (after stop points).

    Also the exact counts ``samples_stopped``, ``samples_at_budget`` and the measured
    difference of all generated tokens, ``total``.
    """
    from megatron_opd.training.rollout_stats import COLUMNS

    col = {name: i for i, name in enumerate(COLUMNS)}
    plain_steps = {s["step"]: s["rows"] for s in plain["steps"]}
    out = {"stop": 0.0, "budget": 0.0, "samples_stopped": 0.0, "samples_at_budget": 0.0,
           "total": 0.0}  # fmt: skip
    for step in pruned["steps"]:
        reference = plain_steps.get(step["step"])
        if reference is None or len(reference) != len(step["rows"]):
            raise ValueError(
                f"step {step['step']}: the runs' batches differ; mechanism_savings needs two "
                "runs with the same data seed, rollout seed and batch size"
            )
        for row, ref in zip(step["rows"], reference):
            gain = max(0.0, float(ref[col["response_length"]] - row[col["response_length"]]))
            if row[col["stopped_early"]]:
                out["stop"] += gain
                out["samples_stopped"] += 1
            elif row[col["hit_cap"]]:
                out["budget"] += gain
                out["samples_at_budget"] += 1
            out["total"] += ref[col["response_length"]] - row[col["response_length"]]
    return out
