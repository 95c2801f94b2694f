"""Evaluate any generator on a math set: k responses per problem, avg@k and pass@k.

The evaluator does not know about engines. It takes ``generate_fn(problems) ->
responses``, one response per input problem text, and asks for every problem ``k``
times (consecutive copies), so an engine that samples at temperature > 0 gives ``k``
independent responses, and one that decodes greedily gives ``k`` equal ones. Applying
the chat template is the generator's job (it knows its tokenizer).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from megatron_opd.eval.datasets import MathProblem, MathSet
from megatron_opd.eval.grading import grade
from megatron_opd.eval.metrics import avg_at_k, mean_pass_at_k


@dataclass(kw_only=True)
class ProblemResult:
    """Responses to one problem and their grades."""

    problem: str
    """Problem text."""

    answer: str
    """Gold answer."""

    responses: list[str]
    """The ``k`` responses."""

    correct: list[bool]
    """Grade of each response."""

    @property
    def num_correct(self) -> int:
        """Correct responses among the ``k``."""
        return sum(self.correct)


@dataclass(kw_only=True)
class EvalResult:
    """Per-problem results and the summary of one evaluation."""

    results: list[ProblemResult]
    """One entry per problem, in dataset order."""

    summary: dict
    """``name``, ``num_problems``, ``k``, ``avg@k``, ``pass@1``, ``pass@k``, and seconds
    spent generating and grading."""


def evaluate(
    generate_fn: Callable[[list[str]], Sequence[str]],
    dataset: MathSet | Sequence[MathProblem],
    k: int,
    *,
    batch_size: int | None = None,
    grade_fn: Callable[[str, str], bool] = grade,
) -> EvalResult:
    """Generate ``k`` responses per problem with ``generate_fn``, grade them, summarise.

    ``batch_size`` limits the problem copies passed to one ``generate_fn`` call (None:
    everything at once).
    """
    if k < 1:
        raise ValueError(f"evaluate: k must be >= 1, got {k}")
    name = dataset.name if isinstance(dataset, MathSet) else "dataset"
    problems = list(dataset.problems if isinstance(dataset, MathSet) else dataset)
    if not problems:
        raise ValueError(f"evaluate: the dataset {name} has no problems")
    requests = [p.problem for p in problems for _ in range(k)]
    step = batch_size or len(requests)
    start = time.perf_counter()
    responses: list[str] = []
    for i in range(0, len(requests), step):
        chunk = requests[i : i + step]
        out = list(generate_fn(chunk))
        if len(out) != len(chunk):
            raise ValueError(
                f"evaluate: generate_fn returned {len(out)} responses for {len(chunk)} prompts; "
                "it must return exactly one response per prompt"
            )
        responses.extend(out)
    generate_s = time.perf_counter() - start
    start = time.perf_counter()
    results = []
    for j, p in enumerate(problems):
        mine = responses[j * k : (j + 1) * k]
        results.append(
            ProblemResult(
                problem=p.problem,
                answer=p.answer,
                responses=mine,
                correct=[bool(grade_fn(r, p.answer)) for r in mine],
            )
        )
    grade_s = time.perf_counter() - start
    table = [r.correct for r in results]
    summary = {
        "name": name,
        "num_problems": len(results),
        "k": k,
        f"avg@{k}": avg_at_k(table),
        "pass@1": mean_pass_at_k(table, 1),
        f"pass@{k}": mean_pass_at_k(table, k),
        "generate_seconds": generate_s,
        "grade_seconds": grade_s,
    }
    return EvalResult(results=results, summary=summary)
