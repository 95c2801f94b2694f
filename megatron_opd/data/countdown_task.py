"""A built-in long-horizon task: count down a counter while counting up by k, every step written.

A problem gives the step ``k`` and the first line of the trace; the solution writes every
following line (the counter one lower, the value ``k`` higher) until the counter reaches
``00``, then boxes the last value::

    problem:  Count by 4: 25:137
    solution: 24:141 23:145 22:149 ... 01:233 00:237 \\boxed{237}

Each line is exactly 7 tokens with the task tokenizer (two counter digits, ``:``, three
value digits, a space), so every dependency sits at a fixed offset (7 tokens back, plus
``k`` from the prompt), and stopping is a local rule (the line whose counter is ``00``).
With 16-40 steps a worked solution is 118-286 tokens: several times the chain sums', the
regime Prune-OPD is about (long responses, drift somewhere along them).

Why this format (probe ``reference/long_task``): two earlier ~350-token formats with
14-token lines (labelled chain sums with 16-48 terms, count-by-k traces with a line index)
left a tiny teacher at 0 % after ~700 s of SFT: most of each line was copying, and the
model never learned where to stop. Short fixed-width lines, a countdown that makes the
stop local, the first line in the prompt (so the solution copies nothing from it) and
short problems in training (a built-in curriculum: 10-step problems teach the stop rule
cheaply) gave a 2-layer teacher above 95 % in ~5 single-core minutes.

Everything is deterministic by seed; the held-out split is drawn from its own stream and
training problems whose text is in it are rejected.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from megatron_opd.data.task_tokenizer import train_sentencepiece
from megatron_opd.data.tokenizer import plain_prompt_template

MAX_STEPS = 99
"""The counter has two digits."""


@dataclass(frozen=True, kw_only=True)
class CountdownProblem:
    """One countdown problem with its worked solution."""

    problem: str
    """``"Count by 4: 25:137"`` (no trailing newline; the prompt template adds it)."""

    solution: str
    """Every later line, then ``\\boxed{N}``."""

    answer: str
    """The value on the ``00`` line, as a decimal string."""

    num_steps: int
    """Lines the solution writes before the box (the first counter value)."""

    @property
    def size(self) -> int:
        """The problem's size for batching by length: its number of steps."""
        return self.num_steps


def make_countdown_problem(
    rng: random.Random,
    *,
    min_steps: int,
    max_steps: int,
    min_start: int = 100,
    max_start: int = 199,
    min_k: int = 2,
    max_k: int = 9,
) -> CountdownProblem:
    """Draw one problem: ``n`` steps in [min_steps, max_steps], start value in
    [min_start, max_start], step ``k`` in [min_k, max_k]. Values must stay 3 digits."""
    if not 1 <= min_steps <= max_steps <= MAX_STEPS:
        raise ValueError(
            f"need 1 <= min_steps <= max_steps <= {MAX_STEPS}, "
            f"got min_steps={min_steps}, max_steps={max_steps}"
        )
    if not (100 <= min_start <= max_start and 1 <= min_k <= max_k):
        raise ValueError(
            f"need 100 <= min_start <= max_start and 1 <= min_k <= max_k, got start "
            f"{min_start}..{max_start}, k {min_k}..{max_k}"
        )
    if max_start + max_steps * max_k > 999:
        raise ValueError(
            f"values would leave 3 digits: max_start + max_steps * max_k = "
            f"{max_start + max_steps * max_k} > 999; lower max_steps or max_k"
        )
    n = rng.randint(min_steps, max_steps)
    start = rng.randint(min_start, max_start)
    k = rng.randint(min_k, max_k)
    lines = [f"{n - i:02d}:{start + i * k}" for i in range(n + 1)]
    answer = start + n * k
    return CountdownProblem(
        problem=f"Count by {k}: {lines[0]}",
        solution=" ".join(lines[1:]) + f" \\boxed{{{answer}}}",
        answer=str(answer),
        num_steps=n,
    )


def held_out_problems(
    *, num_problems: int, seed: int, min_steps: int, max_steps: int
) -> list[CountdownProblem]:
    """The evaluation split: ``num_problems`` distinct problems drawn from ``seed``."""
    rng = random.Random(f"countdown-eval-{seed}")
    problems: dict[str, CountdownProblem] = {}
    attempts = 0
    while len(problems) < num_problems:
        attempts += 1
        if attempts > 100 * num_problems + 1000:
            raise ValueError(
                f"cannot draw {num_problems} distinct problems with {min_steps}..{max_steps} "
                "steps; lower num_problems or widen the range"
            )
        p = make_countdown_problem(rng, min_steps=min_steps, max_steps=max_steps)
        problems.setdefault(p.problem, p)
    return list(problems.values())


def training_problems(
    *, seed: int, min_steps: int, max_steps: int, exclude: Iterable[str] = ()
) -> Iterator[CountdownProblem]:
    """An endless stream of training problems from ``seed``, skipping texts in ``exclude``."""
    excluded = set(exclude)
    rng = random.Random(f"countdown-train-{seed}")
    while True:
        p = make_countdown_problem(rng, min_steps=min_steps, max_steps=max_steps)
        if p.problem not in excluded:
            yield p


def train_task_tokenizer(
    out_dir: str | Path,
    *,
    seed: int = 0,
    vocab_size: int = 48,
    num_corpus_problems: int = 2000,
    min_steps: int = 10,
    max_steps: int = 40,
) -> Path:
    """Train the countdown task's SentencePiece model; returns ``out_dir/tokenizer.model``."""
    rng = random.Random(f"countdown-tokenizer-{seed}")
    corpus = [
        plain_prompt_template(p.problem) + p.solution
        for p in (
            make_countdown_problem(rng, min_steps=min_steps, max_steps=max_steps)
            for _ in range(num_corpus_problems)
        )
    ]
    return train_sentencepiece(out_dir, corpus, vocab_size=vocab_size)
