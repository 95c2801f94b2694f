"""Where the training prompts come from and how they are batched."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class DataConfig:
    """Prompt dataset, its fields, and the order prompts are drawn in.

    The number of responses sampled per prompt is ``rollout.n_samples_per_prompt``;
    evaluation sets are listed in ``eval.datasets``.
    """

    train_path: str = ""
    """Training prompts: a ``.jsonl`` or ``.parquet`` file (one problem per record)."""

    prompt_key: str | None = None
    """Field holding the problem (dotted for nesting); None tries ``problem``, then ``prompt``."""

    answer_key: str | None = "answer"
    """Field holding the reference answer (dotted for nesting, e.g.
    ``reward_model.ground_truth``); None when the prompts have no answers."""

    enable_thinking: bool | None = None
    """Qwen3-style chat templates: ``enable_thinking`` for ``apply_chat_template``. False
    gives the non-thinking prompt (an empty ``<think></think>`` block), as the release runs
    the Qwen3-4B pair; None leaves the template's default. Also used for evaluation."""

    max_prompt_length: int = 1024
    """Prompt tokens (after the chat template) allowed; a longer prompt is an error."""

    prompts_per_step: int = 8
    """Prompts in one step's batch (the rollout samples n responses for each)."""

    seed: int = 1234
    """Seed of the prompt order (reshuffled every epoch from seed and epoch)."""

    def chat_template_kwargs(self) -> dict:
        """Variables passed to the tokenizer's chat template."""
        return {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}

    def __post_init__(self) -> None:
        if self.max_prompt_length < 1:
            raise ValueError(f"data.max_prompt_length must be >= 1, got {self.max_prompt_length}")
        if self.prompts_per_step < 1:
            raise ValueError(f"data.prompts_per_step must be >= 1, got {self.prompts_per_step}")
        if self.train_path and not self.train_path.endswith((".jsonl", ".parquet")):
            raise ValueError(
                f"data.train_path must end in .jsonl or .parquet, got {self.train_path!r}"
            )
        if self.prompt_key is not None and not self.prompt_key.strip():
            raise ValueError("data.prompt_key must be a field name or null (auto)")
        if self.answer_key is not None and not self.answer_key.strip():
            raise ValueError("data.answer_key must be a field name or null (no answers)")
