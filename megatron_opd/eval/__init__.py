"""Evaluation on math sets: math-verify grading, avg@k / pass@k, an engine-agnostic evaluator."""

from megatron_opd.eval.datasets import MathProblem, MathSet, load_math_set
from megatron_opd.eval.evaluator import EvalResult, ProblemResult, evaluate
from megatron_opd.eval.grading import as_latex_gold, grade
from megatron_opd.eval.metrics import avg_at_k, mean_pass_at_k, pass_at_k

__all__ = [
    "EvalResult",
    "MathProblem",
    "MathSet",
    "ProblemResult",
    "as_latex_gold",
    "avg_at_k",
    "evaluate",
    "grade",
    "load_math_set",
    "mean_pass_at_k",
    "pass_at_k",
]
