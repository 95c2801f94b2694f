"""The built-in reasoning tasks behind one interface, by name.

The demo and the benchmarks build their tokenizer, splits and SFT models from a task
without knowing which one it is. A :class:`BuiltinTask` gives, for a size range (terms of
a chain sum, steps of a countdown):

- ``held_out(num_problems, seed, min_size, max_size)``: the evaluation split;
- ``training(seed, min_size, max_size, exclude)``: an endless training stream;
- ``train_tokenizer(out_dir, seed, vocab_size)``: its SentencePiece model.

Problems are frozen dataclasses with ``problem``, ``solution``, ``answer`` and a
``size`` property; :func:`write_jsonl` stores any of them.

- ``chain`` (:mod:`~megatron_opd.data.chain_task`): labelled one-digit chain sums, 35-83
  token solutions; the demo's task.
- ``countdown`` (:mod:`~megatron_opd.data.countdown_task`): 7-token lines counting down,
  118-286 token solutions; the long-horizon task of ``bench/reproduce.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_opd.data import chain_task, countdown_task
from megatron_opd.data.chain_task import write_jsonl  # noqa: F401  (one writer for every task)


@dataclass(frozen=True, kw_only=True)
class BuiltinTask:
    """One built-in task."""

    name: str
    """Its name (``chain`` or ``countdown``)."""

    size_name: str
    """What a problem's size counts (for messages)."""

    held_out: Callable[..., list[Any]]
    """``(num_problems=, seed=, min_size=, max_size=) -> list`` of distinct problems."""

    training: Callable[..., Iterator[Any]]
    """``(seed=, min_size=, max_size=, exclude=) -> iterator`` of training problems."""

    train_tokenizer: Callable[..., Path]
    """``(out_dir, seed=, vocab_size=) -> tokenizer.model path``."""

    default_vocab_size: int
    """SentencePiece size the task was tuned with."""


def _chain_held_out(*, num_problems: int, seed: int, min_size: int, max_size: int):
    return chain_task.held_out_problems(
        num_problems=num_problems, seed=seed, min_terms=min_size, max_terms=max_size
    )


def _chain_training(*, seed: int, min_size: int, max_size: int, exclude: Iterable[str] = ()):
    return chain_task.training_problems(
        seed=seed, min_terms=min_size, max_terms=max_size, exclude=exclude
    )


def _countdown_held_out(*, num_problems: int, seed: int, min_size: int, max_size: int):
    return countdown_task.held_out_problems(
        num_problems=num_problems, seed=seed, min_steps=min_size, max_steps=max_size
    )


def _countdown_training(*, seed: int, min_size: int, max_size: int, exclude: Iterable[str] = ()):
    return countdown_task.training_problems(
        seed=seed, min_steps=min_size, max_steps=max_size, exclude=exclude
    )


TASKS: dict[str, BuiltinTask] = {
    "chain": BuiltinTask(
        name="chain",
        size_name="terms",
        held_out=_chain_held_out,
        training=_chain_training,
        train_tokenizer=chain_task.train_task_tokenizer,
        default_vocab_size=64,
    ),
    "countdown": BuiltinTask(
        name="countdown",
        size_name="steps",
        held_out=_countdown_held_out,
        training=_countdown_training,
        train_tokenizer=countdown_task.train_task_tokenizer,
        default_vocab_size=48,
    ),
}


def get_task(name: str) -> BuiltinTask:
    """The task called ``name``; ValueError listing the valid names otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; the built-in tasks are {sorted(TASKS)}")
    return TASKS[name]
