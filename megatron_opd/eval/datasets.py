"""Math evaluation sets laid out like AMC23 / AIME24 / AIME25 / HMMT: problem and answer.

A set is a ``.jsonl`` or ``.parquet`` file with one problem per record. Field names vary
between releases (``problem``/``question``, ``answer``/``solution``), so both keys are
arguments; the defaults fit the common layout. The set's name is the file stem.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_opd.data.records import answer_text, get_field, prompt_text, read_records


@dataclass(frozen=True, kw_only=True)
class MathProblem:
    """One evaluation problem."""

    problem: str
    """Problem statement (the chat template is applied by the generator)."""

    answer: str
    """Gold answer (LaTeX or a number; graded with math-verify)."""

    location: str
    """``file:line`` of the record."""


@dataclass(frozen=True, kw_only=True)
class MathSet:
    """A named evaluation set."""

    name: str
    """Short name (the file stem, e.g. ``aime24``)."""

    problems: list[MathProblem]
    """The problems, in file order."""


def load_math_set(
    path: str | Path, *, problem_key: str = "problem", answer_key: str = "answer"
) -> MathSet:
    """Read an evaluation set; ValueError names the file and line of a bad record and
    the config field (``eval.problem_key`` / ``eval.answer_key``) that picks the key."""
    path = Path(path)
    problems = []
    for location, record in read_records(path):
        field = get_field(record, problem_key, location, setting="eval.problem_key")
        problem = prompt_text(field, problem_key, location)
        field = get_field(record, answer_key, location, setting="eval.answer_key")
        answer = answer_text(field, answer_key, location)
        if not answer.strip():
            raise ValueError(f"{location}: field {answer_key!r} (eval.answer_key) is empty")
        problems.append(MathProblem(problem=problem, answer=answer, location=location))
    return MathSet(name=path.stem, problems=problems)
