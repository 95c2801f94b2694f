"""Prompt datasets: problems from a file, tokenized once, drawn in a resumable order.

:func:`load_prompt_dataset` reads every record, applies the tokenizer's prompt template
(the chat template when there is one), checks the prompt length, and keeps the token
ids, so a bad record fails at start-up naming its file and line, not mid-run.

:class:`PromptLoader` yields batches of prompts. The order is a permutation of the
dataset drawn from ``(seed, epoch)``, so it is the same on every data-parallel rank and
in every restart; the position is ``(epoch, index)`` and is all a checkpoint needs
(:meth:`PromptLoader.state_dict`). A partial batch at the end of an epoch is dropped
(each batch then has exactly ``prompts_per_step`` prompts); the next epoch reshuffles.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from megatron_opd.config.data import DataConfig
from megatron_opd.data.records import (
    answer_text,
    get_field,
    prompt_text,
    read_records,
    resolve_prompt_key,
)
from megatron_opd.data.tokenizer import Tokenizer


@dataclass(frozen=True, kw_only=True)
class Prompt:
    """One problem, ready for the rollout."""

    index: int
    """Position in the dataset (stable across epochs and restarts)."""

    problem: str
    """The problem text as stored (before the template)."""

    token_ids: tuple[int, ...]
    """Prompt token ids with the template (and BOS) applied."""

    answer: str | None
    """Reference answer, or None when the dataset has none."""

    location: str
    """``file:line`` of the record, for messages."""


def load_prompt_dataset(
    path: str | Path,
    tokenizer: Tokenizer,
    *,
    max_prompt_length: int,
    prompt_key: str | None = None,
    answer_key: str | None = "answer",
) -> list[Prompt]:
    """Read, template and tokenize every record of ``path`` (``.jsonl`` or ``.parquet``).

    Raises ValueError naming the file and line for an empty file, a malformed line, a
    missing field, or a prompt longer than ``max_prompt_length`` tokens.
    """
    prompts = []
    for index, (location, record) in enumerate(read_records(path)):
        key = resolve_prompt_key(record, prompt_key, location)
        field = get_field(record, key, location, setting="data.prompt_key")
        problem = prompt_text(field, key, location)
        answer = None
        if answer_key is not None:
            field = get_field(record, answer_key, location, setting="data.answer_key")
            answer = answer_text(field, answer_key, location)
        token_ids = tuple(tokenizer.encode_prompt(problem))
        if len(token_ids) > max_prompt_length:
            raise ValueError(
                f"{location}: prompt has {len(token_ids)} tokens after the template, more than "
                f"data.max_prompt_length={max_prompt_length}; raise it or drop the record"
            )
        prompts.append(
            Prompt(
                index=index, problem=problem, token_ids=token_ids, answer=answer, location=location
            )
        )
    return prompts


def epoch_order(num_prompts: int, *, seed: int, epoch: int) -> list[int]:
    """The dataset order of ``epoch``: a permutation of ``range(num_prompts)``."""
    order = list(range(num_prompts))
    random.Random(f"prompt-order-{seed}-{epoch}").shuffle(order)
    return order


class PromptLoader:
    """Endless batches of ``prompts_per_step`` prompts in a seeded, resumable order."""

    def __init__(self, prompts: list[Prompt], *, prompts_per_step: int, seed: int) -> None:
        if prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be >= 1, got {prompts_per_step}")
        if len(prompts) < prompts_per_step:
            raise ValueError(
                f"the dataset has {len(prompts)} prompts, fewer than prompts_per_step="
                f"{prompts_per_step}; lower data.prompts_per_step or add prompts"
            )
        self.prompts = prompts
        self.prompts_per_step = prompts_per_step
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._order = epoch_order(len(prompts), seed=seed, epoch=0)

    def next_batch(self) -> list[Prompt]:
        """The next ``prompts_per_step`` prompts; starts a new epoch when too few are left."""
        if self.index + self.prompts_per_step > len(self.prompts):
            self.epoch += 1
            self.index = 0
            self._order = epoch_order(len(self.prompts), seed=self.seed, epoch=self.epoch)
        chosen = self._order[self.index : self.index + self.prompts_per_step]
        self.index += self.prompts_per_step
        return [self.prompts[i] for i in chosen]

    def __iter__(self) -> Iterator[list[Prompt]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """The position: ``{"epoch", "index", "seed", "num_prompts"}``."""
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "num_prompts": len(self.prompts),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position (the dataset and seed must be the same)."""
        if state.get("num_prompts", len(self.prompts)) != len(self.prompts):
            raise ValueError(
                f"data position was saved for {state['num_prompts']} prompts, the dataset now "
                f"has {len(self.prompts)}; resume with the same data.train_path"
            )
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"data position was saved with data.seed={state['seed']}, now {self.seed}; "
                "resume with the same seed"
            )
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= len(self.prompts):
            raise ValueError(f"invalid data position epoch={epoch}, index={index}")
        self.epoch, self.index = epoch, index
        self._order = epoch_order(len(self.prompts), seed=self.seed, epoch=epoch)


def prompt_loader_from_config(config: DataConfig, tokenizer: Tokenizer) -> PromptLoader:
    """Load ``config.train_path`` with the config's keys and limits into a loader."""
    if not config.train_path:
        raise ValueError("data.train_path is empty; set it to a .jsonl or .parquet prompt file")
    prompts = load_prompt_dataset(
        config.train_path,
        tokenizer,
        max_prompt_length=config.max_prompt_length,
        prompt_key=config.prompt_key,
        answer_key=config.answer_key,
    )
    return PromptLoader(prompts, prompts_per_step=config.prompts_per_step, seed=config.seed)
