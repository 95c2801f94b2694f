"""The whole run's configuration: one section per part of the system.

A YAML recipe holds these sections; ``a.b=c`` overrides on the command line change any
field. ``megatron-opd config --config FILE`` prints every field with its documentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_opd.config.data import DataConfig
from megatron_opd.config.model import ModelConfig
from megatron_opd.config.parallel import ParallelConfig
from megatron_opd.config.prune import BudgetConfig, LossConfig, PruneConfig
from megatron_opd.config.rollout import RolloutConfig
from megatron_opd.config.training import CheckpointConfig, LoggingConfig, TrainingConfig


@dataclass(kw_only=True)
class EvalConfig:
    """Evaluation of the student (``megatron-opd eval``, and periodically in training)."""

    datasets: list[str] = field(default_factory=list)
    """jsonl/parquet files with problem and answer fields (AMC23/AIME/HMMT layout)."""

    problem_key: str = "problem"
    """Field of an evaluation record holding the problem (dotted for nesting, e.g.
    ``question`` or ``extra_info.question``)."""

    answer_key: str = "answer"
    """Field of an evaluation record holding the gold answer (dotted for nesting, e.g.
    ``solution`` or ``reward_model.ground_truth``)."""

    k: int = 1
    """Samples per problem (Avg@k and pass@k)."""

    temperature: float = 1.0
    """Sampling temperature of evaluation (the paper: 1.0; 0 = greedy)."""

    top_p: float = 1.0
    """Nucleus sampling of evaluation (the paper: 0.95)."""

    max_new_tokens: int = 1024
    """New tokens per answer (the paper: 31744)."""

    interval: int = 0
    """Evaluate every this many training steps (0: before the first step of a fresh run
    and after the last step)."""

    max_problems: int = 0
    """Evaluate at most this many problems per dataset (0: all)."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError("eval.k must be >= 1")
        if self.max_new_tokens < 1:
            raise ValueError("eval.max_new_tokens must be >= 1")
        if self.interval < 0 or self.max_problems < 0:
            raise ValueError("eval.interval and eval.max_problems must be >= 0")
        for name in ("problem_key", "answer_key"):
            if not getattr(self, name).strip():
                raise ValueError(f"eval.{name} must name a field of the evaluation records")
        for index, path in enumerate(self.datasets):
            if not path.endswith((".jsonl", ".parquet")):
                raise ValueError(
                    f"eval.datasets[{index}] must end in .jsonl or .parquet, got {path!r}"
                )


@dataclass(kw_only=True)
class OPDConfig:
    """A Prune-OPD run: student, teacher, data, rollout, pruning, loss and optimisation."""

    student: ModelConfig = field(default_factory=ModelConfig)
    """The model being trained (HF directory or converted Megatron checkpoint)."""

    teacher: ModelConfig = field(default_factory=ModelConfig)
    """The frozen model that scores every token (must share the student's vocabulary)."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP/PP/DP layout, shared by student and teacher."""

    data: DataConfig = field(default_factory=DataConfig)
    """Prompt datasets and batch sizes."""

    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """How the student samples."""

    prune: PruneConfig = field(default_factory=PruneConfig)
    """Drift events and reliability weights."""

    budget: BudgetConfig = field(default_factory=BudgetConfig)
    """Dynamic response budget."""

    loss: LossConfig = field(default_factory=LossConfig)
    """The OPD loss."""

    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Optimiser, schedule, micro-batching, trimming."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving, resuming and HF export."""

    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics sinks."""

    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation sets and sampling."""

    def __post_init__(self) -> None:
        if self.student.fp8_param and not self.parallel.use_distributed_optimizer:
            raise ValueError(
                "student.fp8_param (Megatron-LM's --fp8-param-gather) needs "
                "parallel.use_distributed_optimizer=true: only the distributed optimizer "
                "re-quantizes FP8 parameters from its FP32 master copy after a step"
            )
        if self.teacher.fp8_param:
            raise ValueError(
                "teacher.fp8_param is not supported: the frozen teacher has no optimizer to "
                "hold its master weights; set teacher.fp8_param=false (teacher.fp8 alone "
                "runs its GEMMs in FP8)"
            )
        if self.budget.enable and self.budget.min_len > self.rollout.max_new_tokens:
            raise ValueError(
                f"budget.min_len ({self.budget.min_len}) exceeds rollout.max_new_tokens "
                f"({self.rollout.max_new_tokens}); lower budget.min_len or raise the cap"
            )
        if self.budget.enable and self.budget.max_len > self.rollout.max_new_tokens:
            raise ValueError(
                f"budget.max_len ({self.budget.max_len}) exceeds rollout.max_new_tokens "
                f"({self.rollout.max_new_tokens}), the hard cap of every rollout: the budget "
                "could never reach it. Lower budget.max_len or raise rollout.max_new_tokens"
            )
