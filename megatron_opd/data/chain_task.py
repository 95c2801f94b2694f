"""A built-in long-horizon reasoning task: chain sums with a worked solution.

A problem lists labelled one-digit terms; the solution adds them one step at a time,
naming the term each step uses, and ends with a boxed answer::

    problem:  Add: a=3 b=7 c=5 d=2
    solution: b: 3+7=10. c: 10+5=15. d: 15+2=17. The answer is \\boxed{17}.

Every step is a place where a student can drift (a wrong lookup or a wrong sum) and every
later step inherits the error, which is what Prune-OPD's drift weights are about; the
horizon grows with the number of terms. The format is the one a tiny model learns on two
CPU cores in minutes (probe ``reference/tiny_task``): the labels turn "find the next term"
into a one-hop lookup, and one-digit terms keep each sum easy. Two-digit terms did not
learn in that budget; models do not extrapolate beyond the trained term counts.

Everything is deterministic by seed. The held-out split is drawn from its own seed and
training problems whose text is in it are rejected, so the two splits are disjoint.
:func:`train_task_tokenizer` trains a SentencePiece model on the task's text with the
settings that task needs (digits split, a newline symbol, no whitespace splitting).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_opd.data.task_tokenizer import (  # noqa: F401  (ids re-exported)
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    train_sentencepiece,
)
from megatron_opd.data.tokenizer import plain_prompt_template

TERM_LABELS = "abcdefghijklmnopqrstuvwxyz"
"""Labels of the terms, in order; at most 26 terms."""


@dataclass(frozen=True, kw_only=True)
class ChainProblem:
    """One chain-sum problem with its worked solution."""

    problem: str
    """``"Add: a=3 b=7 ..."`` (no trailing newline; the prompt template adds it)."""

    solution: str
    """Step-by-step solution ending with ``The answer is \\boxed{N}.``"""

    answer: str
    """The final sum as a decimal string."""

    num_terms: int
    """Number of terms (``num_terms - 1`` solution steps)."""

    @property
    def size(self) -> int:
        """The problem's size for batching by length: its number of terms."""
        return self.num_terms


def make_chain_problem(
    rng: random.Random, *, min_terms: int, max_terms: int, max_term: int = 9
) -> ChainProblem:
    """Draw one problem: ``n`` in [min_terms, max_terms], terms in [1, max_term]."""
    if not 2 <= min_terms <= max_terms <= len(TERM_LABELS):
        raise ValueError(
            f"need 2 <= min_terms <= max_terms <= {len(TERM_LABELS)}, "
            f"got min_terms={min_terms}, max_terms={max_terms}"
        )
    if max_term < 1:
        raise ValueError(f"max_term must be >= 1, got {max_term}")
    num_terms = rng.randint(min_terms, max_terms)
    terms = [rng.randint(1, max_term) for _ in range(num_terms)]
    problem = "Add: " + " ".join(f"{TERM_LABELS[i]}={t}" for i, t in enumerate(terms))
    total, steps = terms[0], []
    for i, term in enumerate(terms[1:], start=1):
        steps.append(f"{TERM_LABELS[i]}: {total}+{term}={total + term}.")
        total += term
    solution = " ".join(steps) + f" The answer is \\boxed{{{total}}}."
    return ChainProblem(problem=problem, solution=solution, answer=str(total), num_terms=num_terms)


def held_out_problems(
    *, num_problems: int, seed: int, min_terms: int, max_terms: int, max_term: int = 9
) -> list[ChainProblem]:
    """The evaluation split: ``num_problems`` distinct problems drawn from ``seed``."""
    rng = random.Random(f"chain-eval-{seed}")
    problems: dict[str, ChainProblem] = {}
    attempts = 0
    while len(problems) < num_problems:
        attempts += 1
        if attempts > 100 * num_problems + 1000:
            raise ValueError(
                f"cannot draw {num_problems} distinct problems with terms "
                f"{min_terms}..{max_terms}; lower num_problems or widen the term range"
            )
        p = make_chain_problem(rng, min_terms=min_terms, max_terms=max_terms, max_term=max_term)
        problems.setdefault(p.problem, p)
    return list(problems.values())


def training_problems(
    *,
    seed: int,
    min_terms: int,
    max_terms: int,
    exclude: Iterable[str] = (),
    max_term: int = 9,
) -> Iterator[ChainProblem]:
    """An endless stream of training problems from ``seed``, skipping texts in ``exclude``."""
    excluded = set(exclude)
    rng = random.Random(f"chain-train-{seed}")
    while True:
        p = make_chain_problem(rng, min_terms=min_terms, max_terms=max_terms, max_term=max_term)
        if p.problem not in excluded:
            yield p


def write_jsonl(path: str | Path, problems: Iterable[ChainProblem]) -> Path:
    """Write problems as jsonl with fields problem, answer, solution, num_terms."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for p in problems:
            f.write(json.dumps(asdict(p)) + "\n")
    tmp.replace(path)
    return path


def tokenizer_corpus(problems: Iterable[ChainProblem]) -> list[str]:
    """Training text for the tokenizer: prompt as the model sees it, then the solution."""
    return [plain_prompt_template(p.problem) + p.solution for p in problems]


def train_task_tokenizer(
    out_dir: str | Path,
    *,
    seed: int = 0,
    vocab_size: int = 64,
    num_corpus_problems: int = 4000,
    min_terms: int = 2,
    max_terms: int = 12,
) -> Path:
    """Train the chain task's SentencePiece model; returns ``out_dir/tokenizer.model``.

    The corpus is ``num_corpus_problems`` problems with ``min_terms..max_terms`` terms;
    the settings are :func:`~megatron_opd.data.task_tokenizer.train_sentencepiece`'s.
    """
    rng = random.Random(f"chain-tokenizer-{seed}")
    corpus = tokenizer_corpus(
        make_chain_problem(rng, min_terms=min_terms, max_terms=max_terms)
        for _ in range(num_corpus_problems)
    )
    return train_sentencepiece(out_dir, corpus, vocab_size=vocab_size)
