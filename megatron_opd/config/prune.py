"""Prune-OPD settings: drift events and weights, the response budget, and the OPD loss.

Three sections: ``prune`` (:class:`PruneConfig`), ``budget`` (:class:`BudgetConfig`) and
``loss`` (:class:`LossConfig`). Defaults are the values of the authors' release
(docs: PRUNE_OPD.md sections 1-4); error messages name the field as ``section.field``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


def _check_finite_non_negative(section: str, name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{section}.{name} must be a finite number >= 0, got {value}")


def _check_unit_interval(section: str, name: str, value: float) -> None:
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(f"{section}.{name} must be in (0, 1], got {value}")


@dataclass(kw_only=True)
class PruneConfig:
    """Drift events, reliability weights and per-sample early stop (spec sections 2-3, 5)."""

    enable: bool = True
    """Apply reliability weights (False: every response token has loss weight 1, plain OPD)."""

    mode: Literal["released", "truncate"] = "released"
    """``released``: the authors' objective exactly: every generated token is trained
    with loss weight ``w + w_base``; a sample only stops early (chunked rollouts) where
    that changes nothing (its weight reached 0 and ``w_base == 0``), so with the released
    ``w_base = 0.5`` nothing stops and the dynamic budget is the only saving.
    ``truncate`` (ours, beyond the release): each response ends at its stop point, the
    token where its weight reached 0 (the ``ceil(1 / w_drop)``-th drift event), its
    ``drift_budget``-th drift event or its ``max_consecutive_bad``-th in a row, whichever
    comes first; the tokens after it are neither generated (online stop, needs
    ``rollout.chunk_size > 0``) nor trained (loss weight 0, trimmed). Up to and including
    the stop point the release's ``w + w_base`` applies unchanged."""

    metric: Literal["overlap", "teacher_top_p_accept"] = "overlap"
    """Drift signal. ``overlap``: bad when |S_t ∩ T_t| / K < ``threshold``.
    ``teacher_top_p_accept``: bad when the sampled token is outside the teacher's top-p
    accept set with p = ``threshold``."""

    threshold: float = 0.7
    """tau of the overlap metric, or p of the top-p accept metric; in (0, 1]."""

    top_k: int = 16
    """K: student and teacher top-K ids kept per position."""

    w_drop: float = 0.01
    """Weight lost per drift event: ``w = clamp(1 - w_drop * cumsum(bad), 0, 1)``."""

    w_base: float = 0.5
    """Added to the weight on every response token: ``loss_weight = w + w_base``."""

    positive_eps: float = 1e-8
    """A weight above this counts towards the effective (reliable) length."""

    online_stop: bool = True
    """With ``rollout.chunk_size > 0``: stop generating a sample at its stop point (see
    ``mode``). False: generate everything, still cut in training (``truncate``)."""

    drift_budget: int | None = None
    """``truncate`` mode: a response also ends at this many drift events (None: no such
    rule). Refused in ``released`` mode, whose objective never ends a response early."""

    max_consecutive_bad: int | None = None
    """``truncate`` mode: a response also ends at this many drift events in a row (None:
    no such rule). Refused in ``released`` mode."""

    def __post_init__(self) -> None:
        if self.mode not in ("released", "truncate"):
            raise ValueError(f"prune.mode must be 'released' or 'truncate', got {self.mode!r}")
        if self.metric not in ("overlap", "teacher_top_p_accept"):
            raise ValueError(
                f"prune.metric must be 'overlap' or 'teacher_top_p_accept', got {self.metric!r}"
            )
        _check_unit_interval("prune", "threshold", self.threshold)
        _check_finite_non_negative("prune", "w_drop", self.w_drop)
        _check_finite_non_negative("prune", "w_base", self.w_base)
        _check_finite_non_negative("prune", "positive_eps", self.positive_eps)
        if self.top_k < 1:
            raise ValueError(f"prune.top_k must be >= 1, got {self.top_k}")
        for name in ("drift_budget", "max_consecutive_bad"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"prune.{name} must be >= 1 or null (no limit), got {value}")
        self.weight_rule()  # mode and the stop rules agree

    def weight_rule(self):
        """The :class:`~megatron_opd.prune.weights.WeightRule` of this section."""
        from megatron_opd.prune.weights import WeightRule

        return WeightRule.from_config(self)

    def describe(self) -> str:
        """One line saying which objective is on and when a response can end early."""
        if not self.enable:
            return "prune: off (plain OPD: every response token has loss weight 1)"
        head = (
            f"prune: mode={self.mode}, metric={self.metric} (threshold {self.threshold}), "
            f"w_drop={self.w_drop}, w_base={self.w_base}"
        )
        rules = []
        if self.weight_rule().stops_at_weight_zero:
            rules.append(f"weight 0 (drift event {math.ceil(1 / self.w_drop - 1e-9)})")
        if self.drift_budget is not None:
            rules.append(f"{self.drift_budget} drift events")
        if self.max_consecutive_bad is not None:
            rules.append(f"{self.max_consecutive_bad} drift events in a row")
        if not rules:
            return head + "; no response ends early (every generated token is trained)"
        if self.mode == "released":
            return head + f"; a response stops at {rules[0]}: later loss weights are 0 anyway"
        return (
            head + f"; a response ends at {' or '.join(rules)}: later tokens are neither "
            "generated (online stop) nor trained"
        )

    def check_vocab_size(self, vocab_size: int) -> None:
        """Raise ValueError when ``top_k`` exceeds the (real, unpadded) vocabulary."""
        if self.top_k > vocab_size:
            raise ValueError(
                f"prune.top_k={self.top_k} is larger than the vocabulary ({vocab_size} ids); "
                f"set prune.top_k <= {vocab_size}"
            )


@dataclass(kw_only=True)
class BudgetConfig:
    """Dynamic response budget: the ``max_new_tokens`` of the next rollout (spec section 4)."""

    enable: bool = True
    """Adapt the budget from effective lengths (False: always ``max_len``)."""

    init_len: int = 1024
    """Budget of the first rollout (clamped into [min_len, max_len])."""

    min_len: int = 1024
    """Smallest budget."""

    max_len: int = 12288
    """Largest budget."""

    step: int = 100
    """Tokens added on a hit step or removed after ``shrink_patience`` misses."""

    margin: int = 100
    """A sample hits when its effective length >= max(min_len, current - margin)."""

    hit_ratio: float = 0.1
    """h: the step is a hit when at least this fraction of samples hit; in [0, 1]."""

    shrink_patience: int = 3
    """Shrink after this many miss steps in a row."""

    def __post_init__(self) -> None:
        if self.min_len < 1:
            raise ValueError(f"budget.min_len must be >= 1, got {self.min_len}")
        if self.min_len > self.max_len:
            raise ValueError(
                f"budget.min_len ({self.min_len}) must be <= budget.max_len ({self.max_len})"
            )
        if self.init_len < 1:
            raise ValueError(f"budget.init_len must be >= 1, got {self.init_len}")
        if self.step <= 0:
            raise ValueError(f"budget.step must be > 0, got {self.step}")
        if self.margin < 0:
            raise ValueError(f"budget.margin must be >= 0, got {self.margin}")
        if not (math.isfinite(self.hit_ratio) and 0.0 <= self.hit_ratio <= 1.0):
            raise ValueError(f"budget.hit_ratio must be in [0, 1], got {self.hit_ratio}")
        if self.shrink_patience < 1:
            raise ValueError(f"budget.shrink_patience must be >= 1, got {self.shrink_patience}")


LossKind = Literal[
    "topk_reverse_kl_pg",
    "sampled_reverse_kl_pg",
    "forward_topk_kl",
    "gkd_jsd",
    "topk_reverse_kl",
]


@dataclass(kw_only=True)
class LossConfig:
    """The OPD loss (spec section 1). Every kind is multiplied by the loss weights."""

    kind: LossKind = "topk_reverse_kl_pg"
    """``topk_reverse_kl_pg``: the release's top-K reverse-KL reward as PPO advantages;
    ``sampled_reverse_kl_pg``: sampled-token reverse KL (k1/k3) as PPO advantage;
    ``forward_topk_kl``: KL(teacher || student) over the teacher's top-K;
    ``gkd_jsd``: generalised JSD(beta) over the teacher's top-K;
    ``topk_reverse_kl``: KL(student || teacher) over the id set, differentiated directly."""

    id_set: Literal["only_stu", "only_tch", "intersection", "union"] = "only_stu"
    """Ids the top-K losses run over (``topk_reverse_kl_pg``, ``topk_reverse_kl``)."""

    reward_weight: Literal["student_p", "teacher_p", "none"] = "student_p"
    """Weight of each id's reward: softmax over the id set of the rollout-time student
    log-probs, of the teacher log-probs, or uniform ``1 / |id set|`` (the release's softmax
    of zeros over the set)."""

    clip_low: float = 0.2
    """PPO ratio clip below: ratio >= 1 - clip_low."""

    clip_high: float = 0.2
    """PPO ratio clip above: ratio <= 1 + clip_high."""

    clip_ratio_c: float | None = 3.0
    """Dual-clip bound for negative advantages (verl's default 3.0; None disables)."""

    kl_estimator: Literal["k1", "k3"] = "k1"
    """Sampled-token reverse-KL estimator of ``sampled_reverse_kl_pg``."""

    jsd_beta: float = 0.5
    """beta of ``gkd_jsd``: M = beta * teacher + (1 - beta) * student; 0 gives
    KL(teacher || student), 1 gives KL(student || teacher) (TRL's convention)."""

    teacher_temperature: float = 1.0
    """The teacher's logits are divided by this when scoring (the release's
    ``teacher_temperature``). The student's scoring and training logits are divided by
    ``rollout.temperature`` (as the release does), so its log-probs are those of the
    policy that sampled."""

    tail_bucket: bool = True
    """Top-K divergences: add a bucket holding 1 - (top-K mass) for both distributions
    (False: renormalise both over the top-K)."""

    def __post_init__(self) -> None:
        kinds = (
            "topk_reverse_kl_pg",
            "sampled_reverse_kl_pg",
            "forward_topk_kl",
            "gkd_jsd",
            "topk_reverse_kl",
        )
        if self.kind not in kinds:
            raise ValueError(f"loss.kind must be one of {list(kinds)}, got {self.kind!r}")
        if self.id_set not in ("only_stu", "only_tch", "intersection", "union"):
            raise ValueError(
                "loss.id_set must be one of only_stu, only_tch, intersection, union, "
                f"got {self.id_set!r}"
            )
        if self.reward_weight not in ("student_p", "teacher_p", "none"):
            raise ValueError(
                "loss.reward_weight must be student_p, teacher_p or none, "
                f"got {self.reward_weight!r}"
            )
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"loss.kl_estimator must be k1 or k3, got {self.kl_estimator!r}")
        if not (math.isfinite(self.clip_low) and 0.0 <= self.clip_low < 1.0):
            raise ValueError(f"loss.clip_low must be in [0, 1), got {self.clip_low}")
        _check_finite_non_negative("loss", "clip_high", self.clip_high)
        if self.clip_ratio_c is not None and not (
            math.isfinite(self.clip_ratio_c) and self.clip_ratio_c > 1.0
        ):
            raise ValueError(f"loss.clip_ratio_c must be > 1 or null, got {self.clip_ratio_c}")
        if not (math.isfinite(self.teacher_temperature) and self.teacher_temperature > 0):
            raise ValueError(
                f"loss.teacher_temperature must be a finite number > 0, got "
                f"{self.teacher_temperature}"
            )
        if not (math.isfinite(self.jsd_beta) and 0.0 <= self.jsd_beta <= 1.0):
            raise ValueError(f"loss.jsd_beta must be in [0, 1], got {self.jsd_beta}")
